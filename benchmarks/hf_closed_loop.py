"""Closed loop through the Hugging Face format, with no download (issue 25): train a full-attention model with
lit-hsa on the embedded corpus, export it to HF format, import it with ``--to hsa``, continue training it with the
shipped recipe (``configs/convert/hsa_from_dense.yaml``), and compare.

    python benchmarks/hf_closed_loop.py [--scale gpu|cpu] [--work /tmp/hf_closed_loop] [--out DIR]

Every step is the command a user runs (``python main.py fit | export | convert``) in a subprocess. Measured, on the
same held-out windows of the training length: the dense model's loss, the converted model's at conversion and after
continued training (goal: within 2% of the dense model's); and single / multi-query NIAH accuracy at 1×, 4× and 16×
the training length for both (the dense model's RoPE attention stops at its training length; HSA retrieves past its
sliding window through its chunk memory). Prints a table, writes ``hf_closed_loop_<gpu>_<date>.json`` and a plot.
``--scale cpu`` runs the same chain at toy size in a few minutes (a plumbing check, not a result).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, gpu_name, result_path, write_result

from lit_hsa.checkpoint_io import load_model
from lit_hsa.config import DataConfig
from lit_hsa.eval.perplexity import held_out_perplexity
from lit_hsa.eval.ruler import evaluate_retrieval
from lit_hsa.eval.run import held_out_tokens


def scale(data: list[str], dense: list[str], convert: list[str], continued: list[str], **evaluation) -> dict:
    """One scale's overrides: ``data`` for both trainings (the continuation reads the dense model's data), then
    each training's own, the conversion's, and the evaluation settings."""
    return {"dense": [*data, *dense], "convert": convert, "continue": [*data, *continued], **evaluation}


# Model, data and budget per scale. Both models see retrieval tasks in training (the dense one learns NIAH within
# its training length), so the comparison beyond it isolates what the architecture adds.
SCALES = {
    "gpu": scale(
        data=["data.seq_len=1024", "data.batch_size=64", "data.num_workers=4", "data.synthetic_fraction=0.5",
              "data.synthetic_tasks=[niah_single,niah_multiquery,self_copy]", "data.answer_loss_weight=10.0"],
        dense=["model.d_model=384", "model.n_heads=6", "model.n_kv_heads=2", "model.head_dim=64",
               "model.n_lower_layers=8", "model.n_groups=0", "model.swa_layers_per_group=0", "model.ffn_hidden=1536",
               "model.qk_norm=true", "optim.lr=5e-4", "trainer.max_steps=3000", "trainer.max_time=00:00:03:00",
               "trainer.precision=bf16-mixed", "trainer.val_check_interval=1000"],
        convert=["model.swa_window=128", "model.chunk_size=64", "model.hsa_topk=8", "model.hsa_kv_heads=1"],
        continued=["trainer.topk_schedule=[[0,16],[300,8]]", "trainer.max_steps=1500", "trainer.max_time=00:00:02:00",
                   "trainer.accumulate_grad_batches=1", "trainer.activation_checkpointing=false",
                   "trainer.val_check_interval=500", "optim.warmup_steps=50"],
        eval_windows=64, lengths=[1024, 4096, 16384], samples=4, tasks=["niah_single", "niah_multiquery"]),
    "cpu": scale(
        data=["data.seq_len=256", "data.batch_size=4", "data.num_workers=1", "data.synthetic_fraction=0.5",
              "data.synthetic_tasks=[niah_single,self_copy]", "data.val_samples=2"],
        dense=["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
               "model.n_lower_layers=4", "model.n_groups=0", "model.swa_layers_per_group=0", "model.ffn_hidden=128",
               "model.moe=false", "trainer.max_steps=20", "trainer.val_check_interval=20",
               "trainer.limit_val_batches=1"],
        convert=["model.swa_window=64", "model.chunk_size=32", "model.hsa_topk=2", "model.hsa_kv_heads=1"],
        continued=["trainer.topk_schedule=[[0,8],[10,2]]", "trainer.max_steps=20", "trainer.precision=32-true",
                   "trainer.accumulate_grad_batches=1", "trainer.activation_checkpointing=false",
                   "trainer.val_check_interval=20", "trainer.limit_val_batches=1", "optim.warmup_steps=5"],
        eval_windows=4, lengths=[256, 1024], samples=1, tasks=["niah_single"]),
}
COMMON = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=10", "model.attention=full",
          "model.moe=false"]


def main_py(*args: str) -> None:
    """One `python main.py ...` command, as a user runs it; its output goes to ours, a failure stops the loop."""
    print("$ python main.py " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, check=True)


def last_checkpoint(runs: Path, run_name: str) -> Path:
    return sorted((runs / run_name).glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)[-1]


def held_out_loss(ckpt: Path, length: int, windows: int, device: str) -> float:
    """Mean next-token loss over ``windows`` held-out windows of ``length`` tokens, as ``main.py experiment``
    measures it (``held_out_perplexity``; the same windows for every model that shares a tokenizer: the embedded
    corpus's validation split)."""
    model, tokenizer = load_model(str(ckpt), device)
    tokens = held_out_tokens(DataConfig(), tokenizer, windows * length + 1)
    return held_out_perplexity(model, tokens, windows, length, torch.device(device))["loss"]


def retrieval(ckpt: Path, tasks: list[str], lengths: list[int], samples: int, device: str) -> dict:
    model, tokenizer = load_model(str(ckpt), device)
    haystack = held_out_tokens(DataConfig(), tokenizer, 2 * max(lengths))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        rows = evaluate_retrieval(model, tokenizer, haystack, tasks, lengths,
                                  [0.1, 0.5, 0.9], samples, 0, 16384, device)
    table: dict = {}
    for r in rows:
        table.setdefault(r.task, {}).setdefault(str(r.length), []).append(r.accuracy)
    return {task: {n: float(np.mean(a)) for n, a in by_len.items()} for task, by_len in table.items()}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, style in (("dense", "o--"), ("hsa", "s-")):
        for task, by_len in result[name]["retrieval"].items():
            ax.plot([int(n) for n in by_len], list(by_len.values()), style, label=f"{name} {task}")
    ax.axvline(result["train_length"], color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="context length (tokens)", ylabel="accuracy", ylim=(-0.05, 1.05),
           title="dense (trained) vs converted to HSA + continued")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=tuple(SCALES), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", default="/tmp/hf_closed_loop", help="runs, exported and converted models")
    parser.add_argument("--out", help="folder for the JSON and the plot (default benchmarks/results)")
    args = parser.parse_args()
    scale, work = SCALES[args.scale], Path(args.work)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shutil.rmtree(work, ignore_errors=True)
    runs, timings = work / "runs", {}

    start = time.perf_counter()
    main_py("fit", "--config", "configs/tiny.yaml", *COMMON, *scale["dense"], f"trainer.root_dir={runs}",
            "trainer.run_name=dense")
    dense = last_checkpoint(runs, "dense")
    timings["train_dense_s"] = time.perf_counter() - start
    main_py("export", "--ckpt", str(dense), "--out", str(work / "hf"))
    main_py("convert", "--hf", str(work / "hf"), "--out", str(work / "hsa" / "model.ckpt"), "--to", "hsa",
            *scale["convert"])
    start = time.perf_counter()
    main_py("fit", "--config", str(work / "hsa" / "model.yaml"), "--config", "configs/convert/hsa_from_dense.yaml",
            *scale["continue"], "trainer.enable_progress_bar=false", f"trainer.root_dir={runs}",
            "trainer.run_name=hsa")
    hsa = last_checkpoint(runs, "hsa")
    timings["continue_hsa_s"] = time.perf_counter() - start

    length = int(next(o.split("=")[1] for o in scale["dense"] if o.startswith("data.seq_len=")))
    losses = {name: held_out_loss(path, length, scale["eval_windows"], device)
              for name, path in (("dense", dense), ("converted", work / "hsa" / "model.ckpt"), ("hsa", hsa))}
    result = {
        "gpu": gpu_name(), "scale": args.scale, "train_length": length, "timings": timings,
        "commands": {"dense": scale["dense"], "convert": scale["convert"], "continue": scale["continue"]},
        "held_out_loss": losses, "hsa_vs_dense_loss": losses["hsa"] / losses["dense"],
        "dense": {"retrieval": retrieval(dense, scale["tasks"], scale["lengths"], scale["samples"], device)},
        "hsa": {"retrieval": retrieval(hsa, scale["tasks"], scale["lengths"], scale["samples"], device)},
    }
    print(f"held-out loss at {length}: dense {losses['dense']:.4f} | converted {losses['converted']:.4f} | "
          f"hsa after continued training {losses['hsa']:.4f} ({100 * (result['hsa_vs_dense_loss'] - 1):+.2f}%)")
    print("| model | task | " + " | ".join(str(n) for n in scale["lengths"]) + " |")
    for name in ("dense", "hsa"):
        for task, by_len in result[name]["retrieval"].items():
            print(f"| {name} | {task} | " + " | ".join(f"{a:.2f}" for a in by_len.values()) + " |")
    path = result_path("hf_closed_loop")
    path = write_result(path if args.out is None else Path(args.out) / path.name, result)
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
