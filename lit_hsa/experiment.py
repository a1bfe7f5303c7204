"""``python main.py experiment``: train several same-size models with one recipe, then measure how far their
retrieval reaches beyond the training length (issue 7: HSA against full-attention and SWA baselines).

An experiment file has three sections::

    train:   {model: …, data: …, optim: …, trainer: …}   # a `fit` config shared by every model
    models:  {hsa: [dotted=overrides], full: [...], …}   # what differs per model
    eval:    {tasks, lengths, depths, samples, …}         # RULER-style retrieval eval after training

Each model trains, is evaluated in the same process, and writes ``<out>/<model>.json``; the summary
(``length_generalization.json``, ``accuracy_vs_length.png``, ``summary.md``) is rebuilt from every ``<model>.json``
in ``<out>``, so models run in separate commands (one GPU session each) combine into one report.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from omegaconf import OmegaConf

from data_modules.synthetic import TASKS
from data_modules.tokenizers import build_tokenizer
from lit_hsa.checkpoint_io import load_checkpoint_file
from lit_hsa.config import (Config, ConfigError, ModelConfig, check_choice, load_config, load_yaml, merge_onto,
                            parse_overrides)
from lit_hsa.eval.ruler import EvalRow, evaluate_retrieval, parse_length, rows_as_dicts, short_length
from lit_hsa.eval.run import held_out_tokens
from lit_hsa.model.transformer import HSATransformer
from lit_hsa.training.run import build_run


@dataclass
class ExperimentEval:
    tasks: list[str] = field(default_factory=lambda: ["niah_single", "niah_multikey", "niah_multiquery", "vt"])
    lengths: list[str] = field(default_factory=lambda: ["1k", "4k", "16k"])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 1  # per task × length × depth
    segment_size: int = 16384  # prefill segment (bounds activation memory)
    max_length: dict[str, str] = field(default_factory=dict)  # per model: skip longer lengths (time), e.g. full: 256k
    seed: int = 0


@dataclass
class Experiment:
    name: str = "experiment"
    out_dir: str = "experiments/default"
    runs_dir: Optional[str] = None  # training runs (checkpoints, TensorBoard); None: <out_dir>/runs
    train: dict[str, Any] = field(default_factory=dict)
    models: dict[str, list[str]] = field(default_factory=dict)
    eval: ExperimentEval = field(default_factory=ExperimentEval)

    def model_config(self, model: str) -> Config:
        """The `fit` config of one model: ``train`` + that model's overrides, with its own run folder."""
        overrides = list(self.models[model]) + [f"trainer.root_dir={self.runs_dir or Path(self.out_dir) / 'runs'}",
                                                f"trainer.run_name={model}"]
        return load_config(base=self.train, overrides=overrides)

    def lengths(self, model: str) -> list[int]:
        lengths = [parse_length(n) for n in self.eval.lengths]
        cap = self.eval.max_length.get(model)
        return [n for n in lengths if cap is None or n <= parse_length(cap)]

    def validate(self) -> None:
        if not self.models:
            raise ConfigError("models is empty: name at least one model, e.g. hsa: [model.attention=hsa]")
        for task in self.eval.tasks:
            check_choice("eval.tasks", task, TASKS)
        for key, values in (("eval.lengths", self.eval.lengths), ("eval.max_length", self.eval.max_length.values())):
            for v in values:
                try:
                    parse_length(v)
                except ValueError as e:
                    raise ConfigError(f"{key}: {e}") from None
        for model in self.eval.max_length:
            check_choice("eval.max_length", model, tuple(self.models))
        if any(not 0 <= d <= 1 for d in self.eval.depths) or not self.eval.depths:
            raise ConfigError(f"eval.depths must be non-empty and lie in [0, 1], got {self.eval.depths}")
        if self.eval.samples < 1 or self.eval.segment_size < 1:
            raise ConfigError("eval.samples and eval.segment_size must be >= 1")
        for model in self.models:  # every model's config is checked before the first one trains
            self.model_config(model)


