"""The decoding step's operators, alone, on one GPU (issue 6): µs per call, each replayed from a CUDA graph of
``--calls`` calls (at batch 1 a step is latency bound, so launch cost from Python would hide the kernels' own time).

1. a sliding-window layer's step: the Triton ring kernel (``kernels.decode.triton_ring``) against the PyTorch
   reference (cache write + split-KV matmuls), eager and inductor-compiled, at the presets' shapes;
2. chunk selection's top-k over one row of C chunk scores (a decoding step at C·64 cached tokens): ``torch.topk``
   against the staged ``kernels.hsa.reference.topk_last_dim``.

    python benchmarks/bench_decode_kernels.py [--calls 50] [--out f.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.decode import ring_attention_reference  # noqa: E402
from kernels.decode.triton_ring import ring_attention_triton  # noqa: E402
from kernels.hsa.reference import topk_last_dim  # noqa: E402

# (name, query heads, KV heads, head dim, window)
RING_SHAPES = [("small SWA", 10, 2, 64, 512), ("dense-0.5b SWA", 16, 4, 64, 4096),
               ("moe-8b SWA", 16, 4, 128, 4096), ("moe-8b HSA sub-layer", 16, 4, 128, 512)]
BLOCK_KEYS = (64, 128)  # the kernel's default is 128
TOPK_CHUNKS = [16_384, 65_536, 262_144]  # 1M, 4M, 16M cached tokens in chunks of 64


def graph_us(fn, calls: int, replays: int = 20) -> float:
    """µs per fn() call, replaying a CUDA graph of ``calls`` calls."""
    for _ in range(3):
        fn()  # warm-up: compiles, autotunes, allocates outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


def ring_rows(calls: int) -> list[dict]:
    compiled = torch.compile(ring_attention_reference, dynamic=False)
    rows = []
    for name, Hq, Hkv, D, W in RING_SHAPES:
        dev, dt = "cuda", torch.bfloat16
        q, k, v = (torch.randn(1, 1, h, D, device=dev, dtype=dt) for h in (Hq, Hkv, Hkv))
        ck, cv = (torch.randn(1, Hkv, W, D, device=dev, dtype=dt) for _ in range(2))
        pos = torch.tensor(3 * W + 5, device=dev)
        locks = torch.zeros(Hkv, dtype=torch.int32, device=dev)
        row = {"shape": name, "Hq": Hq, "Hkv": Hkv, "D": D, "W": W}
        for block_keys in BLOCK_KEYS:
            row[f"triton_bw{block_keys}_us"] = round(graph_us(
                lambda: ring_attention_triton(q, k, v, ck, cv, pos, locks, block_keys=block_keys), calls), 2)
        row["reference_eager_us"] = round(graph_us(lambda: ring_attention_reference(q, k, v, ck, cv, pos), calls), 2)
        row["reference_compiled_us"] = round(graph_us(lambda: compiled(q, k, v, ck, cv, pos), calls), 2)
        rows.append(row)
        print(row, flush=True)
    return rows


def topk_rows(calls: int, k: int = 32) -> list[dict]:
    rows = []
    for C in TOPK_CHUNKS:
        s = torch.randn(1, 1, 1, C, device="cuda")
        row = {"chunks": C, "k": k,
               "torch_topk_us": round(graph_us(lambda: s.topk(k, dim=-1), calls), 2),
               "staged_us": round(graph_us(lambda: topk_last_dim(s, k), calls), 2)}
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ring, topk = ring_rows(args.calls), topk_rows(args.calls)
    gpu = torch.cuda.get_device_name()
    print(f"\nSliding-window decoding step on {gpu}, bf16, batch 1, µs per call (CUDA graph replay)")
    print("| shape | Hq/Hkv | D | W | " + " | ".join(f"Triton BW={bw}" for bw in BLOCK_KEYS)
          + " | reference eager | reference compiled |")
    print("|---" * (6 + len(BLOCK_KEYS)) + "|")
    for r in ring:
        triton_us = " | ".join(str(r[f"triton_bw{bw}_us"]) for bw in BLOCK_KEYS)
        print(f"| {r['shape']} | {r['Hq']}/{r['Hkv']} | {r['D']} | {r['W']} | {triton_us} | "
              f"{r['reference_eager_us']} | {r['reference_compiled_us']} |")
    print(f"\nTop-{topk[0]['k']} of one row of chunk scores, µs per call")
    print("| chunks | torch.topk | staged |\n|---|---|---|")
    for r in topk:
        print(f"| {r['chunks']:,} | {r['torch_topk_us']} | {r['staged_us']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu": gpu, "ring": ring, "topk": topk}, indent=2))


if __name__ == "__main__":
    main()
