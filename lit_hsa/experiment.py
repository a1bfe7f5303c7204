"""``python main.py experiment``: train several same-size models with one recipe, then measure their held-out
perplexity and how far their retrieval reaches beyond the training length (issues 7 and 26: HSA against
full-attention and SWA baselines).

An experiment file has these sections (only ``models`` is required)::

    name: paper_recipe
    out_dir: experiments/paper_recipe
    train:   {model: …, data: …, optim: …, trainer: …}   # a `fit` config shared by every model
    models:  {hsa: [dotted=overrides], full: [...], …}   # what differs per model; "<phase>:key=value" items
                                                         #   apply in that phase only, after the phase's own overrides
    phases:                                              # optional training stages, in order (spec §5)
      - {name: warmup, max_steps: 200, overrides: [dotted=overrides]}
      - {name: main, max_steps: 800, overrides: [...]}
    seeds: [0, 1]                                        # optional: every model trains once per seed
    resume: false                                        # true: reuse the phases an interrupted run completed
    eval:    {tasks, lengths, depths, samples, segment_size, max_length, seed,
              ppl_windows, ppl_lengths, reference_model}

A run is one model with one seed (``<model>-s<seed>``, or ``<model>`` without ``seeds``). Its phase i+1 starts from
phase i's final weights (``init_from`` of the ``end.pt`` that phase i leaves in its run folder) with a fresh
optimizer and schedule, as ``configs/stages/`` chains stages. Each run writes ``<out>/<run>.json`` (training per
phase, parameters, FLOPs, held-out perplexity, perplexity by position, retrieval by length) and
``<out>/<run>.weights.pt``; the summary (``length_generalization.json``, ``summary.md``, ``accuracy_vs_length.png``,
``loss_vs_position.png``: ``lit_hsa/eval/experiment_report.py``) is rebuilt from every ``<run>.json`` in ``<out>``:
runs made in separate commands (one GPU session each) combine into one report, with the mean and spread over seeds
of every metric.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from data_modules.tokenizers import build_tokenizer
from lit_hsa.checkpoint_io import WEIGHTS_ONLY, load_checkpoint_file, load_net, save_weights, state_problems
from lit_hsa.config import (
    Config,
    ConfigError,
    ModelConfig,
    RetrievalEvalOptions,
    check_choice,
    load_config,
    load_yaml,
    merge_onto,
    parse_length,
)
from lit_hsa.eval.experiment_report import summarize
from lit_hsa.eval.perplexity import autocast, held_out_perplexity
from lit_hsa.eval.ruler import evaluate_retrieval, perplexity_by_position, rows_as_dicts, short_length
from lit_hsa.eval.run import held_out_prefix, held_out_tokens
from lit_hsa.model.transformer import HSATransformer
from lit_hsa.training.run import build_run

PHASE_KEYS = ("name", "max_steps", "overrides")
SECTIONS = "name, out_dir, runs_dir, train, models, phases, seeds, resume, eval"


@dataclass
class Phase:
    """One training stage that every model runs: ``max_steps`` optimizer steps with ``overrides`` applied on top of
    ``train`` and the model's overrides; it starts from the previous phase's final weights."""

    name: str = ""
    max_steps: int = 0
    overrides: list[str] = field(default_factory=list)


@dataclass
class ExperimentEval:
    tasks: list[str] = field(default_factory=lambda: ["niah_single", "niah_multikey", "niah_multiquery", "vt"])
    lengths: list[str] = field(default_factory=lambda: ["1k", "4k", "16k"])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 1  # per task × length × depth
    segment_size: int = 16384  # prefill segment (bounds activation memory)
    # per model: skip longer lengths (time), e.g. full: 256k; caps ppl_lengths too
    max_length: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    ppl_windows: int = 0  # held-out windows of the training length for mean loss / perplexity (0: off)
    ppl_lengths: list[str] = field(default_factory=list)  # perplexity by position on one held-out sequence each
    reference_model: Optional[str] = None  # summary: every model's held-out perplexity / this model's (parity)


@dataclass
class Experiment:
    name: str = "experiment"
    out_dir: str = "experiments/default"
    runs_dir: Optional[str] = None  # training runs (checkpoints, TensorBoard); None: <out_dir>/runs
    train: dict[str, Any] = field(default_factory=dict)
    models: dict[str, list[str]] = field(default_factory=dict)
    phases: list[Phase] = field(default_factory=list)
    seeds: Optional[list[int]] = None  # None: one run per model with the seeds of `train`
    resume: bool = False  # skip phases whose end.pt recorded the same config; continue a cut phase from last.ckpt
    eval: ExperimentEval = field(default_factory=ExperimentEval)

    def model_config(self, model: str, seed: Optional[int] = None, phase: Optional[int] = None) -> Config:
        """The `fit` config of one model (one seed, one phase): ``train`` ← the model's overrides ← the phase's
        overrides and ``max_steps`` ← the model's ``<phase>:`` overrides ← seed and run folder."""
        common, per_phase = split_model_overrides(model, self.models[model], [p.name for p in self.phases])
        overrides, name, where = list(common), run_name(model, seed), f"model '{model}'"
        if phase is not None:
            p = self.phases[phase]
            overrides += [*p.overrides, f"trainer.max_steps={p.max_steps}", *per_phase.get(p.name, [])]
            name, where = f"{name}-{p.name}", f"{where}, phase '{p.name}'"
        if seed is not None:  # the seed wins over every override: it is what makes the runs differ
            overrides += [f"trainer.seed={seed}", f"data.seed={seed}"]
        overrides += [f"trainer.root_dir={self.runs_dir or Path(self.out_dir) / 'runs'}", f"trainer.run_name={name}"]
        try:
            return load_config(base=self.train, overrides=overrides)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def phase_configs(self, model: str, seed: Optional[int] = None) -> list[tuple[str, Config]]:
        """(phase name, `fit` config) of every phase of one run; without ``phases``, one unnamed phase."""
        if not self.phases:
            return [("", self.model_config(model, seed))]
        return [(p.name, self.model_config(model, seed, i)) for i, p in enumerate(self.phases)]

    def runs(self, models: Optional[list[str]] = None, seeds: Optional[list[int]] = None):
        """(model, seed) of every run, model by model; seed None without ``seeds``."""
        return [(m, s) for m in models or list(self.models) for s in (seeds or self.seeds or [None])]

    def capped(self, model: str, lengths: list[str]) -> list[int]:
        """``lengths`` in tokens, without those over ``eval.max_length[model]``."""
        cap = self.eval.max_length.get(model)
        return [n for n in map(parse_length, lengths) if cap is None or n <= parse_length(cap)]

    def lengths(self, model: str) -> list[int]:
        return self.capped(model, self.eval.lengths)

    def ppl_lengths(self, model: str) -> list[int]:
        return self.capped(model, self.eval.ppl_lengths)

    def validate(self) -> None:
        if not self.models:
            raise ConfigError("models is empty: name at least one model, e.g. hsa: [model.attention=hsa]")
        self.validate_eval()
        self.validate_phases()
        if self.seeds is not None and not self.seeds:
            raise ConfigError("seeds is empty: list at least one seed (seeds: [0, 1]) or leave seeds out")
        if self.seeds and (len(set(self.seeds)) < len(self.seeds) or min(self.seeds) < 0):
            raise ConfigError(f"seeds must be distinct integers >= 0, got {self.seeds}")
        for model in self.models:  # every model's config is checked before the first one trains
            check_phase_chain(model, self.phase_configs(model, (self.seeds or [None])[0]))

    def validate_eval(self) -> None:
        ev = self.eval
        RetrievalEvalOptions(ev.tasks, ev.lengths, ev.depths, ev.samples, ev.segment_size,
                             names={k: f"eval.{k}" for k in ("tasks", "lengths", "depths", "samples",
                                                             "segment_size")}).validate()
        for key, values in (("eval.max_length", ev.max_length.values()), ("eval.ppl_lengths", ev.ppl_lengths)):
            for v in values:
                try:
                    parse_length(v)
                except ValueError as e:
                    raise ConfigError(f"{key}: {e}") from None
        for model in ev.max_length:
            check_choice("eval.max_length", model, tuple(self.models))
        if ev.reference_model is not None:
            check_choice("eval.reference_model", ev.reference_model, tuple(self.models))
        if ev.ppl_windows < 0 or any(parse_length(n) < 2 for n in ev.ppl_lengths):
            raise ConfigError(f"eval.ppl_windows must be >= 0 and eval.ppl_lengths >= 2 tokens, got "
                              f"{ev.ppl_windows} and {ev.ppl_lengths}")

    def validate_phases(self) -> None:
        names = [p.name for p in self.phases]
        for i, p in enumerate(self.phases):
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", p.name):  # it names run folders
                raise ConfigError(f"phases[{i}].name must be a word of letters, digits, '_', '.' or '-', got "
                                  f"'{p.name}'")
            if names.index(p.name) != i:
                raise ConfigError(f"phases: two phases are named '{p.name}'")
            if p.max_steps < 1:
                raise ConfigError(f"phases[{i}] '{p.name}': max_steps must be >= 1, got {p.max_steps}")


