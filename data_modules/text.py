"""``TextDataModule``: a weighted mixture of text sources (the embedded stdlib corpus, .txt / .jsonl / .parquet
files) → tokenized, packed LM batches."""
from __future__ import annotations

import logging
import os

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, DistributedSampler

from .curriculum import seq_len_stages
from .packing import (
    POSITION_KEY,
    DocumentStream,
    PackedStream,
    collate_with_position,
    validation_windows,
)
from .ruler_tasks import check_ruler_tasks_fit
from .sources import (
    JSONL_SUFFIXES,
    BinaryFileError,
    DataError,
    check_first_record,
    resolve_paths,
    stdlib_files,
)
from .synthetic import check_tasks_fit
from .tokenizers import build_tokenizer

log = logging.getLogger(__name__)


def build_document_streams(cfg) -> tuple[list[DocumentStream], list[float]]:
    """The configured sources (``cfg``: the ``data`` section, ``lit_hsa.config.DataConfig``) as document streams and
    their mixture weights. Files are resolved, the first record of every structured file is decoded and every text
    file is sniffed for binary content here, so a missing path, a wrong field name or a binary file fails up front
    (or, with ``data.skip_bad_records``, binary files are left out and counted)."""
    streams, weights, binary = [], [], []
    for i, src in enumerate(cfg.resolved_sources()):
        chat = src.format == "chat"
        # The embedded corpus is known text: a few stdlib test modules are latin-1 / koi8-r on purpose.
        files, skipped = (stdlib_files(), []) if src.kind == "stdlib" else checked_files(src, cfg.skip_bad_records)
        if not files:
            raise DataError(f"{'data.paths' if cfg.paths else f'data.sources[{i}]'}: every file looks binary "
                            f"({_some(skipped)}); nothing to train on")
        binary += skipped
        streams.append(DocumentStream(files, src.text_field, cfg.val_fraction, src.min_chars, src.long_doc_chars,
                                      src.long_doc_repeat, cfg.skip_bad_records, chat=chat))
        weights.append(src.weight)
    if binary:
        _warn_once(f"skipped {len(binary)} binary file{'s' if len(binary) > 1 else ''} "
                   f"(data.skip_bad_records): {_some(binary)}")
    return streams, weights


def _some(paths: list) -> str:
    return ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def checked_files(src, skip_binary: bool) -> tuple[list, list]:
    """(kept, skipped binary) files of a files source, each pre-flight checked (``check_first_record``). A binary
    file raises ``BinaryFileError`` naming it, unless ``skip_binary``."""
    kept, skipped = [], []
    for f in resolve_paths(src.paths):
        if src.format == "chat" and f.suffix.lower() not in JSONL_SUFFIXES:
            raise DataError(f"{f}: chat sources must be .jsonl files of {{'messages': [...]}} records")
        try:
            check_first_record(f, src.text_field, chat=src.format == "chat")
        except BinaryFileError:
            if not skip_binary:
                raise
            skipped.append(f)
            continue
        kept.append(f)
    return kept, skipped


def share_cores_with_workers(num_workers: int) -> None:
    """Intra-op threads of this (training) process: the cores the DataLoader workers leave, unless the user chose
    (``OMP_NUM_THREADS``). torch starts a thread per core and each worker keeps one busy (torch gives workers one
    intra-op thread each), so on a small CPU machine the extra threads only wait on each other (measured:
    docs/performance.md, "CPU threads")."""
    if num_workers == 0 or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores - num_workers)
    if threads < torch.get_num_threads():
        torch.set_num_threads(threads)


@rank_zero_only
def _warn_once(message: str) -> None:
    """One line on stderr from the first rank (the data module is built on every rank)."""
    log.warning(message)


