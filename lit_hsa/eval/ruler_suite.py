"""Scoring of RULER's synthetic tasks (``data_modules/ruler_tasks.py`` builds them): ``main.py eval --suite ruler``.
RULER's ``postprocess_pred`` then ``string_match_all`` (per sample the fraction of the references found in the
prediction, case-insensitive; mean × 100, rounded to 2 decimals), over samples answered greedily."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from data_modules.ruler_tasks import RulerSampler
from lit_hsa.eval.ruler import greedy_answer, short_length

# ------------------------------------------------------------------------------------------------ scoring


def postprocess_pred(predict_str: str) -> str:
    """RULER's evaluate.py: strip, control characters to newlines, strip."""
    predict_str = predict_str.strip()
    np_pattern = re.compile(r"[\x00-\x1f]")
    return np_pattern.sub("\n", predict_str).strip()


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    """RULER's metric for every synthetic task: per sample the fraction of its references found in the prediction
    (case-insensitive substring), averaged, × 100, rounded to 2 decimals."""
    score = sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref)
                 for pred, ref in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


@torch.no_grad()
def evaluate_ruler(model, tokenizer, tasks: list[str], lengths: list[int], samples: int = 4, seed: int = 42,
                   segment_size: int = 4096, device: str | torch.device = "cpu",
                   essay_words: list[str] | None = None) -> list[dict]:
    """RULER score (0-100) per (task, length) over ``samples`` samples, each answered greedily: the model continues
    ``input + answer_prefix`` (prefilled in segments) for up to tokens_to_generate tokens, stopping at EOS.
    Rows: {task, length, samples, score, predictions (each cut to 200 characters)}. Every haystack size is searched
    first, so a length too short (or too long) for a task fails before any decoding."""
    model.eval()
    sampler = RulerSampler(tokenizer, seed, essay_words)
    for task in tasks:
        for length in lengths:
            sampler.haystack_size(task, length)
    rows = []
    for task in tasks:
        for length in lengths:
            preds, refs = [], []
            for i in range(samples):
                sample = sampler.sample(task, length, i)
                ids = tokenizer.encode(sample.input + sample.answer_prefix)
                prompt = torch.as_tensor(np.asarray(ids), dtype=torch.long)
                text = greedy_answer(model, tokenizer, prompt, sample.tokens_to_generate, segment_size, device,
                                     stop_at_eos=True)
                preds.append(postprocess_pred(text))
                refs.append(sample.outputs)
            rows.append({"task": task, "length": length, "samples": samples, "score": string_match_all(preds, refs),
                         "predictions": [p[:200] for p in preds]})
    return rows


def ruler_averages(rows: list[dict]) -> dict:
    """RULER's summary: the mean score over tasks per length, and the mean of those over lengths."""
    lengths = sorted({r["length"] for r in rows})
    per_length = {n: round(float(np.mean([r["score"] for r in rows if r["length"] == n])), 2) for n in lengths}
    return {"per_length": per_length, "overall": round(float(np.mean(list(per_length.values()))), 2)}


def plot_ruler(rows: list[dict], out_dir: Path, suite: str = "ruler", ylabel: str = "RULER score") -> str:
    """<suite>_vs_length.png: score (0-100) vs length, one line per task and the average (dashed) → the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 11 tasks: tab10 would repeat a colour
    for task in dict.fromkeys(r["task"] for r in rows):
        ax.plot(lengths, [next(r["score"] for r in rows if (r["task"], r["length"]) == (task, n)) for n in lengths],
                marker="o", label=task)
    average = ruler_averages(rows)["per_length"]
    ax.plot(lengths, [average[n] for n in lengths], "k--", marker="s", label="average")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [short_length(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / f"{suite}_vs_length.png", dpi=120)
    plt.close(fig)
    return f"{suite}_vs_length.png"