def split_model_overrides(model: str, overrides: list[str], phases: list[str]) -> tuple[list[str], dict]:
    """A model's overrides → (those of every phase, {phase: those of that phase only}). ``warmup:key=value`` is
    ``key=value`` in phase ``warmup`` only (the prefix is what stands before '=' and holds a ':')."""
    common, per_phase = [], {}
    for item in overrides:
        key = item.split("=", 1)[0]
        if ":" not in key:
            common.append(item)
            continue
        phase, rest = item.split(":", 1)
        if phase not in phases:
            raise ConfigError(f"models.{model}: '{item}' names no phase (phases: {', '.join(phases) or 'none'})")
        per_phase.setdefault(phase, []).append(rest)
    return common, per_phase


def check_phase_chain(model: str, configs: list[tuple[str, Config]]) -> None:
    """Each phase starts from the previous one's weights: same tokenizer and parameter shapes in every phase (a
    mismatch would otherwise surface after the first phase trained). A full-attention model has no window to
    schedule."""
    first_name, first = configs[0]
    reference = shapes(first.model)
    for name, cfg in configs:
        if cfg.model.attention == "full" and cfg.trainer.swa_window_schedule:
            raise ConfigError(f"model '{model}'{f', phase {name!r}' if name else ''}: trainer.swa_window_schedule "
                              f"needs a sliding window, model.attention is 'full' (add "
                              f"'{name + ':' if name else ''}trainer.swa_window_schedule=[]' to its overrides)")
        if cfg.data.tokenizer != first.data.tokenizer:
            raise ConfigError(f"model '{model}', phase '{name}': data.tokenizer '{cfg.data.tokenizer}' differs from "
                              f"phase '{first_name}' ('{first.data.tokenizer}'): phases share one model")
        problems = state_problems(shapes(cfg.model), reference)
        if problems:
            raise ConfigError(f"model '{model}', phase '{name}': its model.* keys change parameter shapes against "
                              f"phase '{first_name}' ({problems}): phases continue one model")