class TextDataModule(L.LightningDataModule):
    """Batches ``{input_ids [B, T], labels [B, T] (−100: no loss), doc_ids [B, T] (with data.document_masking)}``.

    Files, tokenizer and the first record of every structured file are checked when the module is built, so a
    missing path, a bad tokenizer, a wrong field name or a binary file fails before training starts.

    Resume: every training batch carries where its worker's shard continues; ``on_before_batch_transfer`` records
    it as Lightning consumes the batch (not when the loader prefetches it), and ``state_dict`` saves every rank's
    positions, so a resumed run restores each shard directly (O(shuffle buffer) reads, not a replay). Not
    torchdata's ``StatefulDataLoader`` (whose state Lightning saves with the fit loop): Lightning prefetches one batch
    of an endless loader, so the loader's own state is a batch ahead of training when a checkpoint is written, and a
    single-file checkpoint keeps only the writing rank's copy; positions taken at consumption and gathered over
    ranks have neither problem.

    Context-length curriculum (``seq_len_schedule``, ``[[step, seq_len], ...]``): each stage's loader ends at the
    next stage's first step, and Lightning (``reload_dataloaders_every_n_epochs=1``) asks for a new one, shaped
    for ``trainer.global_step``. Tokens per step stay ``data.batch_size × data.seq_len``, and streams count their
    position in tokens, so the data continues exactly where the previous shape stopped.

    Context parallelism (``context_parallel`` = N > 1): the N consecutive ranks of a context group split the same
    sequences, so streams and validation samples are divided by data-parallel index (``global_rank // N``) over the
    data-parallel size (``world_size // N``), and every rank of a group gets the whole batch (the LightningModule
    slices its own part).
    """

    def __init__(self, cfg, chunk_size: int | None = None, seq_len_schedule: list | tuple = (),
                 context_parallel: int = 1):
        super().__init__()
        self.cfg = cfg
        self.context_parallel = context_parallel
        self.tokenizer = build_tokenizer(cfg.tokenizer, cfg.eos_token)
        self.align = chunk_size if cfg.align_docs_to_chunks else None
        if cfg.align_docs_to_chunks and not chunk_size:
            raise DataError("data.align_docs_to_chunks needs the model's chunk_size")
        self.sources, self.weights = build_document_streams(cfg)
        self.stages = seq_len_stages(list(seq_len_schedule), cfg.seq_len, cfg.batch_size)
        if cfg.synthetic_fraction > 0:
            shortest = min(length for _, length, _ in self.stages) + 1
            if cfg.synthetic_format == "ruler":
                check_ruler_tasks_fit(cfg.synthetic_tasks, shortest, self.tokenizer, cfg.seed)
            else:
                check_tasks_fit(cfg.synthetic_tasks, shortest, self.tokenizer)
        self._val_samples: list | None = None  # held_out_split()
        self._consumed = 0  # training batches this rank has consumed
        self._positions: dict[int, dict] = {}  # worker → where its shard continues after its last consumed batch

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _world(self) -> int:
        """Every process of the run (data × context)."""
        return self.trainer.world_size if self.trainer is not None else 1

    def _rank_world(self) -> tuple[int, int]:
        """(data-parallel index, data-parallel size): what divides the data. The ranks of one context group share
        an index, so they read the same batches."""
        trainer, n = self.trainer, self.context_parallel
        return (trainer.global_rank // n, trainer.world_size // n) if trainer is not None else (0, 1)

    def _progress(self) -> tuple[int, int]:
        """(optimizer step, batches per step). Lightning restores the step before it builds loaders on resume."""
        trainer = self.trainer
        return (trainer.global_step, trainer.accumulate_grad_batches) if trainer is not None else (0, 1)

    def stage_at(self, step: int) -> tuple[int, int, int | None]:
        """(seq_len, batch_size, first step of the next stage or None) of the curriculum stage holding ``step``."""
        _, seq_len, batch_size = [stage for stage in self.stages if stage[0] <= step][-1]
        later = [first for first, _, _ in self.stages if first > step]
        return seq_len, batch_size, later[0] if later else None

    def train_dataset(self, step: int | None = None) -> PackedStream:
        """The training stream from optimizer step ``step`` (default: the trainer's) to the end of its stage."""
        self.held_out_split()  # which split the training stream reads
        current, accumulate = self._progress()
        step = current if step is None else step
        seq_len, batch_size, next_stage = self.stage_at(step)
        rank, world = self._rank_world()
        cfg = self.cfg
        return PackedStream(self.sources, self.weights, self.tokenizer, seq_len, cfg.seed, rank, world,
                            batch_size, self._consumed, cfg.document_masking, self.align, cfg.shuffle_buffer,
                            cfg.synthetic_fraction, cfg.synthetic_tasks, cfg.answer_only_loss,
                            cfg.answer_loss_weight,
                            max_batches=None if next_stage is None else (next_stage - step) * accumulate,
                            start_positions=dict(self._positions), track_position=True,
                            synthetic_format=cfg.synthetic_format)

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        share_cores_with_workers(self.cfg.num_workers)
        return DataLoader(dataset, batch_size=dataset.batch_size, num_workers=self.cfg.num_workers,
                          persistent_workers=self.cfg.num_workers > 0, collate_fn=collate_with_position,
                          prefetch_factor=self.cfg.prefetch_factor if self.cfg.num_workers > 0 else None)

    def held_out_split(self) -> list:
        """The fixed validation windows (empty when the data cannot fill one), choosing once how the split is made:
        whole held-out documents, or, when they cannot fill a window (one large file, a few documents), the last
        ``val_fraction`` of every text document, for training and validation alike (``DocumentStream.held_out``)."""
        if self._val_samples is not None:
            return self._val_samples
        cfg = self.cfg

        def windows() -> list:
            return validation_windows(self.sources, self.tokenizer, cfg.seq_len, cfg.val_samples,
                                      cfg.document_masking, self.align)

        self._val_samples = windows()
        if not self._val_samples and not all(s.chat for s in self.sources):
            for source in self.sources:
                source.held_out = "tails"
            self._val_samples = windows()
            if self._val_samples:
                _warn_once(f"the documents held out whole (data.val_fraction={cfg.val_fraction:g}) cannot fill one "
                           f"validation window of {cfg.seq_len + 1} tokens: holding out the last "
                           f"{cfg.val_fraction:g} of every document instead")
            else:  # no split fills a window: training data as usual; validation_samples() says why
                for source in self.sources:
                    source.held_out = "records"
        return self._val_samples

    def validation_samples(self) -> list:
        """``held_out_split``, or one error when it cannot fill one window (checked before training starts)."""
        samples = self.held_out_split()
        if not samples:
            cfg = self.cfg
            raise DataError(f"the validation split has fewer than seq_len + 1 = {cfg.seq_len + 1} tokens, even with "
                            f"the last {cfg.val_fraction:g} of every document held out: raise data.val_fraction, "
                            "lower data.seq_len, or set trainer.limit_val_batches=0")
        return samples

    def val_dataloader(self) -> DataLoader:
        # A map-style list split evenly by data-parallel index (Lightning keeps a DistributedSampler it is given; its
        # own would split by global rank, which gives the ranks of a context group different samples).
        samples = self.validation_samples()
        rank, world = self._rank_world()
        sampler = DistributedSampler(samples, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(samples, batch_size=self.cfg.batch_size, sampler=sampler)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Lightning calls this for the batch it is about to train on, while the loader has already prefetched
        later ones: the position recorded here is exactly that of the consumed batches."""
        if isinstance(batch, dict) and POSITION_KEY in batch:  # training batches only
            worker, position = batch.pop(POSITION_KEY)
            self._positions[int(worker)] = position
            self._consumed += 1
        return batch

    def _workers(self) -> int:
        return max(1, self.cfg.num_workers)

    def state_dict(self) -> dict:
        """Every data-parallel rank's stream positions, by data-parallel index: gathered over every process (a
        collective; one rank writes the checkpoint file), one per context group (its ranks read the same stream)."""
        positions = [self._positions.get(w) for w in range(self._workers())]
        mine = {"batches_consumed": self._consumed, "positions": positions}
        return {"ranks": gather_objects(mine, self._world())[::self.context_parallel]}

    def load_state_dict(self, state: dict) -> None:
        if "ranks" not in state:  # a checkpoint from before positions were saved: replay to the consumed batch
            self._consumed, self._positions = int(state["batches_consumed"]), {}
            return
        rank, world = self._rank_world()
        saved = state["ranks"]
        if len(saved) != world or len(saved[0]["positions"]) != self._workers():
            raise DataError(f"the checkpoint's data positions are for {len(saved)} ranks × "
                            f"{len(saved[0]['positions'])} workers, this run has {world} × {self._workers()}: "
                            "resume with the same devices and data.num_workers, or start anew with init_from=")
        self._consumed = int(saved[rank]["batches_consumed"])
        self._positions = {w: p for w, p in enumerate(saved[rank]["positions"]) if p is not None}


def gather_objects(obj, world: int) -> list:
    """``obj`` of every rank, by rank. A collective: every rank calls it (Lightning saves checkpoints on all)."""
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered
