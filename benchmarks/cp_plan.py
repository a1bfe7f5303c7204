"""Communication and memory plan of context parallelism (issue #36): for a preset on N H200s (N = 1, 2, 4, 8; the
context group is all N GPUs and FSDP2 shards parameters, gradients and AdamW moments over the same N, as
``trainer.context_parallel=N`` with ``trainer.strategy=fsdp`` does), the bytes one rank moves per training step per
layer kind, its memory, the longest trainable sequence, and communication time against compute time.
A PREDICTION computed on the CPU (no GPU runs); batch 1, bf16-mixed, activation checkpointing.

    python benchmarks/cp_plan.py [--presets small,dense-0.5b,moe-8b-a1b] [--gpus 1,2,4,8] [--out ...json]

Bytes: read off ``lit_hsa/training/context_parallel.py`` as it is (``tests/training/test_cp_plan.py`` counts what the
real collectives pass in a 2- and 4-process gloo step and compares): every attention layer all-gathers its K and V
(one tensor) of the last ``min(W − 1, T/N)`` rows from every rank (N × that many rows; the whole slice for full
attention), again when activation checkpointing recomputes the block, and all-reduces the gathered buffer's gradient
in backward; the chunk memory's landmarks, K and V are all-gathered once per forward (outside the checkpointed units)
and all-reduced in backward; the whole sequence's document ids once (int64, no backward); the loss's target count
(one fp32 scalar). FSDP2: each unit's fp32 parameters all-gathered in forward and again in backward (the root's are
kept), fp32 gradients reduce-scattered. Wire bytes per rank (ring algorithms): all-gather and reduce-scatter
(N − 1)/N of the buffer, all-reduce 2(N − 1)/N, a point-to-point send its message. Time = wire bytes / NVLink
bandwidth (latency ignored: ~3 calls per layer per step). The PLANNED column (not implemented): the halo sent point to
point by the ranks the window reaches (≤ W − 1 rows), its gradient sent back; reduce-scatter instead of all-reduce in
backward; chunk K/V kept sharded and streamed ring-wise in forward and again in backward (landmarks still gathered).

Memory per rank: parameters, gradients and AdamW moments (4 + 4 + 8 bytes per parameter) / N; FSDP2's working set
(N > 1: two gathered fp32 units and one unsharded fp32 gradient); activations of T/N tokens from
``memory_plan.py`` (unit inputs, the recomputed unit MEASURED by saved-tensor hooks at the preset's widths, one loss
chunk); plus what spans the whole sequence on every rank: the chunk memory (landmarks, K, V) held, its gradient and,
for N > 1, the all-reduce's copy of it; the batch's input_ids, labels and doc_ids (every rank gets the whole batch
and slices it) and the gathered doc_ids (int64); the halo buffer of the recomputed block (N × rows, with its gradient
and copy). Not counted: CUDA context and fragmentation (the headroom), NCCL buffers.
"""
from __future__ import annotations

import argparse
import json
import sys

from common import RESULTS, write_result
from memory_plan import GB, activation_bytes, build_meta, fit_unit_activations

from lit_hsa.config import ModelConfig, parse_length  # noqa: E402
from lit_hsa.model.units import transformer_units  # noqa: E402
from lit_hsa.training.flops import training_flops_per_token  # noqa: E402