def load_experiment(path: str, overrides: list[str] | None = None) -> Experiment:
    """An experiment YAML + ``dotted.key=value`` overrides (e.g. ``train.trainer.max_steps=10``) → ``Experiment``."""
    exp: Experiment = merge_onto(
        OmegaConf.structured(Experiment), load_yaml(path), parse_overrides(overrides),
        unknown_key=lambda key: f"unknown experiment key '{key}' (sections: name, out_dir, train, models, eval)")
    exp.validate()
    return exp


def run_model(exp: Experiment, model: str, eval_only: bool = False) -> dict:
    """Train one model (or, with ``eval_only``, load ``<out>/<model>.weights.pt`` from an earlier run), evaluate it
    length by length, and write ``<out>/<model>.json`` after every length, so a run cut short keeps what it measured.
    With ``eval_only``, rows of an existing ``<model>.json`` at lengths not evaluated again are kept.
    Training also leaves ``<out>/<model>.weights.pt`` (bf16 weights + model config) for a later ``eval_only``."""
    cfg = exp.model_config(model)
    out = Path(exp.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{model}.weights.pt"
    json_path = out / f"{model}.json"
    if eval_only:
        net, train_info = load_trained(weights)
    else:
        net, train_info = train_model(cfg)
        torch.save({"model_config": asdict(net.cfg), "train": train_info,
                    "state_dict": {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                   for k, v in net.state_dict().items()}}, weights)
    # Lightning hands the model back on the CPU after fit: evaluate on the accelerator the model trained on.
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu")
    net.to(device).eval()
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.eos_token)
    lengths = exp.lengths(model)
    haystack = held_out_tokens(cfg.data, tokenizer, 2 * max(lengths))
    result = {
        "experiment": exp.name, "model": model, "overrides": list(exp.models[model]),
        "model_config": asdict(net.cfg), "train_seq_len": cfg.data.seq_len, "train": train_info,
        "eval_seconds": 0.0, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"), "retrieval": [],
    }
    if eval_only and json_path.is_file():
        # An eval-only run (e.g. longer lengths in a later GPU session) adds to what the earlier runs measured and
        # replaces only the lengths it evaluates again.
        earlier = json.loads(json_path.read_text())
        result["retrieval"] = [r for r in earlier.get("retrieval", []) if r["length"] not in lengths]
        result["eval_seconds"] = earlier.get("eval_seconds", 0.0)
    for length in lengths:
        start = time.perf_counter()
        # bf16 autocast on CUDA, as the models train
        with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext():
            rows = evaluate_retrieval(net, tokenizer, haystack, exp.eval.tasks, [length], exp.eval.depths,
                                      exp.eval.samples, exp.eval.seed, exp.eval.segment_size, device)
        seconds = time.perf_counter() - start
        result["retrieval"] += rows_as_dicts(rows)
        result["eval_seconds"] = round(result["eval_seconds"] + seconds, 1)
        json_path.write_text(json.dumps(result, indent=2))
        table = accuracy_table([{"model": model, "retrieval": rows_as_dicts(rows)}])
        print(f"{model} @ {short_length(length)}: " + ", ".join(f"{task} {per[model][length]:.2f}"
                                                          for task, per in table.items())
              + f" ({seconds:.0f} s)", flush=True)
    return result