def shapes(model_cfg: ModelConfig) -> dict:
    """Parameter and buffer shapes of a model config, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        net = HSATransformer(replace(model_cfg, vocab_size=model_cfg.vocab_size or 64))
    return net.state_dict()


def run_name(model: str, seed: Optional[int]) -> str:
    return model if seed is None else f"{model}-s{seed}"


def seed_list(text: str) -> list[int]:
    """``--seeds 0,1`` → [0, 1] (argparse ``type``)."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers (e.g. 0,1)") from None


def load_experiment(path: str, overrides: list[str] | None = None) -> Experiment:
    """An experiment YAML + ``dotted.key=value`` overrides (``train.trainer.max_steps=10``, ``phases.0.max_steps=5``)
    → ``Experiment``."""
    raw = load_yaml(path)
    container = OmegaConf.to_container(raw)
    check_phase_keys((container.get("phases") if isinstance(container, dict) else None) or [])
    exp: Experiment = merge_onto(OmegaConf.structured(Experiment), raw, overrides=overrides,
                                 unknown_key=unknown_experiment_key)
    exp.validate()
    return exp


def unknown_experiment_key(key: str) -> str:
    return f"unknown experiment key '{key}' (sections: {SECTIONS})"


def check_phase_keys(phases: Any) -> None:
    """Every phase is a mapping of PHASE_KEYS (OmegaConf's own error loses the phase's index)."""
    if not isinstance(phases, list):
        raise ConfigError("phases must be a list of {name, max_steps, overrides}")
    for i, p in enumerate(phases):
        if not isinstance(p, dict):
            raise ConfigError(f"phases[{i}] must be a mapping with keys {', '.join(PHASE_KEYS)}, got {p!r}")
        for key in p:
            if key not in PHASE_KEYS:
                raise ConfigError(f"phases[{i}]: unknown phase key '{key}' (keys: {', '.join(PHASE_KEYS)})")


# ------------------------------------------------------------------------------------------------ training

def train_run(exp: Experiment, model: str, seed: Optional[int]):
    """Train one run phase by phase → (the trained HSATransformer, training summary). Each phase leaves its final
    weights in ``<runs>/<run>-<phase>/end.pt``; the next one starts from them (``init_from``: weights only, so a
    fresh optimizer and schedule). With ``exp.resume``, leading phases whose ``end.pt`` recorded the same config
    are not trained again, and the first one to train continues from its ``last.ckpt`` when there is one."""
    phases, net, start, reusing = [], None, None, exp.resume
    for i, (name, cfg) in enumerate(exp.phase_configs(model, seed)):
        if i > 0:
            cfg.init_from, cfg.ckpt_path = str(start), None
        end = Path(cfg.trainer.root_dir, cfg.trainer.run_name, "end.pt")
        identity = asdict(cfg)  # before training: build_run fills in the vocabulary
        recorded = completed_phase(end, identity) if reusing else None
        if recorded is not None:
            print(f"{run_name(model, seed)}: phase '{name}' already trained ({end}), reused", flush=True)
            phases.append(recorded)
            start = end
            continue
        # A phase cut short (no end.pt) continues from its last checkpoint, which holds the weights to go on from;
        # one whose end.pt recorded another config trains afresh.
        if reusing and not end.is_file() and (last := latest_last_checkpoint(cfg)) is not None:
            cfg.ckpt_path, cfg.init_from = str(last), None
        reusing = False  # a phase trained again: every later phase must be trained again too
        cfg.validate()
        net, info = train_model(cfg)
        info = {"name": name, **info}
        save_weights(end, net.state_dict(), weights_hparams(net, cfg), config=identity, train=info)
        phases.append(info)
        start = end
    if net is None:  # every phase was reused: the last one's weights
        net = load_net(start)[0]
    return net, combine_phases(phases, named=bool(exp.phases))


def completed_phase(end: Path, identity: dict) -> Optional[dict]:
    """The training record of a phase's ``end.pt`` when it was trained with this very config, else None."""
    if not end.is_file():
        return None
    saved = load_checkpoint_file(end)
    return saved.get("train") if saved.get("config") == identity else None


def latest_last_checkpoint(cfg: Config) -> Optional[Path]:
    found = list(Path(cfg.trainer.root_dir, cfg.trainer.run_name).glob("version_*/checkpoints/last.ckpt"))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def weights_hparams(net: HSATransformer, cfg: Config) -> dict:
    """What a weights file records beside the weights: the model as it ends (schedules applied) and its tokenizer."""
    return {"model": asdict(net.running_config()), "tokenizer": cfg.data.tokenizer, "eos_token": cfg.data.eos_token}


def combine_phases(phases: list[dict], named: bool) -> dict:
    """Per-phase training records → the run's: sums of steps, tokens, seconds and FLOPs, the last phase's final
    metrics, and (with named phases) the per-phase records."""
    total = {key: sum(p[key] for p in phases) for key in ("steps", "tokens", "seconds", "flops")}
    total["seconds"] = round(total["seconds"], 1)
    total["flops_per_token"] = total["flops"] / total["tokens"] if total["tokens"] else 0.0
    total["final_metrics"] = phases[-1]["final_metrics"]
    if named:
        total["phases"] = phases
    return total


