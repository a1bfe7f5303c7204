"""The decoding step's operators, alone, on one GPU (issue 6): µs per call, each replayed from a CUDA graph of
``--calls`` calls (at batch 1 a step is latency bound, so launch cost from Python would hide the kernels' own time).

1. a sliding-window layer's step: the Triton ring kernel (``kernels.decode.triton_ring``) against the PyTorch
   reference (cache write + split-KV matmuls), eager and inductor-compiled, at the presets' shapes;
2. chunk selection's top-k over one row of C chunk scores (a decoding step at C·64 cached tokens): ``torch.topk``
   against the staged ``kernels.hsa.reference.topk_last_dim``;
3. a dense block's projections (``kernels.decode.triton_block``, ``ring_attention_out_proj``) against the block's
   modules, eager and inductor-compiled (with static decoding's options), for the dense presets' SWA blocks. Calls
   cycle through 8 copies of the block, more weights than the L2 cache holds, as in a step through every layer.

    python benchmarks/bench_decode_kernels.py [--calls 50] [--parts ring,topk,blocks] [--out f.json]
"""
from __future__ import annotations

import argparse

import torch
from common import gpu_name, graph_us, write_result

from lit_hsa.config import ModelConfig
from lit_hsa.inference import fused_step
from lit_hsa.inference.static_decode import decode_compile_options
from lit_hsa.kernels.decode import ring_attention_reference
from lit_hsa.kernels.decode.triton_block import gemv
from lit_hsa.kernels.decode.triton_ring import ring_attention_out_proj, ring_attention_triton
from lit_hsa.kernels.hsa.reference import topk_last_dim
from lit_hsa.model.transformer import Block

# (name, query heads, KV heads, head dim, window)
RING_SHAPES = [("small SWA", 10, 2, 64, 512), ("dense-0.5b SWA", 16, 4, 64, 4096),
               ("moe-8b SWA", 16, 4, 128, 4096), ("moe-8b HSA sub-layer", 16, 4, 128, 512)]
BLOCK_KEYS = (64, 128)  # the kernel's default is 128
TOPK_CHUNKS = [16_384, 65_536, 262_144]  # 1M, 4M, 16M cached tokens in chunks of 64


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


def _attention_inputs(block, h, cos, sin):
    return block.attn.qkv(block.attn_norm(h), cos, sin)


def _feed_forward(block, h):
    return h + block.ffn(block.ffn_norm(h))