# NVIDIA H200 SXM datasheet: NVLink 4 at 900 GB/s per GPU, both directions together: 450 GB/s each way
NVLINK_BYTES_PER_S = 450e9
PEAK_FLOPS = 989e12  # H100 and H200 SXM, dense bf16 without sparsity (datasheets): the same compute
CAPACITY = 141e9  # H200 memory, bytes
HEADROOM = 0.10  # left free for the CUDA context, NCCL, allocator fragmentation
# Efficiency: the MFU measured for `small` at 256K (compiled, activation checkpointing, H100), used for every preset
MFU_FILE, MFU_LENGTH = "train_small_compile_h100_2026-11-25.json", 262144
# One-GPU peak-memory measurements of `small` (eager, activation checkpointing, batch 1, H100 80GB)
PEAK_FILE = "train_small_long_h100_2026-11-24.json"
TARGET = {"preset": "small", "gpus": 8, "tokens": parse_length("4m"), "overlap": 0.8}
ELEM = {"all_gather": lambda n: (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
        "all_reduce": lambda n: 2 * (n - 1) / n, "send": lambda n: 1.0}


def attention_layers(cfg: ModelConfig) -> list[tuple[str, int | None, int]]:
    """(kind, window or None for full attention, layers) of the layers that attend to earlier slices' K/V."""
    if cfg.attention == "full":
        return [("full", None, cfg.n_layers)]
    if cfg.attention == "swa":
        return [("swa", cfg.swa_window, cfg.n_layers)]
    layers = [("swa", cfg.swa_window, cfg.n_layers - cfg.n_groups)]
    if cfg.hsa_layer_swa:  # the HSA blocks' own SWA sub-layer
        layers.append(("hsa_swa", cfg.hsa_swa_window or cfg.swa_window, cfg.n_groups))
    return layers


def memory_parts(cfg: ModelConfig, tokens: int, elem: int = 2) -> dict[str, int]:
    """Bytes of the chunk memory of ``tokens`` tokens (one sequence): landmarks [C, Hr, Dr], K and V [C·S, Hkv, D]."""
    if cfg.attention != "hsa":
        return {}
    return {"landmarks": tokens // cfg.chunk_size * cfg.retrieval_heads * cfg.retrieval_head_dim * elem,
            "k": tokens * cfg.hsa_kv_heads * cfg.head_dim * elem, "v": tokens * cfg.hsa_kv_heads * cfg.head_dim * elem}


def collectives(cfg: ModelConfig, T: int, N: int, batch: int = 1, elem: int = 2, doc_ids: bool = True,
                checkpointing: bool = True) -> list[dict]:
    """The collectives ``context_parallel.py`` runs in one training step of a rank of N splitting ``batch``
    sequences of T tokens (activations of ``elem`` bytes): {layer, op, phase (forward | backward: recomputation
    and gradients), calls, bytes per call (an all-gather's whole output, an all-reduce's tensor)}."""
    if N == 1:
        return []  # no shard: the model runs as without context parallelism
    n, out = T // N, []
    for kind, window, layers in attention_layers(cfg):
        sent = n if window is None else min(window - 1, n)
        if sent == 0:
            continue
        buffer = N * batch * sent * cfg.n_kv_heads * 2 * cfg.head_dim * elem  # K and V concatenated: one gather
        out.append(dict(layer=kind, op="all_gather", phase="forward", calls=layers, bytes=buffer))
        if checkpointing:  # backward recomputes the block, its gather included
            out.append(dict(layer=kind, op="all_gather", phase="backward", calls=layers, bytes=buffer))
        out.append(dict(layer=kind, op="all_reduce", phase="backward", calls=layers, bytes=buffer))
    for part, size in memory_parts(cfg, T, elem).items():  # the memory is gathered outside the checkpointed units
        out.append(dict(layer="chunk_memory", op="all_gather", phase="forward", calls=1, bytes=batch * size))
        out.append(dict(layer="chunk_memory", op="all_reduce", phase="backward", calls=1, bytes=batch * size))
    if doc_ids:  # integers: no gradient
        out.append(dict(layer="doc_ids", op="all_gather", phase="forward", calls=1, bytes=batch * T * 8))
    out.append(dict(layer="loss", op="all_reduce", phase="forward", calls=1, bytes=4))  # the group's target count
    return out


def planned_collectives(cfg: ModelConfig, T: int, N: int, elem: int = 2) -> list[dict]:
    """PLANNED, not implemented: the halo point to point from the ranks the window reaches (its gradient sent
    back), reduce-scatter in backward, chunk K/V sharded and streamed ring-wise in forward and again in backward."""
    if N == 1:
        return []
    n, out = T // N, []
    for kind, window, layers in attention_layers(cfg):
        rows = (N - 1) * n if window is None else min(window - 1, (N - 1) * n)  # the last rank's reach
        message = rows * cfg.n_kv_heads * 2 * cfg.head_dim * elem
        out.append(dict(layer=kind, op="send", phase="forward", calls=layers, bytes=message))
        out.append(dict(layer=kind, op="send", phase="backward", calls=2 * layers, bytes=message))  # recompute, grad
    for part, size in memory_parts(cfg, T, elem).items():
        out.append(dict(layer="chunk_memory", op="all_gather", phase="forward", calls=1, bytes=size))
        if part != "landmarks":  # streamed again for backward, not held
            out.append(dict(layer="chunk_memory", op="all_gather", phase="backward", calls=1, bytes=size))
        out.append(dict(layer="chunk_memory", op="reduce_scatter", phase="backward", calls=1, bytes=size))
    out.append(dict(layer="doc_ids", op="all_gather", phase="forward", calls=1, bytes=T * 8))
    return out


def fsdp_collectives(sizes: dict, N: int) -> list[dict]:
    """FSDP2 over N ranks, fp32: parameters all-gathered per unit in forward and (the units', not the root's) again
    in backward; gradients reduce-scattered. Bytes: the whole model's, summed over its units."""
    if N == 1:
        return []
    return [dict(layer="fsdp", op="all_gather", phase="forward", calls=1, bytes=sizes["parameters"] * 4),
            dict(layer="fsdp", op="all_gather", phase="backward", calls=1, bytes=sizes["unit_parameters"] * 4),
            dict(layer="fsdp", op="reduce_scatter", phase="backward", calls=1, bytes=sizes["parameters"] * 4)]


def wire_bytes(entries: list[dict], N: int) -> dict[str, float]:
    """Bytes one rank receives per step, per layer kind (all its calls), ring algorithms."""
    per_layer: dict[str, float] = {}
    for e in entries:
        per_layer[e["layer"]] = per_layer.get(e["layer"], 0.0) + e["calls"] * e["bytes"] * ELEM[e["op"]](N)
    return per_layer


def layer_counts(cfg: ModelConfig, sizes: dict) -> dict[str, int]:
    """How many layers share each kind's wire bytes (to compare one layer's communication with its compute)."""
    counts = {kind: layers for kind, _, layers in attention_layers(cfg)}
    return {**counts, "chunk_memory": 1, "doc_ids": 1, "loss": 1, "fsdp": sizes["units"]}


def rank_memory(cfg: ModelConfig, sizes: dict, fit: dict, T: int, N: int, planned: bool = False) -> dict[str, float]:
    """Bytes on one rank of N training one sequence of T tokens (see the module's docstring)."""
    n = T // N
    act = activation_bytes(cfg, fit, sizes["units"], n)
    whole = memory_parts(cfg, T)
    # PLANNED: chunk K/V sharded (own slice, value and gradient, plus two slices in flight); landmarks gathered
    if planned and N > 1:
        chunk_memory = 3 * whole.get("landmarks", 0) + 4 * (whole.get("k", 0) + whole.get("v", 0)) / N
    else:  # held, its gradient, and the all-reduce's copy of the gradient (N > 1)
        chunk_memory = (3 if N > 1 else 2) * sum(whole.values())
    halo_rows = max([min(w - 1, n) if w else n for _, w, _ in attention_layers(cfg)] + [0])
    halo = 0 if N == 1 else (3 * N if not planned else 2) * halo_rows * cfg.n_kv_heads * 2 * cfg.head_dim * 2
    return {"parameters_grads_adamw": sizes["parameters"] * 16 / N,
            "fsdp_working": sizes["largest_unit"] * 4 * 3 if N > 1 else 0,
            "unit_inputs": act["checkpoint_inputs"], "recomputed_unit": act["unit_peak"],
            "loss_chunk": act["loss_chunk"],
            "chunk_memory_whole_sequence": chunk_memory, "batch_and_doc_ids": T * 8 * (4 if N > 1 else 3),
            "halo": halo}


def longest(cfg: ModelConfig, sizes: dict, fit: dict, N: int, headroom: float, planned: bool = False) -> int:
    """The largest T, a multiple of N × chunk size, whose memory per rank fits (1 − headroom) of an H200; 0: none."""
    step = N * (cfg.chunk_size if cfg.attention == "hsa" else 1)
    budget = CAPACITY * (1 - headroom)

    def fits(k: int) -> bool:
        return sum(rank_memory(cfg, sizes, fit, k * step, N, planned).values()) <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fits(lo), not fits(hi); memory grows with T
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


def measured_mfu() -> dict:
    """MFU of the committed one-GPU training measurement (``MFU_FILE``, ``small`` at ``MFU_LENGTH``)."""
    data = json.loads((RESULTS / MFU_FILE).read_text())
    row = next(r for r in data["rows"] if r["T"] == MFU_LENGTH)
    cfg, model = build_meta("small")
    flops = training_flops_per_token(cfg, model.num_parameters()[1], MFU_LENGTH)
    return {"file": MFU_FILE, "T": MFU_LENGTH, "gpu": data["gpu"], "tokens_per_s": row["hsa"]["tokens_per_s"],
            "mfu": row["hsa"]["tokens_per_s"] * flops / PEAK_FLOPS}


def timing(cfg: ModelConfig, sizes: dict, T: int, N: int, mfu: float) -> dict:
    """Per-step compute of a rank and, per layer kind, one layer's communication over one layer's compute (a unit's
    compute taken as the step's / units: FLOPs spread evenly over blocks and the chunk encoder), current and
    PLANNED."""
    compute = T / N * training_flops_per_token(cfg, sizes["active"], T) / (PEAK_FLOPS * mfu)
    per_unit = compute / sizes["units"]
    counts = layer_counts(cfg, sizes)
    out = {"compute_s": compute, "layers": {}}
    for label, entries in (("current", collectives(cfg, T, N)), ("planned", planned_collectives(cfg, T, N))):
        wires = wire_bytes(entries + fsdp_collectives(sizes, N), N)
        out[f"comm_{label}_s"] = sum(wires.values()) / NVLINK_BYTES_PER_S
        for layer, wire in wires.items():
            one = wire / counts[layer]
            row = out["layers"].setdefault(layer, {"layers": counts[layer]})
            row[f"{label}_bytes_per_layer"] = one
            row[f"{label}_comm_over_compute"] = one / NVLINK_BYTES_PER_S / per_unit
    out["compute_per_unit_s"] = per_unit
    return out


def one_gpu_check(fits: dict) -> list[dict]:
    """N = 1 predictions of ``small`` against the committed one-GPU peaks (no FSDP on one GPU)."""
    data = json.loads((RESULTS / PEAK_FILE).read_text())
    cfg, sizes, fit = fits["small"]
    rows = []
    for r in data["rows"] + data["longest"]:
        got = r["hsa"] if "hsa" in r else r
        # bench_train's batch is one int64 [T + 1] tensor (inputs and labels are views of it), not three [T]
        predicted = sum(rank_memory(cfg, sizes, fit, r["T"], 1).values()) - 2 * r["T"] * 8
        rows.append({"T": r["T"], "predicted_gib": round(predicted / 2**30, 2), "file": PEAK_FILE, "gpu": data["gpu"],
                     "measured_peak_gib": got.get("peak_gib"), "measured_oom": bool(got.get("oom")),
                     "predicted_fits_80gb": predicted <= 80e9})
    return rows


def model_sizes(preset: str) -> tuple[ModelConfig, dict]:
    cfg, model = build_meta(preset)
    units = transformer_units(model)
    counts = [sum(p.numel() for p in u.parameters()) for u in units]
    total, active = model.num_parameters()
    return cfg, {"parameters": total, "active": active, "units": len(units), "largest_unit": max(counts),
                 "unit_parameters": sum(counts)}


def plan(presets: list[str], gpus: list[int], headroom: float) -> dict:
    mfu = measured_mfu()
    fits, rows, layers = {}, [], []
    for preset in presets:
        cfg, sizes = model_sizes(preset)
        fit = fit_unit_activations(cfg)
        fits[preset] = (cfg, sizes, fit)
        previous = None  # (T, N) of the previous GPU count: growth per step against linear
        for N in gpus:
            T = longest(cfg, sizes, fit, N, headroom)
            planned = longest(cfg, sizes, fit, N, headroom, planned=True)
            row = {"preset": preset, "gpus": N, "longest_T": T, "longest_T_planned": planned,
                   "growth_vs_linear": round(T * previous[1] / (previous[0] * N), 3) if previous and previous[0]
                   else None}
            previous = (T, N)
            if T:
                mem = rank_memory(cfg, sizes, fit, T, N)
                t = timing(cfg, sizes, T, N, mfu["mfu"])
                row.update(memory_gb={k: round(v / GB, 3) for k, v in mem.items()},
                           gathered_memory_bytes=sum(memory_parts(cfg, T).values()),
                           collectives=collectives(cfg, T, N), planned_collectives=planned_collectives(cfg, T, N),
                           fsdp_collectives=fsdp_collectives(sizes, N), compute_s=round(t["compute_s"], 4),
                           comm_current_s=round(t["comm_current_s"], 5), comm_planned_s=round(t["comm_planned_s"], 5),
                           worst_layer_ratio=max((v.get("current_comm_over_compute", 0) for v in t["layers"].values()),
                                                 default=0.0), layers=t["layers"])
            rows.append(row)
        at = TARGET["tokens"] if preset == TARGET["preset"] else next(
            (r["longest_T"] for r in rows if r["preset"] == preset and r["gpus"] == max(gpus)), 0)
        if at and max(gpus) > 1:
            layers.append({"preset": preset, "gpus": max(gpus), "T": at,
                           **timing(cfg, sizes, at, max(gpus), mfu["mfu"])})
    result = {"kind": "prediction (CPU, no GPU run): benchmarks/cp_plan.py", "gpu": "H200 141GB (assumed)",
              "nvlink_bytes_per_s_each_way": NVLINK_BYTES_PER_S, "peak_flops_bf16": PEAK_FLOPS, "efficiency": mfu,
              "headroom": headroom, "target": TARGET, "rows": rows, "per_layer": layers}
    if "small" in fits:
        result["one_gpu_check"] = one_gpu_check(fits)
    target = next((r for r in rows if r["preset"] == TARGET["preset"] and r["gpus"] == TARGET["gpus"]), None)
    if target:
        at = next(x for x in layers if x["preset"] == TARGET["preset"])
        worst = max(v.get("current_comm_over_compute", 0) for v in at["layers"].values())
        worst_planned = max(v.get("planned_comm_over_compute", 0) for v in at["layers"].values())
        result["target_met"] = {"memory": target["longest_T"] >= TARGET["tokens"],
                                "worst_layer_comm_over_compute": round(worst, 4),
                                "worst_layer_comm_over_compute_planned": round(worst_planned, 4),
                                "comm_small_enough_to_hide": worst <= TARGET["overlap"],
                                "overlapped_now": False}
    return result


def fmt_tokens(T: int) -> str:
    return f"{T / 2**20:.2f}M" if T >= 2**20 else f"{T // 1024}K" if T else "does not fit"


def report(result: dict) -> None:
    e = result["efficiency"]
    print(f"PREDICTION (no GPU run). H200 141 GB, {result['headroom']:.0%} headroom; NVLink "
          f"{result['nvlink_bytes_per_s_each_way'] / 1e9:.0f} GB/s each way; {result['peak_flops_bf16'] / 1e12:.0f} "
          f"TFLOP/s bf16 × MFU {e['mfu']:.3f} (measured: {e['file']}, small at {e['T']}, {e['gpu']})\n")
    print("| preset | GPUs | longest T (current) | vs linear from the previous row | per-rank GB: state / activations "
          "/ whole-sequence | longest T (planned) | comm / compute per step | worst layer comm / compute |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        m = r.get("memory_gb", {})
        state = m.get("parameters_grads_adamw", 0) + m.get("fsdp_working", 0)
        acts = m.get("unit_inputs", 0) + m.get("recomputed_unit", 0) + m.get("loss_chunk", 0)
        whole = m.get("chunk_memory_whole_sequence", 0) + m.get("batch_and_doc_ids", 0) + m.get("halo", 0)
        ratio = f"{r['comm_current_s'] / r['compute_s']:.4f}" if r["longest_T"] else "-"
        print(f"| {r['preset']} | {r['gpus']} | {fmt_tokens(r['longest_T'])} | {r['growth_vs_linear'] or '-'} | "
              f"{state:.1f} / {acts:.1f} / {whole:.1f} | {fmt_tokens(r['longest_T_planned'])} (predicted) | {ratio} | "
              f"{r.get('worst_layer_ratio', 0):.4f} |")
    for x in result["per_layer"]:
        print(f"\n{x['preset']} on {x['gpus']} GPUs at {fmt_tokens(x['T'])}: compute {x['compute_s']:.2f} s per step "
              f"per rank ({x['compute_per_unit_s'] * 1e3:.1f} ms per unit); communication "
              f"{x['comm_current_s'] * 1e3:.1f} ms now (synchronous: not overlapped), "
              f"{x['comm_planned_s'] * 1e3:.1f} ms PLANNED")
        print("| layer kind | layers | MB per layer per step (current) | comm / compute (current) | MB per layer "
              "(planned) | comm / compute (planned) |\n|---|---|---|---|---|---|")
        for name, v in x["layers"].items():
            print(f"| {name} | {v['layers']} | {v.get('current_bytes_per_layer', 0) / 1e6:.2f} | "
                  f"{v.get('current_comm_over_compute', 0):.4f} | {v.get('planned_bytes_per_layer', 0) / 1e6:.2f} | "
                  f"{v.get('planned_comm_over_compute', 0):.4f} |")
    if "one_gpu_check" in result:
        print("\nN = 1 against the committed one-GPU peaks (small, eager, activation checkpointing):\n"
              "| T | predicted GiB | measured peak GiB |\n|---|---|---|")
        for c in result["one_gpu_check"]:
            got = "OOM (80 GB)" if c["measured_oom"] else c["measured_peak_gib"]
            print(f"| {fmt_tokens(c['T'])} | {c['predicted_gib']} | {got} |")
    if "target_met" in result:
        t = result["target_met"]
        print(f"\nTarget (small ≥ 4M tokens on 8 H200s; communication ≤ 80% of compute per layer): memory "
              f"{'MET' if t['memory'] else 'MISSED'}; worst layer comm/compute {t['worst_layer_comm_over_compute']} "
              f"({'small enough to hide' if t['comm_small_enough_to_hide'] else 'too large to hide'}), but the current "
              f"collectives are synchronous, so nothing is overlapped yet")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="small,dense-0.5b,moe-8b-a1b")
    parser.add_argument("--gpus", default="1,2,4,8")
    parser.add_argument("--headroom", type=float, default=HEADROOM)
    parser.add_argument("--out", default=str(RESULTS / "cp_plan_2026-12-07.json"))
    args = parser.parse_args()
    result = plan(args.presets.split(","), [int(g) for g in args.gpus.split(",")], args.headroom)
    report(result)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
