"""MoE layer speed (issue 23): forward + backward of one MoE feed-forward at `moe-8b-a1b` widths (d 2048, 64 routed
experts of width 768, top 4, one shared expert), bf16, against, in the same run, (a) the same layer with its experts
run as a loop over experts (the implementation before grouped GEMMs) and (b) a dense SwiGLU with the same active
FLOPs per token (width 4·768 + 768 = 3840). Target: MoE ≤ 1.5× dense. Prints a markdown table and writes JSON.

    python benchmarks/bench_moe.py [--tokens 8k,32k] [--out benchmarks/results/moe_<gpu>_<date>.json]
    python benchmarks/bench_moe.py --tokens 256 --d-model 64 --experts 8 --expert-hidden 32 --device cpu  # smoke
    python benchmarks/bench_moe.py --profile   # + where the time goes: torch.profiler, op by op, forward and backward
    python benchmarks/bench_moe.py --baseline old_moe.py   # + another version of the layer (a moe.py), same weights
    python benchmarks/bench_moe.py --params bf16   # weights held in bf16 (no per-step casts) instead of fp32 + autocast
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

import torch
from common import gpu_name, result_path, time_ms, today, write_result

from lit_hsa.config import parse_length
from lit_hsa.kernels.dispatch import set_expert_backend
from lit_hsa.model.moe import MoE, SwiGLU


def time_fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, warmup: int, iters: int) -> float:
    """Median milliseconds of forward + backward (the gradient ``grad``, random, of the output) of ``layer`` on x."""
    cuda = x.is_cuda
    grad = torch.randn_like(x)

    def fwd_bwd():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cuda):
            y = layer(x)
        y.backward(grad)

    def clear():
        x.grad = None
        layer.zero_grad(set_to_none=True)

    return time_ms(fwd_bwd, warmup, iters, x.device, after=clear)


def profile_fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, iters: int = 5, top: int = 30) -> dict:
    """Where one forward + backward of ``layer`` spends its time: ``torch.profiler`` over ``iters`` steps (after a
    warm-up), device time per op (self time, so nothing is counted twice) summed over the steps and divided by
    ``iters``; the ``top`` (op, pass) pairs by time, each with its share of the step (pass: ``bwd`` for ops the
    autograd engine ran)."""
    from torch.profiler import ProfilerActivity, profile

    grad = torch.randn_like(x)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
            y = layer(x)
        y.backward(grad)
        x.grad = None
        layer.zero_grad(set_to_none=True)

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities, with_stack=False) as prof:
        for _ in range(iters):
            step()
        if x.is_cuda:
            torch.cuda.synchronize()
    attr = "self_device_time_total" if x.is_cuda else "self_cpu_time_total"
    totals: dict[tuple[str, str], list[float]] = {}
    for event in prof.events():
        if event.name.startswith(("autograd::", "ProfilerStep")) or event.device_type.name != "CPU":
            continue  # (kernels are counted through the op that launched them)
        parent, phase = event.cpu_parent, "fwd"
        while parent is not None:  # an op under the autograd engine's evaluate_function ran in the backward pass
            if parent.name.startswith("autograd::engine::evaluate_function"):
                phase = "bwd"
                break
            parent = parent.cpu_parent
        entry = totals.setdefault((event.name, phase), [0.0, 0])
        entry[0] += getattr(event, attr) / iters / 1e3
        entry[1] += 1
    rows = sorted(((name, phase, ms, calls // iters) for (name, phase), (ms, calls) in totals.items() if ms > 0),
                  key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    return {"step_ms": round(total, 3), "clock": "device" if x.is_cuda else "cpu",
            "ops": [{"op": name, "pass": phase, "ms": round(ms, 4), "share": round(ms / total, 4), "calls": calls}
                    for name, phase, ms, calls in rows[:top]]}


def load_baseline(path: str) -> type:
    """The ``MoE`` class of another version of ``lit_hsa/model/moe.py`` (e.g. ``git show REV:lit_hsa/model/moe.py``),
    to time against the current one in the same run."""
    spec = importlib.util.spec_from_file_location("moe_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MoE


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="8k,32k", help="tokens per step (batch × length), k suffix allowed")
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--expert-hidden", type=int, default=768)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/moe_<gpu>_<date>.json)")
    parser.add_argument("--profile", action="store_true", help="also profile each layer op by op (torch.profiler)")
    parser.add_argument("--baseline", default=None, help="a moe.py whose MoE is timed too (moe_baseline), same weights")
    parser.add_argument("--params", choices=("fp32", "bf16"), default="fp32",
                        help="fp32 weights under bf16 autocast (cast every step), or weights held in bf16")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    with torch.device(device):
        moe = MoE(args.d_model, args.experts, args.top_k, args.expert_hidden, n_shared_experts=1).train()
        # same active FLOPs per token: k routed experts + the shared one
        dense = SwiGLU(args.d_model, args.top_k * args.expert_hidden + args.expert_hidden).train()
    for w in (moe.w_gate, moe.w_up, moe.w_down):
        torch.nn.init.normal_(w, std=0.02)
    layers = [("moe_grouped", moe, "auto"), ("moe_loop", moe, "loop"), ("dense", dense, "auto")]
    if args.baseline:
        with torch.device(device):
            baseline = load_baseline(args.baseline)(args.d_model, args.experts, args.top_k, args.expert_hidden,
                                                     n_shared_experts=1).train()
        baseline.load_state_dict(moe.state_dict())
        layers.insert(1, ("moe_baseline", baseline, "auto"))
    if args.params == "bf16":
        for _, layer, _ in layers:
            layer.to(torch.bfloat16)
    rows = []
    for n in (parse_length(t) for t in args.tokens.split(",")):
        x = torch.randn(1, n, args.d_model, device=device, requires_grad=True)
        if args.params == "bf16":
            x = x.detach().bfloat16().requires_grad_(True)
        row = {"tokens": n}
        for name, layer, backend in layers:
            set_expert_backend(backend)
            try:
                row[f"{name}_ms"] = round(time_fwd_bwd(layer, x, args.warmup, args.iters), 3)
                if args.profile and name not in ("moe_loop", "moe_baseline"):
                    row.setdefault("profile", {})[name] = profile_fwd_bwd(layer, x)
            finally:
                set_expert_backend("auto")
        row["grouped_vs_dense"] = round(row["moe_grouped_ms"] / row["dense_ms"], 3)
        row["loop_vs_grouped"] = round(row["moe_loop_ms"] / row["moe_grouped_ms"], 3)
        if args.baseline:
            row["baseline_vs_dense"] = round(row["moe_baseline_ms"] / row["dense_ms"], 3)
        row["max_violation"] = round((moe.load_accum.max() / moe.load_accum.mean() - 1).item(), 3)
        moe.load_accum.zero_()
        rows.append(row)
    gpu = gpu_name(device)
    precision = ("bf16 weights" if args.params == "bf16" else "bf16 autocast") if device.type == "cuda" else "fp32"
    print(f"MoE layer fwd+bwd, {precision}, d {args.d_model}, {args.experts} experts × {args.expert_hidden}, top "
          f"{args.top_k} + shared; dense SwiGLU width {args.top_k * args.expert_hidden + args.expert_hidden} ({gpu})")
    base = " | baseline ms | baseline / dense" if args.baseline else ""
    print(f"| tokens | MoE grouped ms | MoE loop ms | dense ms | grouped / dense | loop / grouped{base} |")
    print("|---" * (6 + 2 * bool(args.baseline)) + "|")
    for r in rows:
        base = f" | {r['moe_baseline_ms']} | {r['baseline_vs_dense']}×" if args.baseline else ""
        print(f"| {r['tokens']} | {r['moe_grouped_ms']} | {r['moe_loop_ms']} | {r['dense_ms']} | "
              f"{r['grouped_vs_dense']}× | {r['loop_vs_grouped']}×{base} |")
    for r in rows if args.profile else []:
        for name, prof in r["profile"].items():
            print(f"\n{name}, {r['tokens']} tokens: {prof['step_ms']} ms of {prof['clock']} time per fwd+bwd, by op")
            print("| op | ms | share | calls | pass |\n|---|---|---|---|---|")
            for op in prof["ops"]:
                print(f"| {op['op'][:60]} | {op['ms']} | {op['share']:.1%} | {op['calls']} | {op['pass']} |")
    write_result(args.out or result_path("moe", device), {"gpu": gpu, "date": today(), "torch": torch.__version__,
                                                           "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