def block_rows(calls: int, copies: int = 8) -> list[dict]:
    import itertools

    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * copies)
    compile = lambda fn: torch.compile(fn, dynamic=False, options=decode_compile_options("inductor"))  # noqa: E731
    rows = []
    for preset in ("small", "dense-0.5b"):
        cfg = ModelConfig.from_name(preset, vocab_size=32000)
        blocks = [Block(cfg, 0, cfg.swa_window).cuda().to(torch.bfloat16).eval() for _ in range(copies)]
        layer = itertools.cycle(blocks)
        h = torch.randn(1, 1, cfg.d_model, device="cuda", dtype=torch.bfloat16)
        pos = torch.tensor(3 * cfg.swa_window + 5, device="cuda")
        angle = torch.rand(1, cfg.head_dim // 2, device="cuda") * 6  # a step's rotary angles: [1, D/2] fp32
        cos, sin = angle.cos(), angle.sin()
        row = {"preset": preset, "d_model": cfg.d_model, "ffn_hidden": cfg.ffn_hidden}
        ops = {
            "attention_inputs": (lambda b, h, cos, sin: fused_step.attention_inputs(b.attn_norm, b.attn, h, cos, sin),
                                 _attention_inputs, (cos, sin)),
            "feed_forward": (fused_step.feed_forward, _feed_forward, ()),
        }
        with torch.no_grad():
            for name, (fused, modules, extra) in ops.items():
                compiled = compile(modules)
                row[f"{name}_fused_us"] = round(graph_us(lambda: fused(next(layer), h, *extra), calls), 2)
                row[f"{name}_eager_us"] = round(graph_us(lambda: modules(next(layer), h, *extra), calls), 2)
                row[f"{name}_compiled_us"] = round(graph_us(lambda: compiled(next(layer), h, *extra), calls), 2)
            Hq, Hkv, D, W = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.swa_window
            q, k, v = (torch.randn(1, 1, n, D, device="cuda", dtype=torch.bfloat16) for n in (Hq, Hkv, Hkv))
            rings = [[torch.randn(1, Hkv, W, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
                     for _ in blocks]
            ring = itertools.cycle(zip(blocks, rings))
            locks = torch.zeros(Hkv, dtype=torch.int32, device="cuda")

            def fused_ring():
                block, (ck, cv) = next(ring)
                return ring_attention_out_proj(q, k, v, ck, cv, pos, block.attn.o_proj.weight, h)

            def ring_then_gemv():
                block, (ck, cv) = next(ring)
                o = ring_attention_triton(q, k, v, ck, cv, pos, locks)
                return gemv(o.flatten(2), block.attn.o_proj.weight, residual=h)

            def ring_then_linear():
                block, (ck, cv) = next(ring)
                return h + block.attn.o_proj(ring_attention_triton(q, k, v, ck, cv, pos, locks).flatten(2))

            def fused_ring_bw64():
                block, (ck, cv) = next(ring)
                return ring_attention_out_proj(q, k, v, ck, cv, pos, block.attn.o_proj.weight, h, block_keys=64)

            for name, fn in (("merged_in_projection", fused_ring), ("merged_in_projection_bw64", fused_ring_bw64),
                             ("then_gemv", ring_then_gemv), ("then_linear", ring_then_linear)):
                row[f"ring_out_proj_{name}_us"] = round(graph_us(fn, calls), 2)
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--parts", default="ring,topk,blocks", help="which of ring, topk, blocks to run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts or parts - {"ring", "topk", "blocks"}:
        parser.error(f"--parts takes ring, topk and/or blocks, got {args.parts!r}")
    ring = ring_rows(args.calls) if "ring" in parts else []
    topk = topk_rows(args.calls) if "topk" in parts else []
    blocks = block_rows(args.calls) if "blocks" in parts else []
    gpu = gpu_name()
    print(f"\nSliding-window decoding step on {gpu}, bf16, batch 1, µs per call (CUDA graph replay)")
    print("| shape | Hq/Hkv | D | W | " + " | ".join(f"Triton BW={bw}" for bw in BLOCK_KEYS)
          + " | reference eager | reference compiled |")
    print("|---" * (6 + len(BLOCK_KEYS)) + "|")
    for r in ring:
        triton_us = " | ".join(str(r[f"triton_bw{bw}_us"]) for bw in BLOCK_KEYS)
        print(f"| {r['shape']} | {r['Hq']}/{r['Hkv']} | {r['D']} | {r['W']} | {triton_us} | "
              f"{r['reference_eager_us']} | {r['reference_compiled_us']} |")
    print("\nTop-32 of one row of chunk scores, µs per call")
    print("| chunks | torch.topk | staged |\n|---|---|---|")
    for r in topk:
        print(f"| {r['chunks']:,} | {r['torch_topk_us']} | {r['staged_us']} |")
    print("\nA dense SWA block's projections, µs per call (8 copies of the block in turn)")
    print("| preset | part | fused kernels | modules eager | modules compiled |\n|---|---|---|---|---|")
    for r in blocks:
        for part in ("attention_inputs", "feed_forward"):
            print(f"| {r['preset']} | {part.replace('_', ' ')} | {r[part + '_fused_us']} | {r[part + '_eager_us']} | "
                  f"{r[part + '_compiled_us']} |")
    print("\nRing step + output projection + residual, µs per call")
    print("| preset | merged in the projection (2 launches) | the same, key blocks of 64 | ring kernel, then gemv | "
          "ring kernel, then nn.Linear |\n|---|---|---|---|---|")
    for r in blocks:
        print(f"| {r['preset']} | {r['ring_out_proj_merged_in_projection_us']} | "
              f"{r['ring_out_proj_merged_in_projection_bw64_us']} | {r['ring_out_proj_then_gemv_us']} | "
              f"{r['ring_out_proj_then_linear_us']} |")
    if args.out:
        write_result(args.out, {"gpu": gpu, "ring": ring, "topk": topk, "blocks": blocks})


if __name__ == "__main__":
    main()
