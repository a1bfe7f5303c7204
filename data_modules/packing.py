"""Packing documents into fixed-length training windows, sharded over ranks and dataloader workers, resumable."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .sources import DataError


def pack_windows(docs: Iterator[np.ndarray], seq_len: int, eos_id: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Concatenate documents (each followed by EOS) and cut windows of ``seq_len + 1`` tokens with stride
    ``seq_len``, so every token is a prediction target exactly once.

    Yields ``(tokens [seq_len+1] int32, doc_index [seq_len+1] int64)``: the running document number of each token.
    Numpy buffers throughout; no per-token Python work.
    """
    pieces: list[np.ndarray] = []
    doc_pieces: list[np.ndarray] = []
    held = 0
    for d, tokens in enumerate(docs):
        doc = np.empty(len(tokens) + 1, dtype=np.int32)
        doc[:-1], doc[-1] = tokens, eos_id
        pieces.append(doc)
        doc_pieces.append(np.full(len(doc), d, dtype=np.int64))
        held += len(doc)
        if held < seq_len + 1:
            continue
        buf, dbuf = np.concatenate(pieces), np.concatenate(doc_pieces)
        n_windows = (len(buf) - 1) // seq_len
        for w in range(n_windows):
            yield buf[w * seq_len : w * seq_len + seq_len + 1], dbuf[w * seq_len : w * seq_len + seq_len + 1]
        pieces, doc_pieces = [buf[n_windows * seq_len :]], [dbuf[n_windows * seq_len :]]
        held = len(pieces[0])


def make_sample(window: np.ndarray, doc_index: np.ndarray, with_doc_ids: bool) -> dict[str, torch.Tensor]:
    """window: [L+1] → input_ids [L], labels [L] (next token), doc_ids [L] (0 for the window's first document)."""
    tokens = torch.from_numpy(window.astype(np.int64))
    sample = {"input_ids": tokens[:-1], "labels": tokens[1:]}
    if with_doc_ids:
        sample["doc_ids"] = torch.from_numpy(doc_index[:-1] - doc_index[0])
    return sample


class PackedStream(IterableDataset):
    """Endless stream of packed samples from ``files``, one shard per (rank, dataloader worker).

    Each epoch shuffles the file order with ``seed + epoch``; shard ``s`` of ``n`` reads files ``s, s+n, …`` of it,
    so together the shards read every file exactly once per epoch.

    Exact resume: with W workers a DataLoader takes batch ``b`` from worker ``b % W``. To restart at batch
    ``start_batch``, worker slot ``w`` plays the shard that owned batch ``start_batch + w`` and skips the batches
    that shard had already produced. Skipped samples are re-tokenized, not stored.
    """

    def __init__(self, files: list[Path], tokenizer, seq_len: int, seed: int, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1, start_batch: int = 0, with_doc_ids: bool = False):
        super().__init__()
        self.files, self.tokenizer, self.seq_len, self.seed = list(files), tokenizer, seq_len, seed
        self.rank, self.world_size, self.batch_size, self.start_batch = rank, world_size, batch_size, start_batch
        self.with_doc_ids = with_doc_ids

    def _documents(self, shard: int, n_shards: int, epochs: int | None) -> Iterator[np.ndarray]:
        if n_shards > len(self.files):
            raise DataError(
                f"{len(self.files)} training files cannot feed {n_shards} shards (ranks × data.num_workers); "
                "use fewer workers or more files"
            )
        epoch = 0
        while epochs is None or epoch < epochs:
            order = list(range(len(self.files)))
            random.Random(self.seed + epoch).shuffle(order)
            for i in order[shard::n_shards]:
                yield self.tokenizer.encode(read_document(self.files[i]))
            epoch += 1

    def __iter__(self):
        info = get_worker_info()
        n_workers, slot = (info.num_workers, info.id) if info is not None else (1, 0)
        worker = (slot + self.start_batch) % n_workers
        done_batches = max(0, -(-(self.start_batch - worker) // n_workers))  # batches b < start with b % W == worker
        skip = done_batches * self.batch_size
        shard, n_shards = self.rank * n_workers + worker, self.world_size * n_workers
        windows = pack_windows(self._documents(shard, n_shards, None), self.seq_len, self.tokenizer.eos_id)
        for i, (window, doc_index) in enumerate(windows):
            if i >= skip:
                yield make_sample(window, doc_index, self.with_doc_ids)


def read_document(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror}") from e


def first_windows(files: list[Path], tokenizer, seq_len: int, n: int, with_doc_ids: bool) -> list[dict]:
    """The first ``n`` packed samples of ``files`` in their given order (one pass): a fixed validation set."""
    docs = (tokenizer.encode(read_document(f)) for f in files)
    samples = []
    for window, doc_index in pack_windows(docs, seq_len, tokenizer.eos_id):
        samples.append(make_sample(window, doc_index, with_doc_ids))
        if len(samples) == n:
            break
    if not samples:
        raise DataError(f"the validation split has fewer than seq_len + 1 = {seq_len + 1} tokens")
    return samples
