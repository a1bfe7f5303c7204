"""``TextDataModule``: a weighted mixture of text sources (the embedded stdlib corpus, .txt / .jsonl / .parquet
files) → tokenized, packed LM batches."""
from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from lit_hsa.config import DataConfig

from .packing import DocumentStream, PackedStream, validation_windows
from .sources import (
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    DataError,
    check_first_record,
    resolve_paths,
    stdlib_files,
)
from .tokenizers import build_tokenizer


def build_document_streams(cfg: DataConfig) -> tuple[list[DocumentStream], list[float]]:
    """The configured sources as document streams and their mixture weights. Files are resolved and the first
    record of every structured file is decoded here, so a missing path or a wrong field name fails up front."""
    streams, weights = [], []
    for src in cfg.resolved_sources():
        chat = src.format == "chat"
        files = stdlib_files() if src.kind == "stdlib" else resolve_paths(src.paths)
        for f in files:
            suffix = f.suffix.lower()
            if chat and suffix not in JSONL_SUFFIXES:
                raise DataError(f"{f}: chat sources must be .jsonl files of {{'messages': [...]}} records")
            if suffix in JSONL_SUFFIXES or suffix in PARQUET_SUFFIXES:
                check_first_record(f, src.text_field, chat=chat)
        streams.append(DocumentStream(files, src.text_field, cfg.val_fraction, src.min_chars, src.long_doc_chars,
                                      src.long_doc_repeat, cfg.skip_bad_records, chat=chat))
        weights.append(src.weight)
    return streams, weights


class TextDataModule(L.LightningDataModule):
    """Batches ``{input_ids [B, T], labels [B, T] (−100: no loss), doc_ids [B, T] (with data.document_masking)}``.

    Files, tokenizer and the first record of every structured file are checked when the module is built, so a
    missing path, a bad tokenizer or a wrong field name fails before training starts. The training stream's
    position (batches consumed on this rank) is saved in checkpoints and restored on resume.
    """

    def __init__(self, cfg: DataConfig, chunk_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg.tokenizer, cfg.eos_token)
        self.align = chunk_size if cfg.align_docs_to_chunks else None
        if cfg.align_docs_to_chunks and not chunk_size:
            raise DataError("data.align_docs_to_chunks needs the model's chunk_size")
        self.sources, self.weights = build_document_streams(cfg)
        self._start_batch = 0
        self._val_samples: list | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataset(self, start_batch: int | None = None) -> PackedStream:
        rank, world = self._rank_world()
        cfg = self.cfg
        return PackedStream(self.sources, self.weights, self.tokenizer, cfg.seq_len, cfg.seed, rank, world,
                            cfg.batch_size, self._start_batch if start_batch is None else start_batch,
                            cfg.document_masking, self.align, cfg.shuffle_buffer, cfg.synthetic_fraction,
                            cfg.synthetic_tasks, cfg.answer_only_loss)

    def train_dataloader(self) -> DataLoader:
        cfg = self.cfg
        return DataLoader(self.train_dataset(), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                          persistent_workers=cfg.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        if self._val_samples is None:
            self._val_samples = validation_windows(self.sources, self.tokenizer, self.cfg.seq_len,
                                                   self.cfg.val_samples, self.cfg.document_masking, self.align)
        # A map-style list: Lightning adds a DistributedSampler, so ranks split it evenly.
        return DataLoader(self._val_samples, batch_size=self.cfg.batch_size, shuffle=False)

    def state_dict(self) -> dict:
        trainer = self.trainer
        consumed = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
        return {"batches_consumed": consumed}

    def load_state_dict(self, state: dict) -> None:
        self._start_batch = int(state["batches_consumed"])
