"""Long-context inference on one GPU (issue 6), `small` preset with random weights in bf16, batch 1:

1. segment prefill of a real prompt: time and peak memory against context length, for HSA (chunk K/V on the GPU or
   offloaded to host memory) and the same model with `attention: full`; then decode latency per token with that
   prompt cached, eagerly (kernels launched from Python) and with static caches replayed as CUDA graphs;
2. decode latency at contexts too long to prefill with full attention in minutes (quadratic): the static caches are
   sized for the context and filled with random values (a step's cost does not depend on the values: no step has
   data-dependent shapes), so the full-attention cache's size decides where it runs out of memory.

    python benchmarks/bench_generate.py [--lengths 4k,64k,1m] [--full-lengths 4k,64k,1m]
                                        [--synthetic-lengths 1m,4m,8m,16m] [--segment 16k]
                                        [--compile | --compile-only] [--block-steps fused,modules] [--pdl on,off]
                                        [--out f.json]

``--block-steps``: dense blocks step in fused Triton kernels (``lit_hsa.inference.fused_step``, the default) and/or
through their modules (``GraphDecoder(fuse_blocks=False)``); ``--pdl``: the decoding kernels launch with programmatic
dependent launch (``kernels.decode.pdl``, the default on Hopper) and/or without. Both models of a row use the same.
"""
from __future__ import annotations

import argparse
import time

import torch
from common import gpu_name, loop_ms, sync, write_result

import lit_hsa.kernels.decode.pdl as pdl
from lit_hsa.config import ModelConfig, parse_length
from lit_hsa.inference.decode import decode_forward
from lit_hsa.inference.generate import prefill
from lit_hsa.inference.static_decode import GraphDecoder
from lit_hsa.model.transformer import HSATransformer


def graph_decode_ms(decoder: GraphDecoder, token: torch.Tensor, steps: int) -> float:
    """Decoding steps until both kinds of graph (plain, chunk-completing) are captured, then ``steps`` timed."""
    chunk = decoder.model.cfg.chunk_size
    for _ in range(2 * chunk + 2):
        decoder.step(token)
    return loop_ms(lambda: decoder.step(token), steps, "cuda")


@torch.no_grad()
def measure_prefill(model: HSATransformer, T: int, segment: int, offload: bool, steps: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    prompt = torch.randint(0, model.cfg.vocab_size, (1, T), device="cuda")
    try:
        # warm-up: the first segments compile and tune the Triton kernels, which is not prefill time
        prefill(model, prompt[:, : min(T, 2 * segment)], segment, offload_memory=offload)
        sync("cuda")
        start = time.perf_counter()
        logits, state = prefill(model, prompt, segment, offload_memory=offload)
        sync("cuda")
        prefill_s = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        token = logits.argmax(-1, keepdim=True)
        decode_forward(model, token, state)  # warm-up of the one-token path
        eager_ms = loop_ms(lambda: decode_forward(model, token, state), steps, "cuda")
        row = {"ok": True, "prefill_s": round(prefill_s, 3), "prefill_us_per_token": round(prefill_s / T * 1e6, 2),
               "peak_gib": round(peak, 3), "decode_eager_ms": round(eager_ms, 3)}
        if not offload:
            decoder = GraphDecoder(model, state, state.pos + 2 * model.cfg.chunk_size + steps + 8)
            row["decode_graph_ms"] = round(graph_decode_ms(decoder, token[:, 0], steps), 3)
        return row
    except torch.OutOfMemoryError:
        return {"ok": False, "oom": True}


def profile_step(decoder: GraphDecoder, token: torch.Tensor, top: int = 12) -> dict:
    """GPU operations (kernels, copies) one replayed decoding step runs, and where its GPU time goes: at batch 1
    their count, not the bytes read, decides the latency of a step whose caches are small (HSA)."""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.step(token)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in events:
        by_name.setdefault(e.name, []).append(e.device_time)  # µs
    heaviest = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"gpu_ops_per_step": len(events),
            "gpu_busy_us": round(sum(e.device_time for e in events), 1),
            "top_kernels": [{"name": n[:120], "calls": len(t), "us": round(sum(t), 1)} for n, t in heaviest]}


def fill_static_caches(decoder: GraphDecoder, length: int) -> None:
    """Move the decoder to position ``length`` with random cache contents (all layers were converted by a step)."""
    state = decoder.state
    state.kv.pos = length
    state.kv.pos_t.fill_(length)
    for k, v in [*state.kv.full.values(), *state.kv.rings.values()]:
        k.normal_()
        v.normal_()
    if state.has_memory:
        for x in (state.landmarks, state.k, state.v, state.pending):
            x.normal_()


