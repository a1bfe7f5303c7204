"""An HSA layer's decoding kernels (``kernels/decode/triton_hsa.py``) at `small`'s shapes with 1M cached tokens, bf16,
on a GPU: chunk scoring + top-k + selection (``select_chunks_decode``) over a grid of launch shapes, and the attention
to the selected chunks (``hsa_chunks_decode``) by slots per program. µs per call replayed from a CUDA graph, landmarks
cycled over 4 copies so they come from memory as in a real step (between two HSA layers the dense blocks stream more
than the L2 holds). Run with LIT_HSA_PDL=0 for each call's own time. (The committed
``hsa_decode_kernels_sweep_h200_2026-11-29.json`` took the best of 5 graph replays; ``graph_us`` averages 20.)

    LIT_HSA_PDL=0 python benchmarks/bench_hsa_decode.py [--out f.json]
"""
import argparse
import itertools

import torch
from common import gpu_name, graph_us, write_result

import lit_hsa.kernels.decode.triton_hsa as th


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    C, Dr, S, D, Hq, K = 16389, 640, 64, 64, 10, 32  # 1M tokens plus a few hundred steps of room
    copies = 4
    landmarks = [torch.randn(1, C, 1, Dr, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    memories = [torch.randn(1, C * S, 1, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    q = torch.randn(1, Dr, device="cuda", dtype=torch.bfloat16)
    q_hsa = torch.randn(1, Hq * D, device="cuda", dtype=torch.bfloat16)
    q_norm = torch.ones(D, device="cuda", dtype=torch.bfloat16)
    pos = torch.tensor(C * S - 100, device="cuda")
    which = itertools.cycle(range(copies))
    rows = []
    defaults = th.PROGRAMS, th.TILE, th.TOPK_WARPS, th.SELECT_WARPS, th.KEPT
    for programs, tile, kept in itertools.product((64, 128), (8192, 16384), (64, 128)):
        th.PROGRAMS, th.TILE, th.KEPT = programs, tile, kept
        us = graph_us(lambda: th.select_chunks_decode(q, None, 1e-6, landmarks[next(which)], pos, K, S), 20)
        rows.append({"programs": programs, "tile": tile, "kept": kept, "select_us": round(us, 2)})
        print(rows[-1], flush=True)
    th.PROGRAMS, th.TILE, th.TOPK_WARPS, th.SELECT_WARPS, th.KEPT = defaults
    _, idx, w = th.select_chunks_decode(q, None, 1e-6, landmarks[0], pos, K, S)
    mem = itertools.cycle(range(2))
    for slots in (1, 2, 4, 8):
        us = graph_us(lambda: th.hsa_chunks_decode(q_hsa, q_norm, 1e-6, memories[next(mem)], memories[next(mem)],
                                                  idx, w, S, slots=slots), 20)
        rows.append({"slots": slots, "attention_us": round(us, 2)})
        print(rows[-1], flush=True)
    if args.out:
        write_result(args.out, {"gpu": gpu_name(), "rows": rows})


if __name__ == "__main__":
    main()
