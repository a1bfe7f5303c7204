"""Closed loop through the Hugging Face format, with no download (issue 25): train a full-attention model with
lit-hsa on the embedded corpus, export it to HF format, import it with ``--to hsa``, continue training it with the
shipped recipe (``configs/convert/hsa_from_dense.yaml``), and compare.

    python benchmarks/hf_closed_loop.py [--scale gpu|cpu] [--variants zero,gate,...] [--work DIR] [--out DIR]

Every step is the command a user runs (``python main.py fit | export | convert``) in a subprocess. Measured, on the
same held-out windows of the training length: the dense model's loss, the converted model's at conversion and after
continued training (goal: within 2% of the dense model's); and single / multi-query NIAH accuracy at 1×, 4× and 16×
the training length for both (the dense model's RoPE attention stops at its training length; HSA retrieves past its
sliding window through its chunk memory). Prints a table, writes ``hf_closed_loop_<gpu>_<date>.json`` and a plot.
``--scale cpu`` runs the same chain at toy size in a few minutes (a plumbing check, not a result).

``--variants`` (issue #39: why did retrieval not open?) converts and continues the one dense model once per variant
of the conversion's start or the continuation (``VARIANTS``: the shipped recipe ``zero``, a small random output
projection, a zero gate, a longer dense top-k stretch, a higher rate for the new parts, the from-scratch recipe's
task share), and records beside each one's loss and retrieval the curves that say whether retrieval was learning:
the gradient norms of the retrieval parts, the chunk memory and the HSA attention, and the HSA output's scale
(``grad_norm/*``, ``hsa/*`` in TensorBoard). The JSON's ``variants`` and a second plot compare them.
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
                   "trainer.val_check_interval=20", "trainer.limit_val_batches=1", "optim.warmup_steps=5",
                   "trainer.retrieval_stats_every=5"],
        eval_windows=4, lengths=[256, 1024], samples=1, tasks=["niah_single"]),
    # --pretrained DIR (issue #39 item 2): a real model (e.g. SmolLM2-135M, 8K of RoPE context) continued at 8K on
    # the embedded corpus in its own tokenizer, with the shipped recipe's task share; the dense baseline is the same
    # model continued on the same tokens. Retrieval to 8× its context.
    "pretrained": scale(
        data=["data.seq_len=8192", "data.batch_size=4", "data.num_workers=4", "data.val_fraction=0.1"],
        dense=[],
        convert=["model.swa_window=512", "model.chunk_size=64", "model.hsa_topk=16"],
        continued=["trainer.topk_schedule=[[0,128],[300,16]]", "trainer.max_steps=3000",
                   "trainer.max_time=00:00:03:00", "trainer.accumulate_grad_batches=1",
                   "trainer.val_check_interval=500", "optim.warmup_steps=50"],
        eval_windows=16, lengths=[4096, 8192, 32768, 65536], samples=2,
        tasks=["niah_single", "niah_multiquery", "vt"], val_fraction=0.1),  # 16 × 8K held out in a 49K vocabulary
}
COMMON = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=10", "model.attention=full",
          "model.moe=false"]

# The new parts of a converted model, for optim.lr_scale: retrieval, the chunk memory, the HSA output (and gate).
NEW_PARTS = r"retrieval|memory|upper\.\d+\.(o_proj|gate)"
# Each variant: (convert arguments, continuation overrides) added to the scale's. The scale's continuation uses
# trainer.topk_schedule=[[0, dense], [300, 8]] on the GPU; "dense_longer" keeps every chunk for 900 of its steps.
VARIANTS = {
    "zero": ([], []),  # the shipped recipe: HSA output projection at zero
    "small": (["--hsa-out-std", "0.002"], []),  # output projection from N(0, 0.002²): a tenth of init_std
    "gate": (["model.hsa_gate=true"], []),  # random output projection behind a learned gate at zero
    "dense_longer": ([], ["trainer.topk_schedule=[[0,16],[900,8]]"]),
    "lr_new10": ([], [f"optim.lr_scale=[['{NEW_PARTS}',10]]"]),  # the new parts at 10× the rate
    "tasks_scratch": ([], ["data.synthetic_fraction=0.9",  # length_generalization.yaml's task mix and share
                           "data.synthetic_tasks=[niah_single,niah_multikey,niah_multiquery,vt,self_copy]"]),
}
CURVES = ("grad_norm/retrieval", "grad_norm/chunk_memory", "grad_norm/hsa_attention", "hsa/o_proj_rms", "hsa/gate")


def main_py(*args: str) -> None:
    """One `python main.py ...` command, as a user runs it; its output goes to ours, a failure stops the loop."""
    print("$ python main.py " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, check=True)


def last_checkpoint(runs: Path, run_name: str) -> Path:
    return sorted((runs / run_name).glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)[-1]


def held_out_loss(ckpt: Path, length: int, windows: int, device: str, data: DataConfig) -> float:
    """Mean next-token loss over ``windows`` held-out windows of ``length`` tokens, as ``main.py experiment``
    measures it (``held_out_perplexity``; the same windows for every model that shares a tokenizer: the embedded
    corpus's validation split)."""
    model, tokenizer = load_model(str(ckpt), device)
    tokens = held_out_tokens(data, tokenizer, windows * length + 1)
    return held_out_perplexity(model, tokens, windows, length, torch.device(device))["loss"]


def retrieval(ckpt: Path, tasks: list[str], lengths: list[int], samples: int, device: str, data: DataConfig) -> dict:
    model, tokenizer = load_model(str(ckpt), device)
    haystack = held_out_tokens(data, tokenizer, 2 * max(lengths))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        rows = evaluate_retrieval(model, tokenizer, haystack, tasks, lengths,
                                  [0.1, 0.5, 0.9], samples, 0, 16384, device)
    table: dict = {}
    for r in rows:
        table.setdefault(r.task, {}).setdefault(str(r.length), []).append(r.accuracy)
    return {task: {n: float(np.mean(a)) for n, a in by_len.items()} for task, by_len in table.items()}


def curves(run: Path) -> dict[str, dict[str, float]]:
    """The learning curves of a continuation: {tag: {step: value}} of ``CURVES`` it logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(sorted(run.glob("version_*"))[-1])).Reload()
    tags = set(acc.Tags()["scalars"])
    return {tag: {str(e.step): e.value for e in acc.Scalars(tag)} for tag in (*CURVES, "train/loss") if tag in tags}


def plot_variants(variants: dict, lengths: list[int], path: Path) -> None:
    """Left: single-NIAH accuracy by length per variant; right: the retrieval parts' gradient norm by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, grad) = plt.subplots(1, 2, figsize=(11, 4))
    for name, v in variants.items():
        by_len = v["retrieval"].get("niah_single", {})
        acc.plot([int(n) for n in by_len], list(by_len.values()), "o-", label=name)
        g = v["curves"].get("grad_norm/retrieval", {})
        grad.plot([int(s) for s in g], [max(x, 1e-12) for x in g.values()], label=name)
    acc.set(xscale="log", xlabel="context length (tokens)", ylabel="single-NIAH accuracy", ylim=(-0.05, 1.05),
            title="converted + continued, by variant")
    acc.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths], minor=False)
    acc.minorticks_off()
    grad.set(yscale="log", xlabel="continuation step", ylabel="grad norm of the retrieval parts",
             title="is retrieval learning?")
    acc.legend(fontsize=7)
    grad.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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
    parser.add_argument("--pretrained", metavar="DIR",
                        help="start from this pretrained model (an HF folder, or a folder of one .gguf) instead of "
                             "training a dense one: the baseline is the same model continued on the same tokens "
                             "(use with --scale pretrained)")
    parser.add_argument("--reuse-dense", action="store_true",
                        help="take the dense model and its export from an earlier run's --work folder instead of "
                             "training it again (variants over several calls on one machine)")
    parser.add_argument("--variants", default="zero",
                        help=f"comma-separated conversion variants to compare ({', '.join(VARIANTS)}); the first "
                             "is the result's 'hsa' model")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown '{unknown[0]}' (choose from {', '.join(VARIANTS)})")
    scale, work = SCALES[args.scale], Path(args.work)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs, timings = work / "runs", {}
    source = Path(args.pretrained) if args.pretrained else work / "hf"  # the dense model every variant converts
    if args.reuse_dense:
        if not args.pretrained and not (source / "config.json").exists():
            parser.error(f"--reuse-dense: no exported dense model in {source}: run once without it")
        for name in names:  # this run's variants start afresh
            shutil.rmtree(work / name, ignore_errors=True)
            shutil.rmtree(runs / name, ignore_errors=True)
        dense = last_checkpoint(runs, "dense")
    else:
        shutil.rmtree(work, ignore_errors=True)
        start = time.perf_counter()
        if args.pretrained:  # the baseline: the pretrained model continued as the variants are, on the same tokens
            main_py("convert", "--hf", str(source), "--out", str(work / "dense" / "model.ckpt"))
            main_py("fit", "--config", str(work / "dense" / "model.yaml"), "--config",
                    "configs/convert/hsa_from_dense.yaml", *scale["continue"], "trainer.topk_schedule=[]",
                    "trainer.enable_progress_bar=false", f"trainer.root_dir={runs}", "trainer.run_name=dense")
        else:
            main_py("fit", "--config", "configs/tiny.yaml", *COMMON, *scale["dense"], f"trainer.root_dir={runs}",
                    "trainer.run_name=dense")
        dense = last_checkpoint(runs, "dense")
        timings["train_dense_s"] = time.perf_counter() - start
        if not args.pretrained:
            main_py("export", "--ckpt", str(dense), "--out", str(source))
    length = int(next(o.split("=")[1] for o in scale["dense"] + scale["continue"] if o.startswith("data.seq_len=")))
    # the held-out split the continuations left out (their data.val_fraction)
    held_out = DataConfig(val_fraction=scale.get("val_fraction", DataConfig().val_fraction))
    dense_loss = held_out_loss(dense, length, scale["eval_windows"], device, held_out)
    variants = {}
    for name in names:
        convert_args, continue_args = VARIANTS[name]
        converted = work / name / "model.ckpt"
        main_py("convert", "--hf", str(source), "--out", str(converted), "--to", "hsa", *scale["convert"],
                *convert_args)
        start = time.perf_counter()
        main_py("fit", "--config", str(converted.with_suffix(".yaml")), "--config",
                "configs/convert/hsa_from_dense.yaml", *scale["continue"], *continue_args,
                "trainer.enable_progress_bar=false", f"trainer.root_dir={runs}", f"trainer.run_name={name}")
        continued = last_checkpoint(runs, name)
        variants[name] = {
            "convert": convert_args, "continue": continue_args, "continue_s": time.perf_counter() - start,
            "held_out_loss": {"converted": held_out_loss(converted, length, scale["eval_windows"], device, held_out),
                              "continued": held_out_loss(continued, length, scale["eval_windows"], device, held_out)},
            "retrieval": retrieval(continued, scale["tasks"], scale["lengths"], scale["samples"], device, held_out),
            "curves": curves(runs / name),
        }
        variants[name]["vs_dense_loss"] = variants[name]["held_out_loss"]["continued"] / dense_loss
        # time-bound continuations (max_time): the steps each variant got (the last logged one)
        variants[name]["steps_logged_up_to"] = max(map(int, variants[name]["curves"].get("train/loss", {"-1": 0})))
    first = variants[names[0]]
    timings["continue_hsa_s"] = first["continue_s"]
    losses = {"dense": dense_loss, **first["held_out_loss"]}
    losses["hsa"] = losses.pop("continued")
    result = {
        "gpu": gpu_name(), "scale": args.scale, "train_length": length, "timings": timings,
        "commands": {"dense": scale["dense"], "convert": scale["convert"], "continue": scale["continue"]},
        "held_out_loss": losses, "hsa_vs_dense_loss": losses["hsa"] / losses["dense"],
        "dense": {"retrieval": retrieval(dense, scale["tasks"], scale["lengths"], scale["samples"], device, held_out)},
        "hsa": {"retrieval": first["retrieval"], "variant": names[0]},
        "variants": variants,
    }
    print(f"held-out loss at {length}: dense {losses['dense']:.4f} | converted {losses['converted']:.4f} | "
          f"hsa after continued training {losses['hsa']:.4f} ({100 * (result['hsa_vs_dense_loss'] - 1):+.2f}%)")
    print("| model | task | " + " | ".join(str(n) for n in scale["lengths"]) + " |")
    for name in ("dense", "hsa"):
        for task, by_len in result[name]["retrieval"].items():
            print(f"| {name} | {task} | " + " | ".join(f"{a:.2f}" for a in by_len.values()) + " |")
    if len(names) > 1:
        print("| variant | loss vs dense | " + " | ".join(f"NIAH {n}" for n in scale["lengths"]) +
              " | last grad norm, retrieval | last o_proj rms |")
        for name, v in variants.items():
            last = {tag: list(c.values())[-1] if c else float("nan") for tag, c in v["curves"].items()}
            niah = v["retrieval"].get("niah_single", {})
            print(f"| {name} | {v['vs_dense_loss']:.4f} | " + " | ".join(f"{a:.2f}" for a in niah.values()) +
                  f" | {last.get('grad_norm/retrieval', float('nan')):.3g} | "
                  f"{last.get('hsa/o_proj_rms', float('nan')):.3g} |")
    path = result_path("hf_closed_loop") if len(names) == 1 else \
        result_path("hf_closed_loop_variants", suffix="_" + "-".join(names))
    path = write_result(path if args.out is None else Path(args.out) / path.name, result)
    plot(result, path.with_suffix(".png"))
    if len(names) > 1:
        plot_variants(variants, scale["lengths"], path.with_name(path.stem + "_curves.png"))
    print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