@torch.no_grad()
def measure_synthetic(model: HSATransformer, T: int, steps: int, compile: str | None = None,
                      fuse_blocks: bool = True, use_pdl: bool = True) -> dict:
    pdl.ENABLED = use_pdl  # read when the kernels are launched, so also at graph capture
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        prompt = torch.randint(0, model.cfg.vocab_size, (1, 4096), device="cuda")
        logits, state = prefill(model, prompt, 4096)
        token = logits.argmax(-1)
        decoder = GraphDecoder(model, state, T + 2 * model.cfg.chunk_size + steps + 8, compile, fuse_blocks)
        decoder.step(token)  # allocates and takes over every layer's cache
        fill_static_caches(decoder, T)
        ms = graph_decode_ms(decoder, token, steps)
        return {"ok": True, "decode_graph_ms": round(ms, 3), **profile_step(decoder, token),
                "peak_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)}
    except torch.OutOfMemoryError:
        return {"ok": False, "oom": True}


def lengths(spec: str) -> list[int]:
    return [parse_length(x) for x in spec.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--lengths", default="4k,64k,1m")
    parser.add_argument("--full-lengths", default="4k,64k,1m", help="prefill lengths for the full-attention model")
    parser.add_argument("--synthetic-lengths", default="1m,4m,8m,16m")
    parser.add_argument("--segment", default="16k")
    parser.add_argument("--steps", type=int, default=64, help="timed decoding steps")
    parser.add_argument("--compile", action="store_true",
                        help="also time the synthetic decode with inductor-compiled blocks (GraphDecoder compile=)")
    parser.add_argument("--compile-only", action="store_true", help="time the synthetic decode compiled only")
    parser.add_argument("--block-steps", default="fused", help="fused, modules or both (comma-separated)")
    parser.add_argument("--pdl", default="on", help="on, off or both (comma-separated)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    compiles = ("inductor",) if args.compile_only else (None, "inductor") if args.compile else (None,)
    block_steps = [x for x in args.block_steps.split(",") if x]
    if not block_steps or set(block_steps) - {"fused", "modules"}:
        parser.error(f"--block-steps takes fused and/or modules, got {args.block_steps!r}")
    pdls = [x for x in args.pdl.split(",") if x]
    if not pdls or set(pdls) - {"on", "off"}:
        parser.error(f"--pdl takes on and/or off, got {args.pdl!r}")
    modes = [(c, b == "fused", p == "on") for c in compiles for b in block_steps for p in pdls]
    segment = parse_length(args.segment)
    rows, synthetic = [], []
    for attention, offloads, prefill_lengths in (("hsa", (False, True), args.lengths),
                                                 ("full", (False,), args.full_lengths)):
        cfg = ModelConfig.from_name(args.preset, attention=attention)
        model = HSATransformer(cfg).cuda().to(torch.bfloat16).eval()
        for offload in offloads:
            for T in lengths(prefill_lengths):
                r = {"attention": attention, "offload": offload, "T": T,
                     **measure_prefill(model, T, segment, offload, args.steps)}
                rows.append(r)
                print(r, flush=True)
                if not r["ok"]:
                    break
        # uncompiled first: compiling changes the model's blocks in place
        for compile, fused, use_pdl in modes:
            for T in lengths(args.synthetic_lengths):
                r = {"attention": attention, "T": T, "compile": compile, "fused_blocks": fused, "pdl": use_pdl,
                     **measure_synthetic(model, T, args.steps, compile, fused, use_pdl)}
                synthetic.append(r)
                print(r, flush=True)
        del model

    gpu = gpu_name()
    print(f"\n{args.preset} on {gpu}, bf16 weights, batch 1, prefill segments of {segment:,}")
    print("| model | K/V | context | prefill s | µs/token | peak GiB | decode ms/token eager | with CUDA graphs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        kv = "host" if r["offload"] else "GPU"
        if r["ok"]:
            print(f"| {r['attention']} | {kv} | {r['T']:,} | {r['prefill_s']} | {r['prefill_us_per_token']} | "
                  f"{r['peak_gib']} | {r['decode_eager_ms']} | {r.get('decode_graph_ms', '-')} |")
        else:
            print(f"| {r['attention']} | {kv} | {r['T']:,} | OOM | | | | |")
    by = {(r["attention"], r["T"], r["compile"], r["fused_blocks"], r["pdl"]): r for r in synthetic}
    for mode in modes:
        compile, fused, use_pdl = mode
        print(f"\nDecode with CUDA graphs{', blocks compiled' if compile else ''}, dense blocks "
              f"{'in fused kernels' if fused else 'through their modules'}, PDL {'on' if use_pdl else 'off'}, caches "
              "of the given context (random contents):")
        print("| context | HSA ms/token | HSA GiB | HSA GPU ops | full ms/token | full GiB | full GPU ops | full / "
              "HSA |\n"
              "|---|---|---|---|---|---|---|---|")
        for T in lengths(args.synthetic_lengths):
            h, f = by.get(("hsa", T, *mode), {}), by.get(("full", T, *mode), {})
            cell = lambda r, k: r.get(k, "OOM") if r else "-"  # noqa: E731
            ratio = round(f["decode_graph_ms"] / h["decode_graph_ms"], 1) if h.get("ok") and f.get("ok") else "-"
            print(f"| {T:,} | {cell(h, 'decode_graph_ms')} | {cell(h, 'peak_gib')} | {cell(h, 'gpu_ops_per_step')} | "
                  f"{cell(f, 'decode_graph_ms')} | {cell(f, 'peak_gib')} | {cell(f, 'gpu_ops_per_step')} | {ratio} |")
    if args.out:
        write_result(args.out, {"gpu": gpu, "preset": args.preset, "dtype": "bfloat16", "prefill": rows,
                                "synthetic_decode": synthetic})


if __name__ == "__main__":
    main()