def train_model(cfg: Config):
    """``fit`` one config (resuming ``cfg.ckpt_path`` when set) → (the trained HSATransformer, training summary: the
    tokens and FLOPs the module counted, batch by batch, schedules included)."""
    module, datamodule, trainer = build_run(cfg)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=WEIGHTS_ONLY)
    seconds = round(time.perf_counter() - start, 1)
    info = {"steps": trainer.global_step, "tokens": module.tokens_seen, "seconds": seconds, "flops": module.flops_seen,
            "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}}
    return module.model, info


def load_trained(path: Path):
    """``<run>.weights.pt`` → (HSATransformer on the CPU in fp32, training summary)."""
    if not path.is_file():
        raise ConfigError(f"'{path}' does not exist: train the model first (run without --eval-only)")
    net, checkpoint = load_net(path)  # weights_only: a crafted file is refused, nothing of it runs
    if "train" not in checkpoint:
        raise ConfigError(f"'{path}' is not a weights file written by `main.py experiment` (it records no training)")
    return net, checkpoint["train"]


# ------------------------------------------------------------------------------------------------ evaluation

def check_held_out(exp: Experiment, model: str, cfg: Config) -> None:
    """Perplexity on a held-out split too small for it would run over repeated text (``held_out_tokens`` cycles):
    refuse before training."""
    need = max([exp.eval.ppl_windows * cfg.data.seq_len + 1 if exp.eval.ppl_windows else 0,
                *(n + 1 for n in exp.ppl_lengths(model))])
    if not need:
        return
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.eos_token)
    have = len(held_out_prefix(cfg.data, tokenizer, need))
    if have < need:
        raise ConfigError(f"model '{model}': eval.ppl_windows × data.seq_len and eval.ppl_lengths need {need:,} "
                          f"held-out tokens, the held-out split has {have:,}: raise data.val_fraction (it is "
                          f"{cfg.data.val_fraction}) or lower them")


def run_model(exp: Experiment, model: str, eval_only: bool = False, seed: Optional[int] = None) -> dict:
    """Train one run (or, with ``eval_only``, load ``<out>/<run>.weights.pt`` from an earlier run), evaluate it
    (held-out perplexity, perplexity by position, retrieval length by length) and write ``<out>/<run>.json`` after
    every step, so a run cut short keeps what it measured. With ``eval_only``, what an existing ``<run>.json``
    holds and this evaluation does not redo is kept (other lengths; the held-out perplexity with
    ``eval.ppl_windows=0``). Training also leaves ``<out>/<run>.weights.pt`` (bf16 weights + model config)."""
    cfg = exp.phase_configs(model, seed)[-1][1]  # the last phase's: its context length is the training length
    run = run_name(model, seed)
    out = Path(exp.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights, json_path = out / f"{run}.weights.pt", out / f"{run}.json"
    if eval_only:
        net, train_info = load_trained(weights)
    else:
        net, train_info = train_run(exp, model, seed)
        save_weights(weights, {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                               for k, v in net.state_dict().items()}, weights_hparams(net, cfg), train=train_info)
    # Lightning hands the model back on the CPU after fit: evaluate on the accelerator the model trained on.
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu")
    net.to(device).eval()
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.eos_token)
    total, active = net.num_parameters()
    result = {
        "experiment": exp.name, "model": model, "run": run, "seed": seed, "overrides": list(exp.models[model]),
        # the phases as run (command-line overrides included: a variant's record is in its file, not only its folder)
        "phases": [{"name": p.name, "max_steps": p.max_steps, "overrides": list(p.overrides)} for p in exp.phases],
        "data_config": asdict(cfg.data),  # the last phase's
        "model_config": asdict(net.running_config()), "train_seq_len": cfg.data.seq_len, "train": train_info,
        "parameters": {"total": total, "active": active}, "eval_seconds": 0.0,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"),
        "perplexity": None, "perplexity_by_position": {}, "retrieval": [],
    }
    if eval_only and json_path.is_file():
        keep_earlier(result, json.loads(json_path.read_text()), exp, model)

    def timed(measure):
        start = time.perf_counter()
        with autocast(device):
            value = measure()
        seconds = time.perf_counter() - start
        result["eval_seconds"] = round(result["eval_seconds"] + seconds, 1)
        return value, seconds

    ppl_lengths = exp.ppl_lengths(model)
    if exp.eval.ppl_windows or ppl_lengths:
        n = max([exp.eval.ppl_windows * cfg.data.seq_len + 1, *(n + 1 for n in ppl_lengths)])
        text = held_out_tokens(cfg.data, tokenizer, n)
    if exp.eval.ppl_windows:
        result["perplexity"], seconds = timed(
            lambda: held_out_perplexity(net, text, exp.eval.ppl_windows, cfg.data.seq_len, device))
        json_path.write_text(json.dumps(result, indent=2))
        print(f"{run}: held-out loss {result['perplexity']['loss']:.4f}, perplexity {result['perplexity']['ppl']:.3f} "
              f"({exp.eval.ppl_windows} × {cfg.data.seq_len} tokens, {seconds:.0f} s)", flush=True)
    for length in ppl_lengths:
        # length + 1 tokens: ``length`` predictions, so the last bucket ends at the length itself
        rows, seconds = timed(lambda: perplexity_by_position(net, text[: length + 1], exp.eval.segment_size, device))
        result["perplexity_by_position"][str(length)] = rows
        json_path.write_text(json.dumps(result, indent=2))
        print(f"{run}: loss by position over {short_length(length)}: "
              + ", ".join(f"<{short_length(r['to'])} {r['loss']:.3f}" for r in rows) + f" ({seconds:.0f} s)",
              flush=True)
    lengths = exp.lengths(model)
    haystack = held_out_tokens(cfg.data, tokenizer, 2 * max(lengths)) if lengths else None
    for length in lengths:
        rows, seconds = timed(lambda: evaluate_retrieval(
            net, tokenizer, haystack, exp.eval.tasks, [length], exp.eval.depths, exp.eval.samples, exp.eval.seed,
            exp.eval.segment_size, device))
        result["retrieval"] += rows_as_dicts(rows)
        json_path.write_text(json.dumps(result, indent=2))
        print(f"{run} @ {short_length(length)}: " + ", ".join(f"{task} {acc:.2f}" for task, acc in
                                                              task_means(rows_as_dicts(rows)).items())
              + f" ({seconds:.0f} s)", flush=True)
    json_path.write_text(json.dumps(result, indent=2))
    return result


