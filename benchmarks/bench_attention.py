"""Attention benchmark: HSA (Triton) vs SDPA causal vs flex_attention sliding window (vs fla NSA when importable).

    python benchmarks/bench_attention.py [--quick] [--out results.json] [--md results.md]

On one GPU, B=1, Hq=16, D=128, chunk 64, bf16: forward and forward+backward time (median of several reps, CUDA
events) and peak memory for every T in 4K … 1M, Hkv ∈ {1, 4}, top-k ∈ {8, 64} and two index layouts:
- ``random``: every token picks k distinct past chunks uniformly at random (worst case for any kernel);
- ``locality``: each group of 64 consecutive tokens (= one chunk of queries) shares one set of k distinct past
  chunks, drawn half uniformly and half log-uniformly in distance (recency bias), as trained retrieval tends to.
The HSA rows time the attention op with given indices and weights (its preprocessing — sorts of the indices and
the strategy choice — included; ``prep_ms``/``fwd_kernel_ms`` split the forward, ``strategy`` says which kernels ran);
chunk selection is timed in its own rows (``select``). SDPA is
skipped past 128K (quadratic). Out-of-memory is recorded as ``"oom"``. The table gives ratios against SDPA and
flex SWA-512 from the same run. ``--merge a.json b.json`` combines partial runs into one JSON/markdown.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch
from common import sync, time_ms, today, write_result

from lit_hsa.kernels.hsa import select_chunks, select_chunks_reference

HQ, D, S = 16, 128, 64
ALL_T = [4096, 16384, 65536, 131072, 262144, 1048576]
QUICK_T = [4096, 16384]
SDPA_MAX_T = 131072


# ---------------------------------------------------------------------------------------------- problem data


def _sample_distinct(n_vis: torch.Tensor, K: int, recency: bool, gen: torch.Generator) -> torch.Tensor:
    """n_vis: [R] visible chunk counts → [R, K] int32 distinct chunk ids in [0, n_vis), sorted descending, −1 in
    the slots left over when fewer than K chunks are visible. ``recency``: half the draws log-uniform in distance
    from the newest visible chunk, half uniform; otherwise all uniform."""
    R, dev = n_vis.shape[0], n_vis.device
    ar = torch.arange(K, device=dev)
    few = n_vis <= K  # every visible chunk is taken
    out = torch.where(few[:, None] & (ar[None] < n_vis[:, None]), ar[None].expand(R, K), -1)
    # Rows with a few more visible chunks than K: the K largest of random keys (rejection would crawl there).
    mid = (~few & (n_vis <= 4 * K)).nonzero().squeeze(1)
    if mid.numel():
        keys = torch.rand(mid.shape[0], 4 * K, device=dev, generator=gen)
        keys = keys.masked_fill(torch.arange(4 * K, device=dev)[None] >= n_vis[mid][:, None], -1.0)
        out[mid] = keys.topk(K, dim=1).indices
    rows = (n_vis > 4 * K).nonzero().squeeze(1)
    if rows.numel():
        nv = n_vis[rows][:, None]
        n = nv.float()

        def draw(shape):
            u = torch.rand(shape, device=dev, generator=gen) * n
            if recency:
                dist = torch.floor(torch.pow(n, torch.rand(shape, device=dev, generator=gen))) - 1
                u = torch.where(torch.rand(shape, device=dev, generator=gen) < 0.5, u, n - 1 - dist)
            return u.long().clamp(min=0).minimum(nv - 1)

        x = draw((rows.shape[0], K))
        for _ in range(200):  # redraw duplicates until every row is distinct
            x = x.sort(dim=1).values
            dup = torch.zeros_like(x, dtype=torch.bool)
            dup[:, 1:] = x[:, 1:] == x[:, :-1]
            if not dup.any():
                break
            x = torch.where(dup, draw(x.shape), x)
        x = x.sort(dim=1).values
        dup = torch.zeros_like(x, dtype=torch.bool)
        dup[:, 1:] = x[:, 1:] == x[:, :-1]
        out[rows] = x.masked_fill(dup, -1)
    return out.sort(dim=1, descending=True).values.to(torch.int32)


def make_indices(T: int, Hkv: int, K: int, layout: str, seed: int = 0, device="cuda") -> torch.Tensor:
    """[1, T, Hkv, K] int32 chunk ids (most recent first, −1 empty) of past chunks (chunk i visible iff t ≥ (i+1)·S)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if layout == "random":
        n_vis = (torch.arange(T, device=device) // S).repeat_interleave(Hkv)
        return _sample_distinct(n_vis, K, False, gen).view(1, T, Hkv, K)
    # locality: one draw per (query chunk, head), shared by its 64 tokens (they see the same past chunks)
    n_grp = T // S
    n_vis = torch.arange(n_grp, device=device).repeat_interleave(Hkv)
    sets = _sample_distinct(n_vis, K, True, gen).view(1, n_grp, 1, Hkv, K)
    return sets.expand(1, n_grp, S, Hkv, K).reshape(1, T, Hkv, K)


def make_weights(idx: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=idx.device).manual_seed(seed + 1)
    s = torch.randn(idx.shape, device=idx.device, generator=gen).masked_fill(idx < 0, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0).to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------- timing


def time_within(fn, budget_ms: float = 1500.0, max_reps: int = 20, min_reps: int = 3) -> float:
    """Median over reps of CUDA-event time; one warm-up call first (compilation, autotuning, allocator), then one
    timed call that sets the number of reps to fit ``budget_ms`` (between ``min_reps`` and ``max_reps``)."""
    first = time_ms(fn, warmup=1, iters=1, device="cuda", cuda_events=True)
    reps = int(max(min_reps, min(max_reps, budget_ms / max(first, 1e-3))))
    return time_ms(fn, warmup=0, iters=reps, device="cuda", cuda_events=True)


def measure(fwd, fwdbwd, budget_ms) -> dict:
    """{'fwd_ms', 'fwdbwd_ms', 'peak_gib'} or {'status': 'oom'}; peak = max allocated during one fwd+bwd."""
    out = {}
    try:
        out["fwd_ms"] = time_within(fwd, budget_ms)
        sync("cuda")
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwdbwd()
        sync("cuda")
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        out["fwdbwd_ms"] = time_within(fwdbwd, budget_ms)
        out["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        out = {"status": "oom"}
    except Exception as exc:  # a baseline that cannot run at this size is recorded, not fatal
        out = {"status": f"error: {type(exc).__name__}: {str(exc)[:200]}"}
    gc.collect()
    torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------- methods


def profile_table(fn, rows: int = 15) -> str:
    """GPU kernels of one fn() call, by device time (fn runs twice first: compilation, allocator)."""
    fn(), fn()
    sync("cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        sync("cuda")
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60)


def bench_hsa(q, k, v, do, idx, w, budget_ms, profile: bool = False) -> dict:
    from lit_hsa.kernels.hsa.triton_attention import _strategy, build_plan, hsa_attention_triton

    leaves = [x.detach().requires_grad_(True) for x in (q, k, v, w)]

    def fwd():
        with torch.no_grad():
            return hsa_attention_triton(q, k, v, w, idx)

    def fwdbwd():
        o = hsa_attention_triton(*leaves, idx)
        return torch.autograd.grad(o, leaves, do)

    res = measure(fwd, fwdbwd, budget_ms)
    if profile and res.get("status") == "ok":
        print(profile_table(fwdbwd), flush=True)
    if res.get("status") == "ok":
        try:
            plan = build_plan(idx, k.shape[1] // S)
            res["strategy"] = _strategy(plan, q.shape[2] // k.shape[2])

            def fwd_k():  # plan already built and cached: kernel time only
                with torch.no_grad():
                    return hsa_attention_triton(q, k, v, w, idx, plan=plan)

            res["fwd_kernel_ms"] = time_within(fwd_k, budget_ms / 2)
            res["prep_ms"] = res["fwd_ms"] - res["fwd_kernel_ms"]
            del plan
        except torch.cuda.OutOfMemoryError:
            pass
    gc.collect()
    torch.cuda.empty_cache()
    return res


def bench_sdpa(q, k, v, do, budget_ms) -> dict:
    import torch.nn.functional as F

    G = q.shape[2] // k.shape[2]
    qt, dot = q.transpose(1, 2), do.transpose(1, 2)
    # Expanded K/V (the flash backend is the fastest causal SDPA; GQA is expanded outside the timed region).
    kt = k.transpose(1, 2).repeat_interleave(G, 1)
    vt = v.transpose(1, 2).repeat_interleave(G, 1)
    leaves = [x.detach().requires_grad_(True) for x in (qt, kt, vt)]

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    def fwdbwd():
        o = F.scaled_dot_product_attention(*leaves, is_causal=True)
        return torch.autograd.grad(o, leaves, dot)

    return measure(fwd, fwdbwd, budget_ms)


_FLEX = {}


def bench_flex(q, k, v, do, window: int, budget_ms) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = 64  # one graph per (T, window, Hkv): never fall back to eager
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    T = q.shape[1]

    def swa(b, h, qi, ki):
        return (qi >= ki) & (qi - ki < window)

    bm = create_block_mask(swa, None, None, T, T, device=q.device, _compile=True)
    qt, kt, vt, dot = (x.transpose(1, 2) for x in (q, k, v, do))
    leaves = [x.detach().requires_grad_(True) for x in (qt, kt, vt)]
    fn = _FLEX["fn"]

    def fwd():
        with torch.no_grad():
            return fn(qt, kt, vt, block_mask=bm, enable_gqa=True)

    def fwdbwd():
        o = fn(*leaves, block_mask=bm, enable_gqa=True)
        return torch.autograd.grad(o, leaves, dot)

    t0 = time.time()
    res = measure(fwd, fwdbwd, budget_ms)
    res["wall_s_incl_compile"] = round(time.time() - t0, 1)
    return res


def bench_nsa(q, k, v, do, idx, budget_ms) -> dict:
    try:
        from fla.ops.nsa import parallel_nsa  # type: ignore
    except Exception as exc:
        return {"status": f"skipped: fla NSA not importable ({type(exc).__name__})"}
    block_indices = idx.long().clamp(min=0)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    K = idx.shape[-1]
    try:

        def fwd():
            with torch.no_grad():
                return parallel_nsa(q, k, v, block_indices=block_indices, block_counts=K, block_size=S)

        def fwdbwd():
            o = parallel_nsa(*leaves, block_indices=block_indices, block_counts=K, block_size=S)
            return torch.autograd.grad(o, leaves, do)

        return measure(fwd, fwdbwd, budget_ms)
    except Exception as exc:
        return {"status": f"error: {type(exc).__name__}: {str(exc)[:200]}"}


def bench_select(T, Hkv, K, budget_ms, reference=False) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(7)
    q_slc = torch.randn(1, T, Hkv, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    lmk = torch.randn(1, T // S, Hkv, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    sel = select_chunks_reference if reference else select_chunks
    leaves = [x.detach().requires_grad_(True) for x in (q_slc, lmk)]

    def fwd():
        with torch.no_grad():
            return sel(q_slc, lmk, K, S)

    def fwdbwd():
        s, _ = sel(*leaves, K, S)
        up = torch.ones_like(s).masked_fill(torch.isinf(s), 0)
        return torch.autograd.grad(s.masked_fill(torch.isinf(s), 0), leaves, up)

    return measure(fwd, fwdbwd, budget_ms)


# ---------------------------------------------------------------------------------------------- driver


def device_meta() -> dict:
    import triton

    p = torch.cuda.get_device_properties(0)
    return {
        "gpu": p.name,
        "sms": p.multi_processor_count,
        "mem_gib": round(p.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": today(),
        "B": 1, "Hq": HQ, "D": D, "chunk": S, "dtype": "bf16",
    }


def run(args) -> dict:
    meta = device_meta()
    rows = []
    out_path = Path(args.out) if args.out else None
    methods = set(args.methods.split(","))

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out_path:
            write_result(out_path, {"meta": meta, "rows": rows}, indent=1, quiet=True)

    budget = args.budget_ms
    for T in args.T:
        for Hkv in args.hkv:
            gen = torch.Generator(device="cuda").manual_seed(T + Hkv)
            q = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            k = torch.randn(1, T, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            v = torch.randn(1, T, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            do = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            base = {"T": T, "Hkv": Hkv}
            if "sdpa" in methods and T <= SDPA_MAX_T:
                emit({**base, "method": "sdpa_causal", **bench_sdpa(q, k, v, do, budget)})
            for W in (512, 4096):
                if f"flex{W}" in methods:
                    emit({**base, "method": f"flex_swa{W}", **bench_flex(q, k, v, do, W, budget)})
            for K in args.topk:
                for layout in args.layouts:
                    try:
                        idx = make_indices(T, Hkv, K, layout, seed=T + K)
                        w = make_weights(idx, seed=T + K)
                    except torch.cuda.OutOfMemoryError:
                        emit({**base, "method": "hsa_triton", "topk": K, "layout": layout, "status": "oom"})
                        continue
                    if "hsa" in methods:
                        emit({**base, "method": "hsa_triton", "topk": K, "layout": layout,
                              **bench_hsa(q, k, v, do, idx, w, budget, args.profile)})
                    if "nsa" in methods:
                        emit({**base, "method": "fla_nsa", "topk": K, "layout": layout,
                              **bench_nsa(q, k, v, do, idx, budget)})
                    del idx, w
                    gc.collect()
                    torch.cuda.empty_cache()
                if "select" in methods:
                    emit({**base, "method": "select_chunks", "topk": K, **bench_select(T, Hkv, K, budget)})
                if "select_ref" in methods and T <= args.select_ref_max_t:
                    emit({**base, "method": "select_chunks_reference", "topk": K,
                          **bench_select(T, Hkv, K, budget, reference=True)})
            del q, k, v, do
            gc.collect()
            torch.cuda.empty_cache()
    return {"meta": meta, "rows": rows}


def _fmt(x, nd=2):
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    return f"{x:.{nd}f}" if x < 100 else f"{x:.0f}"


def _t_label(T):
    return f"{T // 1048576}M" if T >= 1048576 else f"{T // 1024}K"


def markdown(res: dict) -> str:
    meta, rows = res["meta"], res["rows"]
    lines = [
        f"# Attention benchmark — {meta['gpu']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}; B=1, Hq={meta['Hq']}, D={meta['D']}, chunk {meta['chunk']}, "
        f"{meta['dtype']}. Milliseconds, median; `fwd / fwd+bwd`; peak = GiB allocated during fwd+bwd (inputs "
        "included). Ratios from the same run: `×SDPA` = SDPA fwd+bwd / HSA fwd+bwd (higher is better); "
        "`/SWA512` = HSA fwd+bwd / flex SWA-512 fwd+bwd (lower is better; 1.0 = same time as SWA with the same "
        "keys per query at top-8).",
        "",
    ]

    def get(method, T, Hkv, **kw):
        for r in rows:
            if r["method"] == method and r["T"] == T and r["Hkv"] == Hkv and all(r.get(a) == b for a, b in kw.items()):
                return r
        return None

    def pair(r):
        if r is None:
            return "—"
        if r.get("status") != "ok":
            return r.get("status", "—").split(":")[0]
        return f"{_fmt(r['fwd_ms'])} / {_fmt(r['fwdbwd_ms'])}"

    Ts = sorted({r["T"] for r in rows})
    for Hkv in sorted({r["Hkv"] for r in rows}):
        for K in sorted({r["topk"] for r in rows if "topk" in r}):
            lines += [
                f"## Hkv={Hkv} (ratio {meta['Hq'] // Hkv}:1), top-{K}",
                "",
                "| T | HSA random | peak | HSA locality | peak | SDPA causal | flex SWA-512 | flex SWA-4096 | "
                "×SDPA rand / loc | /SWA512 rand / loc |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for T in Ts:
                hr, hl = get("hsa_triton", T, Hkv, topk=K, layout="random"), get("hsa_triton", T, Hkv, topk=K,
                                                                                   layout="locality")
                sd, f5, f4 = get("sdpa_causal", T, Hkv), get("flex_swa512", T, Hkv), get("flex_swa4096", T, Hkv)

                def ratio(a, b, inv=False):
                    if not a or not b or a.get("status") != "ok" or b.get("status") != "ok":
                        return "—"
                    x = b["fwdbwd_ms"] / a["fwdbwd_ms"] if inv else a["fwdbwd_ms"] / b["fwdbwd_ms"]
                    return f"{x:.2f}"

                def peak(r):
                    return _fmt(r.get("peak_gib")) if r and r.get("status") == "ok" else "—"

                lines.append(
                    f"| {_t_label(T)} | {pair(hr)} | {peak(hr)} | {pair(hl)} | {peak(hl)} | {pair(sd)} | {pair(f5)} | "
                    f"{pair(f4)} | {ratio(hr, sd, True)} / {ratio(hl, sd, True)} | {ratio(hr, f5)} / {ratio(hl, f5)} |"
                )
            lines.append("")
    sel = [r for r in rows if r["method"].startswith("select_chunks")]
    if sel:
        lines += ["## Chunk selection (`select_chunks`, Dr=128, bf16 inputs)", "",
                  "| T | Hkv | top-k | path | fwd / fwd+bwd ms | peak GiB |", "|---|---|---|---|---|---|"]
        for r in sorted(sel, key=lambda r: (r["Hkv"], r["topk"], r["T"], r["method"])):
            path = "reference (block 1024)" if r["method"].endswith("reference") else "fast (GPU)"
            lines.append(f"| {_t_label(r['T'])} | {r['Hkv']} | {r['topk']} | {path} | {pair(r)} | "
                         f"{_fmt(r.get('peak_gib')) if r.get('status') == 'ok' else '—'} |")
        lines.append("")
    parts = [r for r in rows if r["method"] == "hsa_triton" and r.get("fwd_kernel_ms") is not None]
    if parts:
        lines += ["## HSA time split (prep = sorts of the indices + strategy choice; bwd = fwd+bwd − fwd)", "",
                  "| T | Hkv | top-k | layout | strategy | prep | fwd kernel | bwd |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(parts, key=lambda r: (r["Hkv"], r["topk"], r["layout"], r["T"])):
            lines.append(f"| {_t_label(r['T'])} | {r['Hkv']} | {r['topk']} | {r['layout']} | {r['strategy']} | "
                         f"{_fmt(r['prep_ms'])} | {_fmt(r['fwd_kernel_ms'])} | {_fmt(r['fwdbwd_ms'] - r['fwd_ms'])} |")
        lines.append("")
    nsa = [r for r in rows if r["method"] == "fla_nsa"]
    if nsa:
        lines.append(f"fla NSA: {nsa[0].get('status')}")
    return "\n".join(lines) + "\n"


def tune(args) -> None:
    """Time the forward and backward kernels alone (plan prebuilt) for strategy/tile variants; one JSON line each."""
    from lit_hsa.kernels.hsa import triton_attention as ta

    V = []  # (pass, strategy, CONFIG overrides)
    V += [("fwd", "chunk", {"fwd": dict(rows=r, seg_rows=sr, num_warps=w, num_stages=st)})
          for r, sr, w, st in ((64, 512, 4, 1), (64, 256, 4, 1), (64, 1024, 4, 1), (32, 512, 4, 1), (128, 512, 8, 1))]
    V += [("fwd", "query", {"fwd_qm": dict(rows=r, num_warps=w, num_stages=st)})
          for r, w, st in ((64, 4, 2), (64, 8, 2), (128, 8, 2))]
    V += [("bwd", "chunk", {"bwd": dict(rows=r, seg_rows=sr, num_warps=w, num_stages=st)})
          for r, sr, w, st in ((64, 1024, 4, 2), (64, 2048, 4, 2), (64, 512, 4, 2), (64, 1024, 4, 3),
                               (64, 1024, 8, 2), (128, 2048, 8, 2))]
    V += [("bwd", "query", {"bwd_qm": dict(rows=r, num_warps=w, num_stages=st)})
          for r, w, st in ((64, 4, 2), (64, 8, 2), (128, 8, 2))]
    V += [("fwd", "chunk", {"reduce": dict(rows=r, num_warps=w, num_stages=st)})
          for r, w, st in ((64, 4, 1), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (256, 8, 2), (32, 2, 2))]
    # chunk-major partial buffer size (token slabs): more slabs = less memory, more K/V loads and items
    V += [(pas, "chunk", {"partial_budget": x}) for pas in ("fwd", "bwd") for x in (0.25, 0.5, 1.0, 2.0, 4.0)]
    default = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ta.CONFIG.items()}
    T = args.T[0] if args.T else 131072
    scale = 1 / math.sqrt(D)
    for Hkv in args.hkv:
        G = HQ // Hkv
        gen = torch.Generator(device="cuda").manual_seed(1)
        q, do = (torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
        k, v = (torch.randn(1, T, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
        for K in args.topk:
            for layout in args.layouts:
                idx = make_indices(T, Hkv, K, layout, seed=3)
                w = make_weights(idx)
                plan = ta.build_plan(idx, T // S)
                auto = ta._strategy(plan, G)
                for pas, strategy, cfg in V:
                    ta.CONFIG.update(cfg)
                    if pas == "fwd":
                        fn = functools.partial(ta._forward, q, k, v, w, plan, S, scale, strategy)
                    else:
                        fn = functools.partial(ta._backward, q, k, v, w, do, plan, S, scale, strategy)
                    try:
                        ms = time_within(fn, 300)
                    except Exception as exc:
                        ms = f"error {type(exc).__name__}: {str(exc)[:160]}"
                    ta.CONFIG.update({key: default[key] for key in cfg})
                    print(json.dumps({"tune": pas, "strategy": strategy, "T": T, "Hkv": Hkv, "topk": K,
                                      "layout": layout, "auto": auto, **cfg, "ms": ms}), flush=True)
                del plan, idx, w
                torch.cuda.empty_cache()
        del q, do, k, v
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T = 4K and 16K only, shorter timing budget")
    ap.add_argument("--profile", action="store_true", help="print the GPU kernels of one HSA forward+backward per row")
    ap.add_argument("--out", help="JSON path (rewritten after every row)")
    ap.add_argument("--md", help="markdown table path")
    ap.add_argument("--T", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--hkv", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    ap.add_argument("--topk", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64])
    ap.add_argument("--layouts", type=lambda s: s.split(","), default=["random", "locality"])
    ap.add_argument("--methods", default="hsa,sdpa,flex512,flex4096,nsa,select,select_ref")
    ap.add_argument("--select-ref-max-t", type=int, default=131072)
    ap.add_argument("--budget-ms", type=float, default=1000.0, help="timing budget per measurement")
    ap.add_argument("--merge", nargs="+", help="combine these JSON files (later rows win) instead of running")
    ap.add_argument("--tune", action="store_true",
                    help="time strategy/tile variants of the kernels alone at the first --T (default 128K)")
    args = ap.parse_args(argv)
    if args.tune:
        return tune(args)
    if args.merge:
        meta, rows = None, {}
        for p in args.merge:
            part = json.loads(Path(p).read_text())
            meta = meta or part["meta"]
            for r in part["rows"]:
                rows[(r["method"], r["T"], r["Hkv"], r.get("topk"), r.get("layout"))] = r
        res = {"meta": meta, "rows": list(rows.values())}
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_attention.py needs a CUDA GPU")
        if args.T is None:
            args.T = QUICK_T if args.quick else ALL_T
        if args.quick:
            args.budget_ms = min(args.budget_ms, 300.0)
        res = run(args)
    if args.out:
        write_result(args.out, res, indent=1)
    md = markdown(res)
    if args.md:
        Path(args.md).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
