"""Command-line entry: ``python main.py {fit,validate} --config FILE [dotted.key=value ...]``.

Configuration and data problems are reported as one line on stderr with exit code 2, before any training starts.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import warnings
from pathlib import Path

from .config import Config, ConfigError, load_config, padded_vocab, save_config

COMMANDS = ("fit", "validate", "generate", "eval", "consolidate", "experiment", "merge")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "generate":
        return parse_generate_args(argv[1:])
    if argv and argv[0] == "eval":
        return parse_eval_args(argv[1:])
    if argv and argv[0] == "experiment":
        return parse_experiment_args(argv[1:])
    if argv and argv[0] == "merge":
        parser = argparse.ArgumentParser(prog="main.py merge", description="Fold LoRA adapters into a full checkpoint.")
        parser.add_argument("--ckpt", required=True, help="a LoRA fine-tuning checkpoint (finetune.method=lora)")
        parser.add_argument("--base", help="its base checkpoint (default: the one recorded in --ckpt)")
        parser.add_argument("--out", required=True, help="the full single-file checkpoint to write")
        args = parser.parse_args(argv[1:])
        args.command = "merge"
        return args
    if argv and argv[0] == "consolidate":
        parser = argparse.ArgumentParser(prog="main.py consolidate",
                                         description="Turn a sharded (FSDP) checkpoint folder into one file.")
        parser.add_argument("--ckpt", required=True, help="the checkpoint folder (…/checkpoints/last.ckpt/)")
        parser.add_argument("--out", required=True, help="the single-file checkpoint to write")
        args = parser.parse_args(argv[1:])
        args.command = "consolidate"
        return args
    parser = argparse.ArgumentParser(prog="main.py", description="Train and evaluate HSA-UltraLong models.")
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--config", "-c", help="YAML config (configs/tiny.yaml); omitted keys keep their defaults")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. trainer.max_steps=30")
    return parser.parse_intermixed_args(argv)


def _checkpoint_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `main.py fit`")
    parser.add_argument("--segment-size", type=int, default=4096, help="prefill segment length (bounds memory)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_eval_args(argv: list[str]) -> argparse.Namespace:
    parser = _checkpoint_parser("main.py eval", "RULER-style retrieval accuracy and perplexity by position.")
    parser.add_argument("--tasks", default="niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt")
    parser.add_argument("--lengths", default="1k,4k", help="comma-separated, k/m suffixes: 4k,64k,1m")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    parser.add_argument("--samples", type=int, default=4, help="samples per task × length × depth")
    parser.add_argument("--ppl-length", default="0", help="tokens of held-out text for perplexity by position (0: skip)")
    parser.add_argument("--config", help="YAML whose data section names the haystack text (default: embedded corpus)")
    parser.add_argument("--out", default="eval_results", help="folder for eval.json, PNG plots, TensorBoard events")
    args = parser.parse_args(argv)
    args.command = "eval"
    return args


def parse_experiment_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="main.py experiment",
                                     description="Train several models with one recipe, evaluate retrieval by length.")
    parser.add_argument("--config", "-c", required=True, help="experiment YAML (configs/experiments/*.yaml)")
    parser.add_argument("--models", help="comma-separated subset of the file's models (default: all)")
    parser.add_argument("--summarize-only", action="store_true", help="only rebuild the summary from <out_dir>/*.json")
    parser.add_argument("--eval-only", action="store_true", help="evaluate <out_dir>/<model>.weights.pt, no training")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.trainer.max_steps=10 out_dir=x")
    args = parser.parse_intermixed_args(argv)
    args.command = "experiment"
    return args


def parse_generate_args(argv: list[str]) -> argparse.Namespace:
    parser = _checkpoint_parser("main.py generate", "Generate text from a checkpoint.")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", help="file holding the prompt (any length: it is prefilled in segments)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--compile", action="store_const", const="inductor", default=None,
                        help="compile the decoding step's blocks (CUDA; tens of seconds once, then faster tokens)")
    args = parser.parse_args(argv)
    args.command = "generate"
    return args


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def consolidate(folder: str, out: str) -> None:
    """Gather every rank's shard of a distributed checkpoint into one file that `generate`, `eval`, `init_from=` and
    `HSALitModule.load_from_checkpoint` read like any other (weights, hyper-parameters, optimizer state, step)."""
    import torch
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    if not Path(folder).is_dir():
        raise ConfigError(f"--ckpt '{folder}' is not a sharded checkpoint folder")
    checkpoint = _load_distributed_checkpoint(Path(folder))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    print(f"wrote {out} ({sum(v.numel() for v in checkpoint['state_dict'].values()):,} parameters)")


def load_checkpoint(path: str, device: str):
    """A `fit` checkpoint → (model in eval mode, tokenizer)."""
    from data_modules.tokenizers import build_tokenizer

    from .checkpoint_io import WEIGHTS_ONLY, load_checkpoint_file
    from .module import HSALitModule

    if not Path(path).is_file():
        raise ConfigError(f"--ckpt '{path}' does not exist")
    load_checkpoint_file(path)  # refuses unsafe or unreadable files with one line, before Lightning reads it
    module = HSALitModule.load_from_checkpoint(path, map_location=device, weights_only=WEIGHTS_ONLY)
    tokenizer = build_tokenizer(module.hparams.get("tokenizer", "byte"), module.hparams.get("eos_token"))
    return module.model.eval(), tokenizer


def run_generate(args: argparse.Namespace) -> None:
    import torch

    from .generate import generate

    if args.prompt_file is not None and not Path(args.prompt_file).is_file():
        raise ConfigError(f"--prompt-file '{args.prompt_file}' does not exist")
    if args.prompt_file is None and not args.prompt:
        raise ConfigError("--prompt is empty: give at least one character")
    if args.segment_size < 1:
        raise ConfigError(f"--segment-size must be >= 1, got {args.segment_size}")
    if args.compile and not str(args.device).startswith("cuda"):
        raise ConfigError(f"--compile speeds up CUDA-graph decoding: it needs a CUDA --device, got '{args.device}'")
    model, tokenizer = load_checkpoint(args.ckpt, args.device)
    text = Path(args.prompt_file).read_text() if args.prompt_file is not None else args.prompt
    prompt = torch.as_tensor(tokenizer.encode(text), dtype=torch.long, device=args.device)[None]
    if prompt.shape[1] == 0:
        raise ConfigError(f"the prompt{'' if args.prompt_file is None else f' in {args.prompt_file!r}'} is empty "
                          "(no tokens): give at least one character")
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_p, tokenizer.eos_id,
                   args.segment_size, torch.Generator(device=args.device).manual_seed(args.seed), compile=args.compile)
    print(tokenizer.decode(out[0, prompt.shape[1] :].tolist()))


def build_run(cfg: Config, command: str = "fit"):
    """Config → (LightningModule, DataModule, Trainer) for ``command`` (fit or validate: where it logs, see
    ``run_logger``). Resolves the vocabulary from the tokenizer. Creates no version folder: the logger makes it when
    the trainer starts, and the resolved config is written there then (``config_saver``)."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from data_modules.text import TextDataModule

    from .callbacks import AttentionSchedule, ContextCurriculum, MFUThroughputMonitor, RetrievalEval, RetrievalMonitor
    from .module import HSALitModule, quiet_library_notices

    quiet_library_notices()
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    datamodule = TextDataModule(cfg.data, cfg.model.chunk_size, cfg.trainer.seq_len_schedule)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = padded_vocab(datamodule.vocab_size)
    elif cfg.model.vocab_size < datamodule.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({datamodule.vocab_size}); set it to null to follow the tokenizer"
        )
    t = cfg.trainer
    module = HSALitModule(cfg.model, cfg.optim, t.max_steps, cfg.data.tokenizer, cfg.data.eos_token, t.nan_policy,
                          t.activation_checkpointing, t.compile, finetune=cfg.finetune,
                          max_consecutive_nonfinite=t.max_consecutive_nonfinite)
    load_start_weights(module, cfg)  # before the Trainer: a bad checkpoint is one line, with no run folder made

    logger = run_logger(cfg, command)
    run_dir = Path(logger.log_dir)
    try:  # the run's parent folder only (not version_N: a run refused before it starts leaves none)
        Path(t.root_dir, t.run_name).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run directory '{run_dir}': {e.strerror or e}") from None
    # validate saves nothing; with the checkpoint's own folder the checkpointers take back their state from it
    # without Lightning warning that their folder changed. A resumed fit writes into its own folder on purpose.
    checkpoint_dir = Path(cfg.ckpt_path).parent if command == "validate" and cfg.ckpt_path else run_dir / "checkpoints"
    if command == "fit" and resumed_version(cfg.ckpt_path, Path(t.root_dir, t.run_name)) is not None:
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Two checkpointers: `last` every N steps whatever validation does (Lightning defers a monitored checkpointer's
    # periodic saves, `last` included, until the monitored metric exists: a crash before the first validation
    # would leave nothing to resume), and the best by val/loss after each validation.
    last_checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=0, save_last=True,
                                      every_n_train_steps=t.checkpoint_every_n_steps)
    best_checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, filename="step{step:06d}-val{val/loss:.3f}",
                                      auto_insert_metric_name=False, monitor="val/loss", mode="min", save_top_k=1)
    trainer = L.Trainer(
        strategy=make_strategy(t), num_nodes=t.num_nodes, accelerator=t.accelerator, devices=t.devices, precision=t.precision, max_steps=t.max_steps, max_time=t.max_time,
        accumulate_grad_batches=t.accumulate_grad_batches, gradient_clip_val=t.gradient_clip_val,
        val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps, logger=logger,
        callbacks=[last_checkpoint, best_checkpoint, LearningRateMonitor(logging_interval="step"), RetrievalMonitor(t.retrieval_stats_every),
                   MFUThroughputMonitor(batch_size_fn=lambda b: b["input_ids"].shape[0],
                                        window_size=max(2, t.log_every_n_steps),
                                        length_fn=lambda b: b["input_ids"].numel()),
                   AttentionSchedule(t.topk_schedule, t.swa_window_schedule), ContextCurriculum(),
                   RetrievalEval(t.eval_every_n_steps, t.eval_tasks, t.eval_lengths, t.eval_samples, cfg.data),
                   config_saver(cfg)],
        # the train loader ends at each seq_len_schedule stage: a new epoch, with a loader of the new shape
        reload_dataloaders_every_n_epochs=1, deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar, default_root_dir=t.root_dir,
    )
    return module, datamodule, trainer