def keep_earlier(result: dict, earlier: dict, exp: Experiment, model: str) -> None:
    """An eval-only run (e.g. longer lengths in a later GPU session) adds to what the earlier runs measured and
    replaces only what it evaluates again."""
    lengths, ppl_lengths = exp.lengths(model), {str(n) for n in exp.ppl_lengths(model)}
    result["retrieval"] = [r for r in earlier.get("retrieval", []) if r["length"] not in lengths]
    result["eval_seconds"] = earlier.get("eval_seconds", 0.0)
    if not exp.eval.ppl_windows:
        result["perplexity"] = earlier.get("perplexity")
    result["perplexity_by_position"] = {n: rows for n, rows in earlier.get("perplexity_by_position", {}).items()
                                        if n not in ppl_lengths}


def task_means(rows: list[dict]) -> dict[str, float]:
    """Retrieval rows → {task: accuracy averaged over lengths, depths and samples}."""
    return {task: float(np.mean([r["accuracy"] for r in rows if r["task"] == task]))
            for task in sorted({r["task"] for r in rows})}


def run_experiment(path: str, overrides: list[str], models: Optional[list[str]] = None,
                   summarize_only: bool = False, eval_only: bool = False,
                   seeds: Optional[list[int]] = None) -> Optional[dict]:
    exp = load_experiment(path, overrides)
    chosen = models or list(exp.models)
    for model in chosen:
        check_choice("--models", model, tuple(exp.models))
    if seeds is not None and exp.seeds is None:
        raise ConfigError("--seeds: the experiment has no seeds list (add seeds: [0, 1] to it, or seeds=[0,1])")
    for seed in seeds or []:
        check_choice("--seeds", str(seed), tuple(str(s) for s in exp.seeds))
    if not summarize_only:
        runs = exp.runs(chosen, seeds)
        for model in dict.fromkeys(m for m, _ in runs):  # held-out text large enough, before anything trains
            check_held_out(exp, model, exp.phase_configs(model, runs[0][1])[-1][1])
        for model, seed in runs:
            result = run_model(exp, model, eval_only, seed)
            print(f"{result['run']}: trained {result['train']['steps']} steps in {result['train']['seconds']:.0f} s, "
                  f"evaluated in {result['eval_seconds']:.0f} s", flush=True)
    summary = summarize(exp.out_dir, exp.eval.reference_model)
    if summary is None:
        raise ConfigError(f"no model results in '{exp.out_dir}' to summarize")
    print((Path(exp.out_dir) / "summary.md").read_text())
    return summary