def train_model(cfg: Config):
    """``fit`` one config → (the trained HSATransformer, training summary)."""
    module, datamodule, trainer = build_run(cfg)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    steps = trainer.global_step
    info = {"steps": steps, "tokens": steps * cfg.data.batch_size * cfg.data.seq_len
            * cfg.trainer.accumulate_grad_batches, "seconds": round(time.perf_counter() - start, 1),
            "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}}
    return module.model, info


def load_trained(path: Path):
    """``<model>.weights.pt`` → (HSATransformer on the CPU, training summary)."""
    if not path.is_file():
        raise ConfigError(f"'{path}' does not exist: train the model first (run without --eval-only)")
    saved = load_checkpoint_file(path)  # weights_only: a crafted file is refused, nothing of it runs
    if not {"model_config", "state_dict", "train"} <= saved.keys():
        raise ConfigError(f"'{path}' is not a weights file written by `main.py experiment` (it lacks "
                          f"{', '.join(sorted({'model_config', 'state_dict', 'train'} - saved.keys()))})")
    net = HSATransformer(ModelConfig(**saved["model_config"]))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in saved["state_dict"].items()})
    return net, saved["train"]


def accuracy_table(results: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """results (one per model) → {task: {model: {length: accuracy averaged over depths and samples}}}."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    for res in results:
        rows = [EvalRow(**r) for r in res["retrieval"]]
        for task in sorted({r.task for r in rows}):
            per_length = table.setdefault(task, {}).setdefault(res["model"], {})
            for n in sorted({r.length for r in rows if r.task == task}):
                per_length[n] = float(np.mean([r.accuracy for r in rows if (r.task, r.length) == (task, n)]))
    return table


def summarize(out_dir: str | Path) -> Optional[dict]:
    """Combine every ``<model>.json`` in ``out_dir`` into ``length_generalization.json``, ``summary.md`` and
    ``accuracy_vs_length.png`` (one panel per task, one line per model). Returns the summary (None: no results)."""
    out = Path(out_dir)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    results = [r for r in results if "retrieval" in r and "model" in r]  # model results, not the summary itself
    if not results:
        return None
    table = accuracy_table(results)
    summary = {"models": {r["model"]: {k: r[k] for k in ("train_seq_len", "train", "eval_seconds", "device", "date",
                                                          "overrides")} for r in results},
               "accuracy": {task: {m: {str(n): a for n, a in acc.items()} for m, acc in per.items()}
                            for task, per in table.items()}}
    (out / "length_generalization.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown_table(table, results))
    plot_models(table, out / "accuracy_vs_length.png", {r["model"]: r["train_seq_len"] for r in results})
    return summary


def markdown_table(table: dict, results: list[dict]) -> str:
    lengths = sorted({n for per in table.values() for acc in per.values() for n in acc})
    lines = ["| task | model | " + " | ".join(short_length(n) for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for task, per in table.items():
        for model, acc in per.items():
            cells = [f"{acc[n]:.2f}" if n in acc else "—" for n in lengths]
            lines.append(f"| {task} | {model} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in results:
        t = r["train"]
        lines.append(f"- {r['model']}: trained at {r['train_seq_len']} tokens, {t['steps']} steps, "
                     f"{t['tokens'] / 1e6:.1f}M tokens, {t['seconds']:.0f} s; eval {r['eval_seconds']:.0f} s "
                     f"({r['device']}, {r['date']})")
    return "\n".join(lines) + "\n"


def plot_models(table: dict, path: Path, train_lengths: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(table)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for model, acc in table[task].items():
            lengths = sorted(acc)
            line, = ax.plot(lengths, [acc[n] for n in lengths], marker="o", label=model)
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


def run_experiment(path: str, overrides: list[str], models: Optional[list[str]] = None,
                   summarize_only: bool = False, eval_only: bool = False) -> Optional[dict]:
    exp = load_experiment(path, overrides)
    chosen = models or list(exp.models)
    for model in chosen:
        check_choice("--models", model, tuple(exp.models))
    if not summarize_only:
        for model in chosen:
            result = run_model(exp, model, eval_only)
            print(f"{model}: trained {result['train']['steps']} steps in {result['train']['seconds']:.0f} s, "
                  f"evaluated in {result['eval_seconds']:.0f} s", flush=True)
    summary = summarize(exp.out_dir)
    if summary is None:
        raise ConfigError(f"no model results in '{exp.out_dir}' to summarize")
    print((Path(exp.out_dir) / "summary.md").read_text())
    return summary
