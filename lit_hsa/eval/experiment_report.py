"""The report of ``main.py experiment``: every ``<run>.json`` of an experiment's folder combined into
``length_generalization.json`` (every metric as mean and spread over a model's seeds, the held-out perplexity ratio
to a reference model), ``summary.md`` and the plots ``accuracy_vs_length.png`` and ``loss_vs_position.png``."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

import numpy as np

from lit_hsa.eval.ruler import EvalRow, short_length


def spread(values: list[float]) -> dict:
    """mean, min, max and the sample standard deviation (0 for one value) over runs, and their number."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()),
            "max": float(v.max()), "n": len(v)}


def run_scalars(r: dict) -> dict[str, float]:
    """One run's scalar metrics: training (per phase too), evaluation time, held-out loss and perplexity."""
    t = r["train"]
    s = {"train_steps": t["steps"], "train_tokens": t["tokens"], "train_seconds": t["seconds"],
         "eval_seconds": r["eval_seconds"]}
    if "flops" in t:
        s.update(train_flops=t["flops"], flops_per_token=t["flops_per_token"])
    for p in t.get("phases", []):
        s.update({f"{p['name']}_{k}": p[k] for k in ("steps", "tokens", "seconds", "flops")})
    if r.get("perplexity"):
        s.update(heldout_loss=r["perplexity"]["loss"], heldout_ppl=r["perplexity"]["ppl"])
    return s