def load_start_weights(module, cfg: Config) -> None:
    """Check ``ckpt_path`` / ``init_from`` (weights-only reads, shapes against ``module``) and load ``init_from``'s
    weights. LoRA: the frozen base weights; Lightning then restores the adapters from ``ckpt_path`` (resume)."""
    if cfg.finetune.method == "lora":
        from .finetune import load_lora_base

        load_lora_base(module, cfg.init_from, cfg.ckpt_path)
        return
    for path in (cfg.ckpt_path, cfg.init_from):
        if path and Path(path).is_file():  # a sharded (folder) checkpoint is checked by the strategy on load
            state = checkpoint_state(path, module)
    if cfg.init_from:
        module.load_state_dict(state)  # weights (and MoE balancing biases) only: fresh optimizer and schedule


def run_logger(cfg: Config, command: str):
    """The TensorBoardLogger of a run under ``<root_dir>/<run_name>/``.

    ``fit`` resuming (``ckpt_path=``) a checkpoint of this run's own ``version_K/checkpoints/`` continues in
    ``version_K``: one folder keeps the whole run's events (appended) and checkpoints. Any other ``fit`` starts the
    next ``version_N``. ``validate`` never starts a training version: it logs to ``version_K/validate/`` when its
    checkpoint is this run's ``version_K``, else to ``validate/version_N/``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    t = cfg.trainer
    version = resumed_version(cfg.ckpt_path, Path(t.root_dir, t.run_name))
    if command == "validate" and version is None:
        return TensorBoardLogger(save_dir=Path(t.root_dir, t.run_name), name="validate")
    if command == "validate":
        version = str(Path(f"version_{version}", "validate"))
    return TensorBoardLogger(save_dir=t.root_dir, name=t.run_name, version=version)


def resumed_version(ckpt_path: str | None, run_root: Path) -> int | None:
    """K when ``ckpt_path`` lies in ``run_root/version_K/checkpoints/`` (a file, or a sharded checkpoint's folder)."""
    if not ckpt_path:
        return None
    try:
        parts = Path(ckpt_path).resolve().relative_to(run_root.resolve()).parts
    except ValueError:  # not under run_root
        return None
    match = re.fullmatch(r"version_(\d+)", parts[0]) if len(parts) > 2 and parts[1] == "checkpoints" else None
    return int(match.group(1)) if match else None


def config_saver(cfg: Config):
    """A callback writing the resolved config to the run's log folder when the trainer starts (rank zero), rather
    than when the run is built: a run refused before it starts (bad checkpoint) leaves no version folder. A resumed
    run overwrites it with the config it continues under."""
    from lightning.pytorch.callbacks import LambdaCallback

    def save(trainer, module, stage) -> None:
        if trainer.is_global_zero:
            Path(trainer.logger.log_dir).mkdir(parents=True, exist_ok=True)
            save_config(cfg, Path(trainer.logger.log_dir) / "config.yaml")

    return LambdaCallback(setup=save)


def checkpoint_state(path: str, module) -> dict:
    """The model weights of a checkpoint, checked against ``module``: mismatches raise one ConfigError naming them."""
    from .checkpoint_io import load_checkpoint_file
    from .lora import is_adapter_key

    checkpoint = load_checkpoint_file(path)
    if checkpoint.get("lora_base"):
        raise ConfigError(f"checkpoint '{path}' holds LoRA adapters only: resume it with finetune.method=lora, or "
                          f"make a full one with `python main.py merge --ckpt {path} --out merged.ckpt`")
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"checkpoint '{path}' holds no state_dict: not a checkpoint written by `main.py fit`")
    state = checkpoint["state_dict"]
    problems = state_problems(state, {k: v for k, v in module.state_dict().items() if not is_adapter_key(k)})
    if problems:
        raise ConfigError(f"checkpoint '{path}' does not fit this model config ({problems}); check the model.* keys")
    return state


