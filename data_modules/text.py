"""``TextDataModule``: plain-text documents (the embedded stdlib corpus or user files) → packed LM batches."""
from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from lit_hsa.config import DataConfig

from .packing import PackedStream, first_windows
from .sources import resolve_paths, split_train_val, stdlib_files
from .tokenizers import build_tokenizer


class TextDataModule(L.LightningDataModule):
    """Batches ``{input_ids [B, T], labels [B, T], doc_ids [B, T] (with data.document_masking)}``.

    Files are found and split when the module is built, so a missing path fails before training starts.
    The training stream's position (batches consumed on this rank) is saved in checkpoints and restored on resume.
    """

    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg.tokenizer)
        files = stdlib_files() if cfg.source == "stdlib" else resolve_paths(cfg.paths)
        self.train_files, self.val_files = split_train_val(files, cfg.val_fraction)
        self._start_batch = 0
        self._val_samples: list | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        cfg = self.cfg
        stream = PackedStream(self.train_files, self.tokenizer, cfg.seq_len, cfg.seed, rank, world, cfg.batch_size,
                              self._start_batch, cfg.document_masking)
        return DataLoader(stream, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                          persistent_workers=cfg.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        if self._val_samples is None:
            self._val_samples = first_windows(self.val_files, self.tokenizer, self.cfg.seq_len, self.cfg.val_samples,
                                              self.cfg.document_masking)
        # A map-style list: Lightning adds a DistributedSampler, so ranks split it evenly.
        return DataLoader(self._val_samples, batch_size=self.cfg.batch_size, shuffle=False)

    def state_dict(self) -> dict:
        trainer = self.trainer
        consumed = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
        return {"batches_consumed": consumed}

    def load_state_dict(self, state: dict) -> None:
        self._start_batch = int(state["batches_consumed"])