def accuracy_by_run(results: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """results → {task: {run: {length: accuracy averaged over depths and samples}}}."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    for res in results:
        rows = [EvalRow(**r) for r in res["retrieval"]]
        for task in sorted({r.task for r in rows}):
            per_length = table.setdefault(task, {}).setdefault(res.get("run", res["model"]), {})
            for n in sorted({r.length for r in rows if r.task == task}):
                per_length[n] = float(np.mean([r.accuracy for r in rows if (r.task, r.length) == (task, n)]))
    return table


def accuracy_stats(results: list[dict]) -> dict[str, dict[str, dict[int, dict]]]:
    """results → {task: {model: {length: spread of the runs' accuracies}}}."""
    model_of = {r.get("run", r["model"]): r["model"] for r in results}
    stats: dict = {}
    for task, per_run in accuracy_by_run(results).items():
        values: dict = {}
        for run, acc in per_run.items():
            for n, a in acc.items():
                values.setdefault(model_of[run], {}).setdefault(n, []).append(a)
        stats[task] = {m: {n: spread(v) for n, v in sorted(per.items())} for m, per in values.items()}
    return stats


def perplexity_stats(by_model: dict[str, list[dict]], reference: Optional[str]) -> dict:
    """{model: held-out loss and perplexity over its runs, and the ratio of its mean perplexity to the reference
    model's (the parity number; per seed too where both ran it)}. No ratio where the held-out windows differ."""
    stats = {}
    for model, runs in by_model.items():
        ppl = [r["perplexity"] for r in runs if r.get("perplexity")]
        if ppl:
            stats[model] = {"loss": spread([p["loss"] for p in ppl]), "ppl": spread([p["ppl"] for p in ppl]),
                            "windows": ppl[0]["windows"], "window_length": ppl[0]["window_length"],
                            "tokens_crc32": ppl[0]["tokens_crc32"],
                            "same_windows": len({p["tokens_crc32"] for p in ppl}) == 1}
    ref = stats.get(reference) if reference else None
    for model, s in stats.items():
        comparable = ref is not None and s["same_windows"] and ref["same_windows"] \
            and s["tokens_crc32"] == ref["tokens_crc32"]
        s["ratio_to_reference"] = s["ppl"]["mean"] / ref["ppl"]["mean"] if comparable else None
        ref_by_seed = {r.get("seed"): r["perplexity"]["ppl"] for r in by_model[reference] if r.get("perplexity")} \
            if comparable else {}
        paired = [r["perplexity"]["ppl"] / ref_by_seed[r.get("seed")] for r in by_model[model]
                  if r.get("perplexity") and r.get("seed") in ref_by_seed]
        s["ratio_by_seed"] = spread(paired) if paired else None
    return stats


def position_stats(by_model: dict[str, list[dict]]) -> dict:
    """{model: {length: [{from, to, loss: spread, ppl: spread}, ...]}} over the runs that measured that length."""
    stats: dict = {}
    for model, runs in by_model.items():
        for length in sorted({n for r in runs for n in r.get("perplexity_by_position", {})}, key=int):
            by_position = [r.get("perplexity_by_position", {}) for r in runs]
            measured = [p[length] for p in by_position if length in p]
            stats.setdefault(model, {})[length] = [
                {"from": b["from"], "to": b["to"], "loss": spread([m[i]["loss"] for m in measured]),
                 "ppl": spread([m[i]["ppl"] for m in measured])} for i, b in enumerate(measured[0])]
    return stats


def model_summary(runs: list[dict]) -> dict:
    """What a model's runs share (first run), which runs there are, and every scalar metric's spread over them."""
    scalars = [run_scalars(r) for r in runs]
    names = [k for k in scalars[0] if all(k in s for s in scalars)]
    first = runs[0]
    return {"runs": [r.get("run", r["model"]) for r in runs], "seeds": [r.get("seed") for r in runs],
            "train_seq_len": first["train_seq_len"], "overrides": first["overrides"],
            "parameters": first.get("parameters"), "device": first["device"], "date": max(r["date"] for r in runs),
            "metrics": {k: spread([s[k] for s in scalars]) for k in names}}


def summarize(out_dir: str | Path, reference_model: Optional[str] = None) -> Optional[dict]:
    """Combine every ``<run>.json`` in ``out_dir`` into ``length_generalization.json``, ``summary.md``,
    ``accuracy_vs_length.png`` (one panel per task, one line per model) and ``loss_vs_position.png``; every metric
    is the mean over a model's runs (seeds) with its spread. Returns the summary (None: no results)."""
    out = Path(out_dir)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    results = [r for r in results if "retrieval" in r and "model" in r]  # run results, not the summary itself
    if not results:
        return None
    by_model: dict[str, list[dict]] = {}
    for r in sorted(results, key=lambda r: (r["model"], r.get("seed") is not None, r.get("seed") or 0)):
        by_model.setdefault(r["model"], []).append(r)
    accuracy = accuracy_stats(results)
    summary = {"models": {m: model_summary(runs) for m, runs in by_model.items()},
               "reference_model": reference_model,
               "perplexity": perplexity_stats(by_model, reference_model),
               "perplexity_by_position": position_stats(by_model),
               "selection": selection_stats(by_model),
               "accuracy": {task: {m: {str(n): s["mean"] for n, s in acc.items()} for m, acc in per.items()}
                            for task, per in accuracy.items()},
               "accuracy_spread": {task: {m: {str(n): s for n, s in acc.items()} for m, acc in per.items()}
                                   for task, per in accuracy.items()}}
    (out / "length_generalization.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown_summary(summary, results))
    train_lengths = {m: s["train_seq_len"] for m, s in summary["models"].items()}
    if accuracy:
        plot_accuracy(accuracy, out / "accuracy_vs_length.png", train_lengths)
    if summary["perplexity_by_position"]:
        plot_positions(summary["perplexity_by_position"], out / "loss_vs_position.png", train_lengths)
    return summary


SELECTION_STATS = ("fusion_entropy", "far_share", "distance_mean", "empty_share")


def selection_stats(by_model: dict[str, list[dict]]) -> dict:
    """{model: {block: {stat: spread over seeds, "topk": k}}}: each HSA block's chunk selection at the end of training
    (the runs' last ``retrieval/block<i>_*`` metrics). Models without HSA blocks are left out."""
    out: dict = {}
    for model, runs in by_model.items():
        finals = [r["train"].get("final_metrics", {}) for r in runs]
        blocks = sorted({int(m.group(1)) for f in finals for k in f
                         if (m := re.fullmatch(r"retrieval/block(\d+)_fusion_entropy", k))})
        for b in blocks:
            stats = {stat: spread([f[key] for f in finals if (key := f"retrieval/block{b}_{stat}") in f])
                     for stat in SELECTION_STATS}
            topk = finals[0].get("schedule/hsa_topk") or runs[0].get("model_config", {}).get("hsa_topk")
            out.setdefault(model, {})[str(b)] = {**stats, "topk": None if topk is None else int(topk)}
    return out


def selection_table(selection: dict) -> list[str]:
    """The chunk selection table: the fusion weights' entropy beside that of uniform weights over the top-k chunks
    (ln k: a selection that tells its chunks apart sits well below it)."""
    if not selection:
        return []
    lines = ["Chunk selection at the end of training (per HSA block; mean (min–max) over seeds):", "",
             "| model | block | top-k | fusion entropy | uniform: ln k | beyond the window | mean distance (chunks) |",
             "|---|---|---|---|---|---|---|"]
    for model, blocks in selection.items():
        for b, s in blocks.items():
            uniform = f"{math.log(s['topk']):.2f}" if s["topk"] else "—"
            lines.append(f"| {model} | {b} | {s['topk'] or '—'} | {cell(s['fusion_entropy'])} | {uniform} | "
                         f"{cell(s['far_share'])} | {cell(s['distance_mean'], '.1f')} |")
    return lines + [""]


def cell(s: dict, fmt: str = ".2f") -> str:
    """A spread as 'mean' (one run) or 'mean (min–max)'."""
    return f"{s['mean']:{fmt}}" if s["n"] == 1 else f"{s['mean']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def markdown_summary(summary: dict, results: list[dict]) -> str:
    return "\n".join([*models_table(summary), *accuracy_markdown(summary["accuracy_spread"]),
                      *positions_table(summary["perplexity_by_position"]), *selection_table(summary["selection"]),
                      *run_lines(results)]) + "\n"


def models_table(summary: dict) -> list[str]:
    """Parameters, compute and held-out perplexity per model (mean (min–max) over seeds; ± the std)."""
    ref = summary["reference_model"]
    lines = [f"| model | seeds | parameters (active) | train tokens | FLOPs/token | train FLOPs | held-out loss | "
             f"held-out ppl | ppl / {ref or 'reference'} |", "|---|---|---|---|---|---|---|---|---|"]
    for model, s in summary["models"].items():
        m, p, ppl = s["metrics"], s["parameters"], summary["perplexity"].get(model)
        params = f"{p['total'] / 1e6:.2f}M ({p['active'] / 1e6:.2f}M)" if p else "—"
        flops = [f"{m[k]['mean']:.3g}" if k in m else "—" for k in ("flops_per_token", "train_flops")]
        loss = "—" if not ppl else cell(ppl["loss"], ".4f") + (f" ± {ppl['loss']['std']:.4f}"
                                                                 if ppl["loss"]["n"] > 1 else "")
        ratio = "—"
        if ppl and ppl["ratio_to_reference"] is not None:
            by_seed = ppl["ratio_by_seed"]
            ratio = f"{ppl['ratio_to_reference']:.4f}" + (f" ({by_seed['min']:.4f}–{by_seed['max']:.4f} by seed)"
                                                          if by_seed and by_seed["n"] > 1 else "")
        lines.append(f"| {model} | {len(s['runs'])} | {params} | {cell(m['train_tokens'], ',.0f')} | {flops[0]} | "
                     f"{flops[1]} | {loss} | {cell(ppl['ppl'], '.3f') if ppl else '—'} | {ratio} |")
    windows = [p for p in summary["perplexity"].values()]
    if windows:
        lines.append(f"\nHeld-out perplexity: {windows[0]['windows']} windows of {windows[0]['window_length']} tokens "
                     "of the held-out split; mean (min–max) ± std over seeds.")
    return lines + [""]


def accuracy_markdown(accuracy: dict) -> list[str]:
    """Retrieval accuracy by task, model and length (mean (min–max) over seeds)."""
    lengths = sorted({int(n) for per in accuracy.values() for acc in per.values() for n in acc})
    if not lengths:
        return []
    lines = ["| task | model | " + " | ".join(short_length(n) for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for task, per in accuracy.items():
        for model, acc in per.items():
            lines.append(f"| {task} | {model} | " + " | ".join(cell(acc[str(n)]) if str(n) in acc else "—"
                                                              for n in lengths) + " |")
    return lines + [""]


def positions_table(positions: dict) -> list[str]:
    """Loss by position of each model's longest held-out sequence."""
    if not positions:
        return []
    longest = {m: per[max(per, key=int)] for m, per in positions.items()}
    edges = sorted({b["to"] for rows in longest.values() for b in rows})
    lines = ["Loss by position (held-out sequence; bucket = positions up to the column's length):", "",
             "| model | " + " | ".join(f"<{short_length(n)}" for n in edges) + " |", "|---|" + "---|" * len(edges)]
    for model, rows in longest.items():
        by_edge = {b["to"]: b["loss"] for b in rows}
        lines.append(f"| {model} | " + " | ".join(cell(by_edge[n], ".3f") if n in by_edge else "—" for n in edges)
                     + " |")
    return lines + [""]


def run_lines(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        t = r["train"]
        phases = ", ".join(f"{p['name']} {p['steps']} steps" for p in t.get("phases", []))
        lines.append(f"- {r.get('run', r['model'])}: trained at {r['train_seq_len']} tokens, {t['steps']} steps"
                     + (f" ({phases})" if phases else "") + f", {t['tokens'] / 1e6:.1f}M tokens, {t['seconds']:.0f} s; "
                     f"eval {r['eval_seconds']:.0f} s ({r['device']}, {r['date']})")
    return lines


def plot_accuracy(accuracy: dict, path: Path, train_lengths: dict[str, int]) -> None:
    """One panel per task, one line per model (mean over seeds, min–max band)."""
    plt = pyplot()
    tasks = list(accuracy)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for model, acc in accuracy[task].items():
            lengths = sorted(acc)
            line, = ax.plot(lengths, [acc[n]["mean"] for n in lengths], marker="o", label=model)
            ax.fill_between(lengths, [acc[n]["min"] for n in lengths], [acc[n]["max"] for n in lengths],
                            color=line.get_color(), alpha=0.15, linewidth=0)
            ax.axvline(train_lengths[model], color=line.get_color(), linestyle=":", alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_title(task)
        ax.set_xlabel("context length (tokens); dotted: training length")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_positions(positions: dict, path: Path, train_lengths: dict[str, int]) -> None:
    """Held-out loss by position bucket, one line per model (its longest sequence; mean over seeds, min–max band),
    training length dotted: a loss that keeps falling past it is length generalisation."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for model, per in positions.items():
        rows = per[max(per, key=int)]
        ends = [b["to"] for b in rows]
        line, = ax.plot(ends, [b["loss"]["mean"] for b in rows], marker="o", label=model)
        ax.fill_between(ends, [b["loss"]["min"] for b in rows], [b["loss"]["max"] for b in rows],
                        color=line.get_color(), alpha=0.15, linewidth=0)
        ax.axvline(train_lengths[model], color=line.get_color(), linestyle=":", alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position bucket end (tokens); dotted: training length")
    ax.set_ylabel("next-token loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