def state_problems(state: dict, own: dict) -> str:
    """The first differences in keys and shapes between a loaded ``state`` and a module's ``own``, one line ('' if
    none)."""
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in state and state[k].shape != v.shape]
    return "; ".join(problems[:4]) + (f"; … {len(problems) - 4} more" if len(problems) > 4 else "")


def make_strategy(t):
    """auto: Lightning's choice (one device, or DDP); fsdp: FSDP2 through ModelParallelStrategy with every device
    data-parallel (sharded distributed checkpoints: a folder per checkpoint; `main.py consolidate` makes one file)."""
    if t.strategy != "fsdp":
        return t.strategy
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    if str(t.devices).isdigit():
        per_node = int(t.devices)
    elif t.accelerator != "cpu" and torch.cuda.is_available():
        per_node = torch.cuda.device_count()
    else:
        per_node = 1
    return ModelParallelStrategy(data_parallel_size=per_node * t.num_nodes, tensor_parallel_size=1)


def run(command: str, cfg: Config) -> None:
    from .checkpoint_io import WEIGHTS_ONLY

    module, datamodule, trainer = build_run(cfg, command)
    log_dir = Path(trainer.logger.log_dir)
    fresh = not log_dir.exists()
    try:  # build_run read a ckpt_path file weights-only (load_start_weights); Lightning reads it so again
        if command == "fit":
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=WEIGHTS_ONLY)
        else:
            trainer.validate(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=WEIGHTS_ONLY)
    except Exception:
        # A run that failed before its first batch (e.g. a data error in setup) leaves no version folder holding
        # only a config and an empty event file; one that ran a batch keeps its logs for the post-mortem.
        if fresh and trainer.is_global_zero and not ran_a_batch(trainer):
            shutil.rmtree(log_dir, ignore_errors=True)
        raise


