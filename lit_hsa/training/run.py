"""Run assembly: a ``Config`` → (``HSALitModule``, ``TextDataModule``, Lightning ``Trainer``), with its logger (one
version folder per run, resumes included), checkpointers, callbacks and strategy; ``run`` fits or validates it."""
from __future__ import annotations

import re
import shutil
import warnings
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LambdaCallback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy

from data_modules.text import TextDataModule
from lit_hsa.checkpoint_io import WEIGHTS_ONLY, checkpoint_state
from lit_hsa.config import Config, ConfigError, padded_vocab, save_config
from lit_hsa.finetune.checkpoints import load_lora_base
from lit_hsa.training.callbacks import (
    AttentionSchedule,
    ContextCurriculum,
    MFUThroughputMonitor,
    RetrievalEval,
    RetrievalMonitor,
    progress_bar,
)
from lit_hsa.training.faults import AtomicCheckpointIO, Preemption, RunFolderLock, remove_stale_temporaries
from lit_hsa.training.module import HSALitModule, quiet_library_notices


def build_run(cfg: Config, command: str = "fit"):
    """Config → (LightningModule, DataModule, Trainer) for ``command`` (fit or validate: where it logs, see
    ``run_logger``). Resolves the vocabulary from the tokenizer. Creates no version folder: the logger makes it when
    the trainer starts, and the resolved config is written there then (``config_saver``)."""
    quiet_library_notices()
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    cp = cfg.trainer.context_parallel
    datamodule = TextDataModule(cfg.data, cfg.model.chunk_size, cfg.trainer.seq_len_schedule, context_parallel=cp)
    if cfg.model.vocab_size is None:
        cfg.model = replace(cfg.model, vocab_size=padded_vocab(datamodule.vocab_size))
    elif cfg.model.vocab_size < datamodule.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({datamodule.vocab_size}); set it to null to follow the tokenizer"
        )
    t = cfg.trainer
    if t.limit_val_batches != 0:  # data errors before the model is built (and before any run folder)
        datamodule.validation_samples()
    module = HSALitModule(cfg.model, cfg.optim, t.max_steps, cfg.data.tokenizer, cfg.data.eos_token, t.nan_policy,
                          t.activation_checkpointing, t.compile, finetune=cfg.finetune,
                          max_consecutive_nonfinite=t.max_consecutive_nonfinite, meta_init=t.strategy == "fsdp",
                          context_parallel=cp)
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
    # enable_version_counter=False: a resume writes its last.ckpt over the one it started from, not last-v1.ckpt
    last_checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=0, save_last=True,
                                      every_n_train_steps=t.checkpoint_every_n_steps, enable_version_counter=False)
    best_checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, filename="step{step:06d}-val{val/loss:.3f}",
                                      auto_insert_metric_name=False, monitor="val/loss", mode="min", save_top_k=1)
    trainer = L.Trainer(
        strategy=make_strategy(t), num_nodes=t.num_nodes, accelerator=t.accelerator, devices=t.devices,
        precision=t.precision, max_steps=t.max_steps, max_time=t.max_time,
        accumulate_grad_batches=t.accumulate_grad_batches, gradient_clip_val=t.gradient_clip_val,
        val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps, logger=logger,
        callbacks=[last_checkpoint, best_checkpoint, LearningRateMonitor(logging_interval="step"),
                   RetrievalMonitor(t.retrieval_stats_every),
                   # per rank: its 1/N of the group's tokens (samples stay whole: Lightning wants >= 1 per batch,
                   # so samples/s counts a sequence once per rank of its context group)
                   MFUThroughputMonitor(batch_size_fn=lambda b: b["input_ids"].shape[0],
                                        window_size=max(2, t.log_every_n_steps),
                                        length_fn=lambda b: b["input_ids"].numel() // cp),
                   AttentionSchedule(t.topk_schedule, t.swa_window_schedule), ContextCurriculum(),
                   RetrievalEval(t.eval_every_n_steps, t.retrieval_eval(), cfg.data),
                   config_saver(cfg), Preemption(checkpoint_dir),
                   *([progress_bar()] if t.enable_progress_bar else [])],
        plugins=[AtomicCheckpointIO()],
        # the train loader ends at each seq_len_schedule stage: a new epoch, with a loader of the new shape
        reload_dataloaders_every_n_epochs=1, deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar, default_root_dir=t.root_dir,
    )
    return module, datamodule, trainer


def load_start_weights(module, cfg: Config) -> None:
    """Check ``ckpt_path`` / ``init_from`` (weights-only reads, shapes against ``module``) and load ``init_from``'s
    weights. LoRA: the frozen base weights; Lightning then restores the adapters from ``ckpt_path`` (resume)."""
    if cfg.finetune.method == "lora":
        load_lora_base(module, cfg.init_from, cfg.ckpt_path)
        return
    if cfg.ckpt_path and Path(cfg.ckpt_path).is_file():  # a sharded (folder) checkpoint: the strategy checks it
        # keys and shapes only, so mapped rather than read: Lightning reads the whole file (optimizer state too) to
        # resume
        checkpoint_state(cfg.ckpt_path, module, mmap=True)
    if cfg.init_from and module.init_rng_state is not None:  # built on meta: mapped now, written into the shards later
        module.init_state = checkpoint_state(cfg.init_from, module, mmap=True)
    elif cfg.init_from:  # weights (and MoE balancing biases) only: fresh optimizer and schedule
        module.load_state_dict(checkpoint_state(cfg.init_from, module))


def run_logger(cfg: Config, command: str):
    """The TensorBoardLogger of a run under ``<root_dir>/<run_name>/``.

    ``fit`` resuming (``ckpt_path=``) a checkpoint of this run's own ``version_K/checkpoints/`` continues in
    ``version_K``: one folder keeps the whole run's events (appended) and checkpoints. Any other ``fit`` starts the
    next ``version_N``. ``validate`` never starts a training version: it logs to ``version_K/validate/`` when its
    checkpoint is this run's ``version_K``, else to ``validate/version_N/``."""
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
    def save(trainer, module, stage) -> None:
        if trainer.is_global_zero:
            Path(trainer.logger.log_dir).mkdir(parents=True, exist_ok=True)
            save_config(cfg, Path(trainer.logger.log_dir) / "config.yaml")

    return LambdaCallback(setup=save)


def make_strategy(t):
    """auto: Lightning's choice (one device, or DDP); fsdp: FSDP2 through ModelParallelStrategy with every device
    data-parallel (sharded distributed checkpoints: a folder per checkpoint; `main.py consolidate` makes one file)."""
    if t.strategy != "fsdp":
        return t.strategy
    if str(t.devices).isdigit():
        per_node = int(t.devices)
    elif t.accelerator != "cpu" and torch.cuda.is_available():
        per_node = torch.cuda.device_count()
    else:
        per_node = 1
    return ModelParallelStrategy(data_parallel_size=per_node * t.num_nodes, tensor_parallel_size=1)


def run(command: str, cfg: Config) -> None:
    if command == "validate" and not cfg.ckpt_path and not cfg.init_from:
        raise ConfigError("validate needs the checkpoint to validate: ckpt_path=runs/<run>/version_N/checkpoints/"
                          "last.ckpt (or init_from=); without one it would validate a randomly initialised model")
    module, datamodule, trainer = build_run(cfg, command)
    log_dir = Path(trainer.logger.log_dir)
    fresh = not log_dir.exists()
    lock = RunFolderLock(log_dir) if command == "fit" and trainer.is_global_zero else nullcontext()
    try:  # build_run read a ckpt_path file weights-only (load_start_weights); Lightning reads it so again
        with lock:
            if trainer.is_global_zero:
                remove_stale_temporaries(log_dir / "checkpoints")
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
    if command == "fit" and trainer.is_global_zero:
        print(saved_checkpoints(trainer))


def saved_checkpoints(trainer) -> str:
    """The line a finished ``fit`` ends with: where its checkpoints are."""
    parts = []
    for callback in trainer.checkpoint_callbacks:
        if callback.last_model_path:
            parts.append(f"last {callback.last_model_path}")
        if callback.monitor and callback.best_model_path:
            parts.append(f"best by {callback.monitor} ({float(callback.best_model_score):.4f}) "
                         f"{callback.best_model_path}")
    return "checkpoints: " + ("; ".join(parts) or "none written")


def ran_a_batch(trainer) -> bool:
    """Whether this trainer ran a training or (``validate``) validation batch, resumed progress included."""
    loops = (trainer.fit_loop.epoch_loop.batch_progress, trainer.validate_loop.batch_progress)
    return any(progress.total.completed > 0 for progress in loops)
