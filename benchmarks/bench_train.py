"""Training speed and memory on one GPU (issue 5): tokens/s of a preset with HSA against the same model with
`attention: full`, in the same run, at several lengths; and the longest trainable sequence with activation
checkpointing. Prints a table and writes JSON.

    python benchmarks/bench_train.py [--preset small] [--lengths 16k,64k,256k] [--max-lengths 256k,512k,1m]
                                     [--compile] [--profile 64k]

``--profile T`` times one HSA step at T under torch.profiler and prints where the GPU time goes (top kernels).
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import triton
from common import gpu_name, sync, write_result

from lit_hsa.config import ModelConfig, parse_length
from lit_hsa.model.transformer import HSATransformer
from lit_hsa.training.parallel import parallelize


def _record_triton_compiles(stop: bool = False) -> list[str]:
    """Names of the @triton.jit kernels compiled (or loaded from Triton's disk cache) from now on, appended to the
    returned list; ``stop`` removes the hook. Inductor's generated kernels load through another path (not listed)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None:  # Triton < 3.4
        return []
    names: list[str] = []
    knobs.runtime.jit_post_compile_hook = None if stop else (lambda **kw: names.append(kw["repr"].split("[")[0]))
    return names


def train_steps(cfg: ModelConfig, T: int, steps: int, checkpointing: bool = True, compile: bool = False,
                profile: bool = False, warmup: int = 2) -> dict:
    """``warmup`` untimed steps then ``steps`` timed AdamW steps on [1, T] random tokens, bf16 autocast. Two warm-up
    steps: compiled, the second step still pays one-off work (~0.8 s at 16K on an H100, e.g. lazily compiled
    backward graphs), which one timed step of a few would otherwise absorb.
    ``profile``: the timed steps run under torch.profiler and the top CUDA kernels are printed."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = HSATransformer(cfg).cuda()
    parallelize(model, activation_checkpointing=checkpointing, compile=compile)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, cfg.vocab_size, (1, T + 1), device="cuda")
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if profile else nullcontext()
    # Events at step boundaries give each timed step's GPU-side duration without synchronising between steps: runs
    # on different machines have differed by up to 2× at 64K, and per-step times tell a slow step from a slow run.
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    compiled, first_compile = _record_triton_compiles(), []  # first_compile[j]: len(compiled) when step j began
    try:
        for i in range(warmup + steps):
            if i == warmup:
                sync("cuda")
                start = time.perf_counter()
                prof.__enter__()
            if i >= warmup:
                marks[i - warmup].record()
                first_compile.append(len(compiled))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x[:, :-1], labels=x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        marks[-1].record()
        sync("cuda")
        if profile:
            prof.__exit__(None, None, None)
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70))
        elapsed = (time.perf_counter() - start) / steps
        step_s = [round(a.elapsed_time(b) / 1e3, 4) for a, b in zip(marks, marks[1:])]
        # Throughput from the median step: the steady state that a long run sees. One-off work inside a timed step
        # (on a fresh machine, a kernel compiled when the data first need it: the HSA work list did that until its
        # length stopped being specialised on) made the mean of a few steps differ by up to 2× between runs.
        # The mean is kept as well.
        median = statistics.median(step_s)
        bounds = [*first_compile, len(compiled)]
        timed_compiles = {j: compiled[a:b] for j, (a, b) in enumerate(zip(bounds, bounds[1:])) if b > a}
        return {"ok": True, "s_per_step": round(median, 4), "tokens_per_s": round(T / median),
                "tokens_per_s_mean": round(T / elapsed), "step_s": step_s,
                "triton_jit_compiles_in_timed_steps": timed_compiles,
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "loss": round(loss.item(), 3)}
    except torch.OutOfMemoryError:
        return {"ok": False, "oom": True}
    finally:
        _record_triton_compiles(stop=True)
        del model, opt
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--lengths", default="16k,64k,256k")
    parser.add_argument("--max-lengths", default="256k,512k,1m", help="tried in order until the first OOM")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--profile", default=None, help="profile one HSA step at this length and exit")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    if args.profile:
        T = parse_length(args.profile)
        print(train_steps(ModelConfig.from_name(args.preset), T, 1, compile=args.compile, profile=True))
        return
    rows = []
    for T in (parse_length(x) for x in args.lengths.split(",")):
        row = {"T": T}
        for attention in ("hsa", "full"):
            row[attention] = train_steps(ModelConfig.from_name(args.preset, attention=attention), T, args.steps,
                                         compile=args.compile)
            print(f"T={T} {attention}: {row[attention]}", flush=True)
        if row["hsa"]["ok"] and row["full"]["ok"]:
            row["speedup_vs_full"] = round(row["hsa"]["tokens_per_s"] / row["full"]["tokens_per_s"], 2)
        rows.append(row)
    longest = []
    for T in (parse_length(x) for x in args.max_lengths.split(",") if x):
        r = train_steps(ModelConfig.from_name(args.preset), T, 1)
        longest.append({"T": T, **r})
        print(f"longest try T={T}: {r}", flush=True)
        if not r["ok"]:
            break

    print(f"\n{args.preset} on {gpu_name()}, bf16, activation checkpointing, batch 1"
          + (", torch.compile per block" if args.compile else ""))
    print("| T | HSA tokens/s | full tokens/s | HSA / full | HSA peak GiB | full peak GiB |\n|---|---|---|---|---|---|")
    for r in rows:
        h, f = r["hsa"], r["full"]
        print(f"| {r['T']:,} | {h.get('tokens_per_s', 'OOM')} | {f.get('tokens_per_s', 'OOM')} | "
              f"{r.get('speedup_vs_full', '-')} | {h.get('peak_gib', '-')} | {f.get('peak_gib', '-')} |")
    ok = [r["T"] for r in longest if r["ok"]]
    print(f"longest trainable sequence: {max(ok):,} tokens" if ok else "no tried length fitted")
    if args.out:
        write_result(args.out, {"gpu": gpu_name(), "preset": args.preset, "compile": args.compile, "rows": rows,
                                "longest": longest})


if __name__ == "__main__":
    main()