def ran_a_batch(trainer) -> bool:
    """Whether this trainer ran a training or (``validate``) validation batch, resumed progress included."""
    loops = (trainer.fit_loop.epoch_loop.batch_progress, trainer.validate_loop.batch_progress)
    return any(progress.total.completed > 0 for progress in loops)


def one_line(error: Exception) -> str:
    """A DataLoader worker re-raises our error with the worker's traceback in the message: keep its last line."""
    last = str(error).strip().splitlines()[-1]
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def main(argv: list[str] | None = None) -> int:
    from data_modules.sources import DataError

    args = parse_args(argv)
    try:
        if args.command == "generate":
            run_generate(args)
            return 0
        if args.command == "consolidate":
            consolidate(args.ckpt, args.out)
            return 0
        if args.command == "merge":
            from .finetune import merge_checkpoint

            merge_checkpoint(args.ckpt, args.out, args.base)
            return 0
        if args.command == "experiment":
            from .experiment import run_experiment

            models = [m.strip() for m in args.models.split(",")] if args.models else None
            run_experiment(args.config, args.overrides, models, args.summarize_only, args.eval_only)
            return 0
        if args.command == "eval":
            from .eval.run import run_eval

            run_eval(args)
            return 0
        cfg = load_config(args.config, args.overrides)
        run(args.command, cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # NonFiniteLossError (trainer.nan_policy: stop)
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0
