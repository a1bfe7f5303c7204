"""``HSALitModule``: the LightningModule around ``HSATransformer`` — loss, metrics, optimizer, LR schedule,
MoE balancing updates and their logging."""
from __future__ import annotations

import logging
import math
import re
import warnings
from contextlib import nullcontext
from dataclasses import asdict

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core import rank_zero  # Lightning's rank_zero_info writes through this logger
from torchmetrics import MeanMetric

from lit_hsa.config import ConfigError, FinetuneConfig, ModelConfig, OptimConfig
from lit_hsa.finetune.checkpoints import check_adapters
from lit_hsa.model.init import load_full_state, materialize
from lit_hsa.model.lora import apply_lora, cast_frozen_matrices, lora_state_dict
from lit_hsa.model.loss import IGNORE_INDEX
from lit_hsa.model.moe import expert_load_stats
from lit_hsa.model.transformer import HSATransformer
from lit_hsa.training.context_parallel import ContextGroup, context_parallel_loss, whole_loss
from lit_hsa.training.flops import training_flops_per_token
from lit_hsa.training.parallel import parallelize


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient norm became NaN or inf (trainer.nan_policy: stop), or too many steps in a row
    were skipped for it (trainer.nan_policy: skip, trainer.max_consecutive_nonfinite)."""


class _LightningTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger / litmodels" adverts, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_library_notices() -> None:
    """Silence what every run printed without saying anything about the run: Lightning's adverts for its cloud
    products, torch's FutureWarning about Lightning's own use of ``LeafSpec``, and Lightning's warning that
    ``training_step`` returned None (on purpose: a skipped non-finite batch, counted in train/skipped_nonfinite).
    Idempotent."""
    if not any(isinstance(f, _LightningTips) for f in rank_zero.log.filters):
        rank_zero.log.addFilter(_LightningTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`training_step` returned `None`")


def lr_lambda(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of ``cfg.lr``: linear warm-up, then constant or cosine down to ``cfg.min_lr`` at ``max_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def parameter_groups(named_parameters, cfg: OptimConfig) -> list[dict]:
    """AdamW's parameter groups: weight decay on matrices only (norms, biases, the [CLS] vector and scalars are left
    alone), and each ``cfg.lr_scale`` [pattern, scale] in its own groups at lr × scale (the first pattern a name
    matches wins). A pattern that matches no trainable parameter is a ConfigError."""
    scales = [(re.compile(pattern), float(scale)) for pattern, scale in cfg.lr_scale]
    # the two unscaled groups always exist (a LoRA run may have no parameter without decay), so that the optimizer
    # state of a checkpoint has the same groups whatever trains
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    matched = [False] * len(scales)
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        index = next((i for i, (regex, _) in enumerate(scales) if regex.search(name)), None)
        scale = 1.0 if index is None else scales[index][1]
        if index is not None:
            matched[index] = True
        groups.setdefault((p.dim() >= 2 and "embed" not in name, scale), []).append(p)
    unmatched = [pattern for (pattern, _), hit in zip(cfg.lr_scale, matched) if not hit]
    if unmatched:
        raise ConfigError(f"optim.lr_scale: pattern '{unmatched[0]}' matches no trainable parameter")
    return [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * scale}
            for (decay, scale), params in sorted(groups.items(), key=lambda item: (item[0][1], not item[0][0]))]


def schedule_note(cfg: OptimConfig, step: int, max_steps: int, horizon: int) -> str:
    """The line a resume with another ``trainer.max_steps`` prints about its learning rate."""
    plan = (f"cosine to optim.min_lr={cfg.min_lr:g} at step {horizon}, then constant" if cfg.schedule == "cosine"
            else "constant after warm-up: unchanged")
    return (f"resuming at step {step} with trainer.max_steps={max_steps}: the learning-rate schedule keeps the "
            f"{horizon} steps it was planned over ({plan})")


class HSALitModule(L.LightningModule):
    """batch: ``{input_ids [B, T], labels [B, T] (−100 = no loss), doc_ids [B, T] optional, loss_weight [B, T]
    optional}``.

    ``context_parallel`` = N > 1: groups of N consecutive ranks get the same batches and each runs the model on its
    [B, T/N] slice (``lit_hsa.training.context_parallel``); a run-level setting like the device count, so it is not
    saved with the hyper-parameters (a checkpoint loads whatever the group size)."""

    def __init__(self, model: dict | ModelConfig, optim: dict | OptimConfig, max_steps: int = 1000,
                 tokenizer: str = "byte", eos_token: str | None = None, nan_policy: str = "stop",
                 activation_checkpointing: bool = False, compile: bool = False,
                 finetune: dict | FinetuneConfig | None = None, max_consecutive_nonfinite: int = 5,
                 meta_init: bool = False, context_parallel: int = 1):
        super().__init__()
        model_cfg = model if isinstance(model, ModelConfig) else ModelConfig(**model)
        optim_cfg = optim if isinstance(optim, OptimConfig) else OptimConfig(**optim)
        ft = finetune if isinstance(finetune, FinetuneConfig) else FinetuneConfig(**(finetune or {}))
        # Plain dicts in the checkpoint so it loads without pickled classes; the tokenizer spec lets `generate` and
        # `eval` rebuild the tokenizer from the checkpoint alone.
        hparams = {"model": asdict(model_cfg), "optim": asdict(optim_cfg), "max_steps": max_steps,
                   "tokenizer": tokenizer, "eos_token": eos_token, "nan_policy": nan_policy,
                   "activation_checkpointing": activation_checkpointing, "compile": compile,
                   "max_consecutive_nonfinite": max_consecutive_nonfinite}
        if ft.method != "none":  # ordinary (and merged) checkpoints keep plain hyper-parameters
            hparams["finetune"] = asdict(ft)
        self.save_hyperparameters(hparams)
        self.activation_checkpointing, self.compile_blocks = activation_checkpointing, compile
        self.model_cfg, self.optim_cfg, self.max_steps = model_cfg, optim_cfg, max_steps
        # The step count the LR schedule was planned over: a resume keeps its run's, whatever max_steps it is given
        # (a cosine re-planned over a longer run jumps back up; ``on_load_checkpoint``).
        self.schedule_horizon = max_steps
        self.nan_policy, self.max_consecutive_nonfinite = nan_policy, max_consecutive_nonfinite
        # meta_init (FSDP): the model is built on the meta device, without storage, and gets its weights after
        # sharding (configure_model), equal to an eager build's from this generator state; init_from's weights are
        # then written straight into the shards (``init_state`` below).
        self.init_rng_state = torch.get_rng_state() if meta_init and ft.method == "none" else None
        with torch.device("meta") if self.init_rng_state is not None else nullcontext():
            self.model = HSATransformer(model_cfg)
        self.init_state: dict | None = None  # init_from's checked (mapped) weights, loaded after materialising
        self.finetune_cfg = ft
        # LoRA: {"path", "fingerprint"} of the frozen base, set by lit_hsa.finetune.checkpoints.load_base, saved with
        # the adapters.
        self.lora_base: dict | None = None
        if ft.method == "lora":
            apply_lora(self.model, ft)
            if ft.lora_base_dtype == "bf16":  # the base is frozen: bf16 copies are all its matmuls need
                cast_frozen_matrices(self.model, torch.bfloat16)
            self.strict_loading = False  # LoRA checkpoints omit the frozen base weights; on_load_checkpoint checks
        self.flops_per_batch = 0.0  # read by Lightning's ThroughputMonitor (MFU); set per batch shape
        # every rank's training tokens and their FLOPs since the run began (saved, so a resume goes on counting):
        # what the schedules (top-k, window, context length) made them, batch by batch
        self.tokens_seen = 0
        self.flops_seen = 0.0
        self.nonfinite_steps = 0  # optimizer steps skipped for a NaN/inf loss or gradient norm (nan_policy: skip)
        self._consecutive_nonfinite = 0
        self._nonfinite_loss: float | None = None  # this step's non-finite loss, until on_before_optimizer_step
        self._flops_per_token: dict[tuple[int, int, int], float] = {}
        self.val_loss = MeanMetric()  # synced across ranks by torchmetrics; val/ppl = exp(val/loss)
        self.context_parallel = context_parallel
        self.context_group: ContextGroup | None = None  # made in configure_model, once the processes are up

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, doc_ids)

    def configure_model(self) -> None:
        """Called by Lightning inside the strategy's context: activation checkpointing, compile and (with
        ModelParallelStrategy) FSDP2 sharding over the data-parallel mesh, all in ``lit_hsa.training.parallel``."""
        if getattr(self, "_parallelized", False):
            return
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        parallelize(self.model, activation_checkpointing=self.activation_checkpointing, compile=self.compile_blocks,
                    mesh=mesh)
        if self.context_parallel > 1:
            # FSDP2 (if any) shards over the whole world, data × context flattened, as torchtitan does: a group's
            # ranks then hold different shards of the same weights, which is all sharding needs
            self.context_group = ContextGroup.consecutive(self.context_parallel)
        if self.init_rng_state is not None:
            device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
            materialize(self.model, device, self.init_rng_state, self.model_cfg.init_std, self.model.init_targets)
            if self.init_state is not None:
                load_full_state(self, self.init_state)
                self.init_state = None
        self._parallelized = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """LoRA: keep only what training changes (adapters, buffers) and record the base checkpoint they need."""
        checkpoint["nonfinite_steps"] = self.nonfinite_steps  # a resumed run goes on counting
        checkpoint["schedule_horizon"] = self.schedule_horizon
        checkpoint["tokens_seen"], checkpoint["flops_seen"] = self.tokens_seen, self.flops_seen
        if self.finetune_cfg.method == "lora":
            keep = lora_state_dict(self).keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
            checkpoint["lora_base"] = self.lora_base

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite_steps = int(checkpoint.get("nonfinite_steps", 0))
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
        self.flops_seen = float(checkpoint.get("flops_seen", 0.0))
        planned = checkpoint.get("schedule_horizon", checkpoint.get("hyper_parameters", {}).get("max_steps"))
        if planned is not None and int(planned) != self.max_steps:
            self.schedule_horizon = int(planned)
            rank_zero_info(schedule_note(self.optim_cfg, int(checkpoint.get("global_step", 0)),
                                                   self.max_steps, self.schedule_horizon))
        if self.finetune_cfg.method == "lora":
            check_adapters(self, checkpoint)

    def _lm_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(what to differentiate, the batch's mean loss to report), 0-d. Without context parallelism both are the
        model's loss. With it, this rank's share of its group's mean (the shares sum to the whole sequences' loss),
        times N: DDP and FSDP2 average gradients over all W ranks, which would divide the W/N groups' summed shares
        by N too many; the reported loss is the shares summed over the group (every rank of it holds it)."""
        if self.context_group is None:
            loss = self.model(batch["input_ids"], batch.get("doc_ids"), labels=batch["labels"],
                              loss_weight=batch.get("loss_weight"))
            return loss, loss
        share = context_parallel_loss(self.model, batch, self.context_group)
        return share * self.context_group.size, whole_loss(share, self.context_group)

    def _count_batch(self, batch: dict) -> None:
        """Tokens and FLOPs of the batch (``input_ids`` [B, T], the whole sequences): ``flops_per_batch`` is this
        rank's work (Lightning's ThroughputMonitor sums it over ranks), 1/N of its group's; the run's counters take
        each group's tokens once."""
        bs, T = batch["input_ids"].shape
        n = self.context_parallel
        self.flops_per_batch = self.flops_per_token(T) * bs * T / n
        world = self.trainer.world_size if self._trainer is not None else 1
        self.tokens_seen += bs * T * world // n
        self.flops_seen += self.flops_per_batch * world

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        objective, loss = self._lm_loss(batch)
        aux = self.model.aux_loss().to(loss.device)
        bs = batch["input_ids"].shape[0]
        self._count_batch(batch)
        if not torch.isfinite(loss + aux):
            return self._non_finite(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/ppl", loss.detach().exp(), batch_size=bs)
        if self.model.moe_layers():
            self.log("train/moe_aux_loss", aux, batch_size=bs)
        return objective + aux

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at ``seq_len`` with the top-k and SWA window in force now (schedules change
        them during a run), cached per combination."""
        key = (seq_len, self.model.hsa_topk, self.model.swa_window)
        if key not in self._flops_per_token:  # every step asks: the config copy and the count only on a change
            active = self.model.num_parameters()[1]
            self._flops_per_token[key] = training_flops_per_token(self.model.running_config(), active, seq_len)
        return self._flops_per_token[key]

    def _non_finite(self, loss: torch.Tensor) -> None:
        """NaN/inf loss. 'skip': no backward for this batch (returning None tells Lightning so); the optimizer step
        it belongs to is skipped and counted in ``on_before_optimizer_step``. 'stop': end the run naming the step."""
        if self.nan_policy == "skip":
            self._nonfinite_loss = loss.item()
            return None
        raise NonFiniteLossError(f"non-finite training loss ({loss.item()}) at step {self.global_step}; "
                                 "lower optim.lr or set trainer.nan_policy=skip")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # context parallel: sliced as in training, the whole sequences' loss on every rank of the group (the
        # metric's sync then weighs each group's batch N times, which leaves the weighted mean as it is)
        _, loss = self._lm_loss(batch)
        n_tokens = (batch["labels"] != IGNORE_INDEX).sum()
        self.val_loss.update(loss, weight=n_tokens)  # token-weighted mean over the whole validation set

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", loss.exp())
        self.val_loss.reset()

    def on_before_optimizer_step(self, optimizer) -> None:
        # Called once per optimizer step (also when every micro-batch was skipped), after gradient accumulation and
        # before clipping: the pre-clip norm.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else None
        if norm is not None:
            self.log("train/grad_norm", norm)
        problem = self._nonfinite_problem(grads, norm)
        if problem:
            self._skip_step(problem)
        else:
            self._consecutive_nonfinite = 0
            self._update_moe_balance()
        self.log("train/skipped_nonfinite", float(self.nonfinite_steps))

    def _nonfinite_problem(self, grads: list[torch.Tensor], norm: torch.Tensor | None) -> str | None:
        """What went non-finite in this step on any rank ('loss nan', 'gradient norm inf'), or None. Under 'stop' a
        non-finite gradient norm ends the run here. With fp16 loss scaling, overflowing gradients are the
        GradScaler's business (it skips the step and lowers the scale): only the loss counts then."""
        loss = self._nonfinite_loss
        self._nonfinite_loss = None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        if grads and any(hasattr(g, "to_local") for g in grads):  # FSDP: this rank's shards, as plain tensors
            norm = torch.linalg.vector_norm(torch.stack([g.to_local().norm() for g in grads]))
        if norm is None or scaler is not None:
            norm = torch.zeros((), device=self.device)
        flags = torch.stack([torch.tensor(float(loss is not None), device=norm.device),
                             (~torch.isfinite(norm)).float()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank skips (or stops) together
        if flags[1]:
            if self.nan_policy == "stop":
                raise NonFiniteLossError(f"non-finite gradient norm ({norm.item()}) at step {self.global_step}; "
                                         "lower optim.lr or set trainer.nan_policy=skip")
            return f"gradient norm {norm.item()}"
        if flags[0]:
            return "loss non-finite on another rank" if loss is None else f"loss {loss}"
        return None

    def _skip_step(self, problem: str) -> None:
        """trainer.nan_policy=skip: drop every gradient, so clipping and the optimizer step leave the weights and
        the optimizer state (AdamW moments, step counts) as they were, and forget the step's MoE loads. Stops the
        run after ``max_consecutive_nonfinite`` skipped steps in a row: a model that only yields NaN is dead."""
        for p in self.parameters():
            p.grad = None  # AdamW skips a parameter without a gradient entirely (no decay, no moment update)
        for moe in self.model.moe_layers():
            moe.load_accum.zero_()
        self.nonfinite_steps += 1
        self._consecutive_nonfinite += 1
        if self._consecutive_nonfinite >= self.max_consecutive_nonfinite:
            # This step's logs never reach the logger once we raise: write the final count directly.
            for logger in self.loggers:
                logger.log_metrics({"train/skipped_nonfinite": float(self.nonfinite_steps)}, step=self.global_step)
            raise NonFiniteLossError(
                f"{self._consecutive_nonfinite} optimizer steps in a row skipped for a non-finite loss or gradient "
                f"norm (the last at step {self.global_step}: {problem}); the model has diverged: lower optim.lr "
                f"(trainer.max_consecutive_nonfinite={self.max_consecutive_nonfinite})")

    @torch.no_grad()
    def _update_moe_balance(self) -> None:
        """Aux-loss-free balancing: expert load summed over the step's micro-batches and all ranks moves the bias."""
        worst = 0.0
        for i, moe in enumerate(self.model.moe_layers()):
            load = moe.load_accum.clone()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(load)
            moe.update_bias(load)
            moe.load_accum.zero_()
            stats = expert_load_stats(load)
            worst = max(worst, stats["max_violation"])
            self.log(f"moe/layer{i}_max_violation", stats["max_violation"])
            self.log(f"moe/layer{i}_bias_spread", float(moe.expert_bias.max() - moe.expert_bias.min()))
        if self.model.moe_layers():
            self.log("moe/max_violation", worst)

    def configure_optimizers(self):
        cfg = self.optim_cfg
        groups = parameter_groups(self.named_parameters(), cfg)
        # Lightning refuses gradient clipping with a fused optimizer under mixed precision (the fused step would
        # unscale gradients itself); the foreach implementation is the fast path there.
        mixed = self._trainer is not None and "mixed" in str(self.trainer.precision)
        fused = all(p.is_cuda for p in self.parameters()) and not mixed
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                      lambda step: lr_lambda(step, cfg, self.schedule_horizon))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
