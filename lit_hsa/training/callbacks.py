"""Training callbacks: retrieval statistics and heat-map, HSA top-k / SWA-window schedules, context-length
curriculum, in-training retrieval evaluation — all logged to TensorBoard."""
from __future__ import annotations

import math
import re
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor

from lit_hsa.config import RetrievalEvalOptions
from lit_hsa.eval.ruler import evaluate_retrieval
from lit_hsa.eval.run import held_out_tokens


def retrieval_stats(weights: torch.Tensor, indices: torch.Tensor, chunk_size: int, window: int) -> dict[str, float]:
    """weights, indices: [B, T, H, K] of one HSA block → scalar summaries.

    distance: chunks between a query's own chunk and a selected one; far_share: selections beyond the SWA window
    (what only HSA can reach); entropy: of the fusion weights (nats; 0 = one chunk dominates); empty_share.
    """
    valid = indices >= 0
    t = torch.arange(indices.shape[1], device=indices.device)[None, :, None, None]
    distance = (t // chunk_size - indices).float()
    n_valid = valid.sum().clamp_min(1)
    w = weights.float().clamp_min(1e-12)
    entropy = -(weights.float() * w.log() * valid).sum(-1)
    rows_with_any = valid.any(-1)
    return {
        "distance_mean": float((distance * valid).sum() / n_valid),
        "far_share": float(((distance * chunk_size > window) & valid).sum() / n_valid),
        "fusion_entropy": float(entropy[rows_with_any].mean()) if rows_with_any.any() else 0.0,
        "empty_share": float(1 - valid.float().mean()),
    }


def selection_heatmap(indices: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """indices: [T, H, K] of one sequence → image [1, C_query, C_key] in [0, 1]: how often queries of each chunk
    picked each past chunk (rows: query chunk, columns: selected chunk)."""
    T = indices.shape[0]
    n = (T + chunk_size - 1) // chunk_size
    q_chunk = (torch.arange(T, device=indices.device) // chunk_size)[:, None, None].expand_as(indices)
    valid = indices >= 0
    grid = torch.zeros(n * n, device=indices.device)
    grid.index_add_(0, (q_chunk[valid] * n + indices[valid]).long(), torch.ones(int(valid.sum()), device=grid.device))
    grid = grid.view(n, n)
    return (grid / grid.max().clamp_min(1))[None].cpu()


# The parts of an HSA model whose learning the gradient norms follow (parameter-name patterns; the first match wins):
# what selects chunks, the chunk memory's encoder and projections, and the HSA blocks' own attention. In a dense
# model converted to HSA these are the new parts, and their gradients show whether retrieval is learning at all.
HSA_PARTS = {
    "retrieval": r"\.retrieval\.|memory\.landmark",
    "chunk_memory": r"(^|\.)memory\.",
    "hsa_attention": r"upper\.\d+\.(q_proj|q_norm|hsa_norm|o_proj|gate)\b",
}


def norm_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of several tensors together (FSDP's sharded DTensors reduce over their ranks: call on every rank)."""
    return torch.linalg.vector_norm(torch.stack([t.detach().float().norm() for t in tensors]))


def hsa_learning_stats(named_parameters) -> dict[str, torch.Tensor]:
    """``grad_norm/<part>`` for each of ``HSA_PARTS`` that has gradients, ``hsa/o_proj_rms`` (the HSA blocks' output
    projections: how far they have opened from a zero start) and ``hsa/gate`` (their mean gate, with
    ``model.hsa_gate``)."""
    parts = {name: re.compile(pattern) for name, pattern in HSA_PARTS.items()}
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in parts}
    o_proj, gates = [], []
    for name, p in named_parameters:
        part = next((k for k, regex in parts.items() if regex.search(name)), None)
        if part is not None and p.grad is not None:
            grads[part].append(p.grad)
        if re.search(r"upper\.\d+\.o_proj\.weight$", name):
            o_proj.append(p)
        elif re.search(r"upper\.\d+\.gate$", name):
            gates.append(p)
    stats = {f"grad_norm/{part}": norm_of(g) for part, g in grads.items() if g}
    if o_proj:
        stats["hsa/o_proj_rms"] = norm_of(o_proj) / math.sqrt(sum(p.numel() for p in o_proj))
    if gates:
        # each gate is [1]: whole on one rank when sharded, so gather it (a few bytes) rather than reduce a sum
        whole = [getattr(g, "full_tensor", g.detach)().detach().float() for g in gates]
        stats["hsa/gate"] = torch.cat(whole).mean()
    return stats


def write_scalars(trainer, stats: dict[str, float], step: int) -> None:
    """Scalars measured at training step ``step`` (the batch index, as Lightning logs train/loss), written to the
    logger under that step (rank zero) and kept as the latest callback metrics (what a run's summary reads).
    ``self.log`` off Lightning's logging steps would hold them until the next logging step and write them there,
    under the wrong step, or never."""
    if trainer.is_global_zero and trainer.logger is not None:
        trainer.logger.log_metrics(stats, step=step)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in stats.items()})


class RetrievalMonitor(L.Callback):
    """Every ``every_n_steps`` training steps: retrieval stats per HSA block, a selection heat-map image, and the HSA
    parts' gradient norms and output scale (``hsa_learning_stats``)."""

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = every_n_steps

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # after gradient accumulation, before clipping (as train/grad_norm); on every rank: sharded norms reduce
        if trainer.global_step % self.every_n_steps or not pl_module.model.hsa_blocks():
            return
        write_scalars(trainer, {k: float(getattr(v, "full_tensor", lambda v=v: v)())
                                for k, v in hsa_learning_stats(pl_module.named_parameters()).items()},
                      trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the step this batch completed (the counter has moved on)
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0  # the last micro-batch of its step
        if not stepped or step % self.every_n_steps or not trainer.is_global_zero:
            return
        model = pl_module.model
        chunk_size = model.cfg.chunk_size
        for i, block in enumerate(model.hsa_blocks()):
            if block.last_selection is None:
                continue
            weights, indices = block.last_selection
            write_scalars(trainer, {f"retrieval/block{i}_{name}": value for name, value
                                    in retrieval_stats(weights, indices, chunk_size, model.swa_window).items()}, step)
            experiment = getattr(trainer.logger, "experiment", None)
            if experiment is not None and hasattr(experiment, "add_image"):
                experiment.add_image(f"retrieval/block{i}_selection", selection_heatmap(indices[0], chunk_size),
                                     step)


def scheduled_value(schedule: list[list[int]], step: int) -> int | None:
    """The value of the last ``[start_step, value]`` entry with ``start_step <= step`` (None before the first)."""
    current = None
    for start, value in schedule:
        if start <= step:
            current = value
    return current


class AttentionSchedule(L.Callback):
    """Change HSA top-k and the SWA window by step (e.g. dense top-k warm-up → sparse, window 512 → 4096).
    Applied before every batch from the global step, so a resumed run picks up the right values."""

    def __init__(self, topk_schedule: list[list[int]], swa_window_schedule: list[list[int]]):
        self.topk_schedule, self.swa_window_schedule = topk_schedule, swa_window_schedule

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        model = pl_module.model
        topk = scheduled_value(self.topk_schedule, trainer.global_step)
        if topk is not None and topk != model.hsa_topk:
            model.set_hsa_topk(topk)
        window = scheduled_value(self.swa_window_schedule, trainer.global_step)
        if window is not None and window != model.swa_window:
            model.set_swa_window(window)
        if self.topk_schedule:
            pl_module.log("schedule/hsa_topk", float(model.hsa_topk))
        if self.swa_window_schedule:
            pl_module.log("schedule/swa_window", float(model.swa_window))


class ContextCurriculum(L.Callback):
    """Context-length curriculum (``trainer.seq_len_schedule``): seq_len and batch size change by step at constant
    tokens per step.

    Lightning rebuilds the train loader only between epochs (the fit loop's ``setup_data``, with
    ``Trainer(reload_dataloaders_every_n_epochs=1)``), so each curriculum stage is one epoch: the DataModule's
    loader ends at the next stage's first step and the new one is shaped for ``trainer.global_step``. The
    DataModule reads the step itself because after a resume Lightning builds the loader before any callback hook
    sees the restored step. This callback checks that every batch has the scheduled shape (a loader that was not
    replaced would show here) and logs ``train/seq_len`` and ``train/batch_size``.
    """

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        seq_len, batch_size, _ = trainer.datamodule.stage_at(trainer.global_step)
        shape = tuple(batch["input_ids"].shape)
        if shape != (batch_size, seq_len):
            raise RuntimeError(f"step {trainer.global_step}: batch of shape {shape}, the curriculum says "
                               f"({batch_size}, {seq_len}): the train loader was not rebuilt at the stage change")
        pl_module.log("train/seq_len", float(seq_len))
        pl_module.log("train/batch_size", float(batch_size))


class RetrievalEval(L.Callback):
    """Every ``every_n_steps``: RULER-style accuracy of a few synthetic tasks built over held-out text, logged as
    ``eval/<task>_<length>``. Every rank runs it (sharded models need all ranks in the forward)."""

    def __init__(self, every_n_steps: int, options: RetrievalEvalOptions, data_cfg):
        """options: tasks, lengths and samples (``TrainerConfig.retrieval_eval()``); depths are drawn per sample."""
        self.every_n_steps, self.data_cfg = every_n_steps, data_cfg
        self.tasks, self.lengths, self.samples = options.tasks, options.token_lengths(), options.samples
        self._haystack = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step == 0 or step % self.every_n_steps:
            return
        tokenizer = trainer.datamodule.tokenizer
        if self._haystack is None:
            self._haystack = held_out_tokens(self.data_cfg, tokenizer, 2 * max(self.lengths))
        model = pl_module.model
        was_training = model.training
        # depth None: drawn at random per sample
        rows = evaluate_retrieval(model, tokenizer, self._haystack, self.tasks, self.lengths, [None], self.samples,
                                  seed=step, device=pl_module.device)
        model.train(was_training)
        for r in rows:
            pl_module.log(f"eval/{r.task}_{r.length}", r.accuracy, rank_zero_only=True)


# Dense peak FLOP/s (NVIDIA's datasheets) of GPUs whose figure Lightning's table lacks ('NVIDIA H200' is not in it)
# or gives at the sparse rate (its 'h200 sxm1' bf16 entry is 2 PFLOP/s): MFU is measured against dense peaks.
DENSE_PEAK_FLOPS = {
    "h200 nvl": {torch.float64: 30e12, torch.float32: 60e12, "tfloat32": 417.5e12, torch.bfloat16: 835e12,
                 torch.float16: 835e12},
    "h200": {torch.float64: 34e12, torch.float32: 67e12, "tfloat32": 494.7e12, torch.bfloat16: 989.4e12,
             torch.float16: 989.4e12},
}


def dense_peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a GPU named ``device_name`` (``torch.cuda.get_device_name``) at a Lightning precision
    ('bf16-mixed', '32-true', ...), for the GPUs of ``DENSE_PEAK_FLOPS``; None for the others (Lightning's table)."""
    chip = device_name.lower()
    table = next((t for name, t in DENSE_PEAK_FLOPS.items() if name in chip), None)
    if table is None:
        return None
    dtype = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}.get(precision.split("-")[0])
    if dtype is None:  # 32-bit: TF32 tensor cores unless matmuls are asked to be exact (as Lightning decides)
        dtype = "tfloat32" if torch.get_float32_matmul_precision() != "highest" else torch.float32
    return table[dtype]


class MFUThroughputMonitor(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` (tokens/s, FLOP/s, MFU) with the dense peaks of ``DENSE_PEAK_FLOPS``, so
    MFU is logged on the H200 too."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        device = trainer.strategy.root_device
        peak = dense_peak_flops(torch.cuda.get_device_name(device), str(trainer.precision)) if device.type == "cuda" \
            else None
        with warnings.catch_warnings():
            if peak is not None:  # Lightning warns "FLOPs not found" for what we fill in below
                warnings.filterwarnings("ignore", message="FLOPs not found")
            super().setup(trainer, pl_module, stage)
        if peak is not None:
            self.use_peak_flops(peak)

    def use_peak_flops(self, peak: float) -> None:
        self.available_flops = peak
        for throughput in self._throughputs.values():
            throughput.available_flops = peak


def progress_bar() -> L.Callback:
    """Lightning's progress bar (Rich when installed, else tqdm), counting the run's batches out of
    ``trainer.max_steps`` × accumulation, resumes and curriculum stages included, and no epoch total. Lightning's own
    counts the batches of the current loader against the steps left, and Rich adds ``max_epochs - 1``: a resumed
    run showed "Epoch 1/-2 ... 40/10"."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    class StepsProgress:
        @property
        def total_train_batches(self):
            t = self.trainer
            if t.max_steps and t.max_steps > 0:
                return t.max_steps * t.accumulate_grad_batches
            return super().total_train_batches

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            done = trainer.fit_loop.epoch_loop.total_batch_idx  # this batch's index in the whole run
            super().on_train_batch_end(trainer, pl_module, outputs, batch, done)

        def _get_train_description(self, current_epoch: int) -> str:
            return f"Epoch {current_epoch}".ljust(len(getattr(self, "validation_description", "")))

    base = RichProgressBar if _RICH_AVAILABLE else TQDMProgressBar
    return type("StepsProgressBar", (StepsProgress, base), {})()
