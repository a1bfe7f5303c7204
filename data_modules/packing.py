"""Documents → fixed-length training windows: a weighted mixture of sources, sharded over ranks and dataloader
workers, seeded shuffling, batched tokenization, optional chunk alignment, resumable."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .sources import DataError, chat_segments, decode_record, is_validation, raw_records
from .synthetic import TRAINING_TASKS, make_random_task

IGNORE_INDEX = -100
TOKENIZE_BATCH = 32  # documents per encode_batch call: lets a Rust tokenizer use its threads


@dataclass
class Document:
    """tokens: int32 [n]; target: bool [n] or None (every token is a prediction target)."""

    tokens: np.ndarray
    target: np.ndarray | None = None


class DocumentStream:
    """Records of one source's files for one shard: ``(split, epoch)`` fix the file order; record ``g`` of the
    split (in that order) belongs to shard ``g % n_shards``. Only owned records are parsed."""

    def __init__(self, files, text_field: str, val_fraction: float, min_chars: int = 0, long_doc_chars: int = 0,
                 long_doc_repeat: int = 1, skip_bad_records: bool = False, chat: bool = False):
        self.files, self.text_field, self.val_fraction, self.chat = list(files), text_field, val_fraction, chat
        self.min_chars, self.long_doc_chars, self.long_doc_repeat = min_chars, long_doc_chars, long_doc_repeat
        self.skip_bad_records = skip_bad_records
        self.bad_records = 0

    def documents(self, split: str, epoch: int, seed: int, shard: int, n_shards: int) -> Iterator[str | bytes]:
        order = list(range(len(self.files)))
        if split == "train":
            random.Random(seed + epoch).shuffle(order)
        g = 0
        for fi in order:
            path = self.files[fi]
            for position, raw in raw_records(path, self.text_field):
                if is_validation(path, position, self.val_fraction) != (split == "val"):
                    continue
                g += 1
                if (g - 1) % n_shards != shard:
                    continue
                try:
                    if self.chat:
                        doc = chat_segments(path, position, raw)
                    else:
                        doc = decode_record(path, position, raw, self.text_field)
                except DataError:
                    if not self.skip_bad_records:
                        raise
                    self.bad_records += 1
                    continue
                if len(doc) < self.min_chars:
                    continue
                long = self.long_doc_chars and len(doc) >= self.long_doc_chars
                for _ in range(self.long_doc_repeat if long else 1):
                    yield doc

    def endless(self, seed: int, shard: int, n_shards: int, shuffle_buffer: int) -> Iterator[str | bytes]:
        """Training documents, epoch after epoch, through a bounded seeded shuffle buffer."""
        rng = random.Random(f"{seed}/{shard}/{n_shards}")
        buffer: list = []
        epoch = 0
        while True:
            produced = False
            for doc in self.documents("train", epoch, seed, shard, n_shards):
                produced = True
                if len(buffer) < shuffle_buffer:
                    buffer.append(doc)
                    continue
                i = rng.randrange(shuffle_buffer)
                yield buffer[i]
                buffer[i] = doc
            if not produced:
                raise DataError(
                    f"a training shard got no documents ({len(self.files)} files, shard {shard} of {n_shards}): "
                    "the corpus is empty, too small for ranks × data.num_workers, or filtered away"
                )
            epoch += 1


def tokenize(docs: Iterator, tokenizer) -> Iterator[Document]:
    """Documents are text (str/bytes) or chat segments ``[(text, is_target), ...]`` (loss on targets only)."""
    batch: list = []

    def flush():
        flat = [seg for doc in batch for seg in (doc if isinstance(doc, list) else [(doc, True)])]
        encoded = iter(tokenizer.encode_batch([text for text, _ in flat]))
        for doc in batch:
            if not isinstance(doc, list):
                yield Document(next(encoded))
                continue
            parts = [(next(encoded), target) for _, target in doc]
            yield Document(np.concatenate([t for t, _ in parts]),
                           np.concatenate([np.full(len(t), target, dtype=bool) for t, target in parts]))

    for doc in docs:
        batch.append(doc)
        if len(batch) == TOKENIZE_BATCH:
            yield from flush()
            batch = []
    yield from flush()


def pack_windows(docs: Iterator[Document], seq_len: int, eos_id: int, pad_id: int | None = None,
                 align: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Concatenate documents (each followed by EOS, then padded to a multiple of ``align`` when given, so every
    document starts on a chunk boundary) and cut windows of ``seq_len + 1`` tokens with stride ``seq_len``: every
    token is a prediction target once.

    Yields ``(tokens [L+1] int32, doc_index [L+1] int64, target [L+1] bool)``; ``target`` is False on padding and
    on tokens a document marked as not-to-learn. Numpy buffers throughout; no per-token Python work.
    """
    pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    held = 0
    for d, doc in enumerate(docs):
        n = len(doc.tokens) + 1
        total = n if not align else -(-n // align) * align
        tokens = np.full(total, pad_id if pad_id is not None else eos_id, dtype=np.int32)
        tokens[: n - 1], tokens[n - 1] = doc.tokens, eos_id
        target = np.zeros(total, dtype=bool)
        target[:n] = True if doc.target is None else np.append(doc.target, True)
        pieces.append((tokens, np.full(total, d, dtype=np.int64), target))
        held += total
        if held < seq_len + 1:
            continue
        buf, dbuf, tbuf = (np.concatenate(p) for p in zip(*pieces))
        n_windows = (len(buf) - 1) // seq_len
        for w in range(n_windows):
            s = slice(w * seq_len, w * seq_len + seq_len + 1)
            yield buf[s], dbuf[s], tbuf[s]
        rest = slice(n_windows * seq_len, None)
        pieces = [(buf[rest], dbuf[rest], tbuf[rest])]
        held = len(pieces[0][0])


def make_sample(window: np.ndarray, doc_index: np.ndarray, target: np.ndarray, with_doc_ids: bool) -> dict:
    """[L+1] arrays → input_ids [L], labels [L] (next token, −100 where not a target), doc_ids [L] (optional)."""
    tokens = torch.from_numpy(window.astype(np.int64))
    labels = tokens[1:].clone()
    labels[torch.from_numpy(~target[1:])] = IGNORE_INDEX
    sample = {"input_ids": tokens[:-1], "labels": labels}
    if with_doc_ids:
        sample["doc_ids"] = torch.from_numpy(doc_index[:-1] - doc_index[0])
    return sample


class PackedStream(IterableDataset):
    """Endless stream of packed samples from a weighted mixture of ``DocumentStream`` sources, one shard per
    (rank, dataloader worker).

    Exact resume: with W workers a DataLoader takes batch ``b`` from worker ``b % W``. To restart at batch
    ``start_batch``, worker slot ``w`` plays the shard that owned batch ``start_batch + w`` and skips the batches
    that shard had already produced (re-generated, not stored: everything here is a function of the seed).
    """

    def __init__(self, sources: list[DocumentStream], weights: list[float], tokenizer, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, batch_size: int = 1, start_batch: int = 0,
                 with_doc_ids: bool = False, align: int | None = None, shuffle_buffer: int = 64,
                 synthetic_fraction: float = 0.0, synthetic_tasks: tuple[str, ...] = TRAINING_TASKS,
                 answer_only_loss: bool = False):
        super().__init__()
        self.sources, self.weights, self.tokenizer = sources, weights, tokenizer
        self.seq_len, self.seed, self.rank, self.world_size = seq_len, seed, rank, world_size
        self.batch_size, self.start_batch, self.with_doc_ids = batch_size, start_batch, with_doc_ids
        self.align, self.shuffle_buffer = align, shuffle_buffer
        self.synthetic_fraction, self.synthetic_tasks = synthetic_fraction, tuple(synthetic_tasks)
        self.answer_only_loss = answer_only_loss

    def _with_synthetic_tasks(self, windows, shard: int, n_shards: int):
        """Turn a seeded share of windows into a retrieval task built over the window's own text (spec §5)."""
        rng = np.random.default_rng([self.seed, shard, n_shards, 17])
        for window, doc_index, target in windows:
            if self.synthetic_fraction and rng.random() < self.synthetic_fraction:
                task = make_random_task(window, len(window), self.tokenizer, rng, self.synthetic_tasks)
                target = task.answer_mask if self.answer_only_loss else np.ones(len(window), dtype=bool)
                window, doc_index = task.tokens, np.zeros(len(window), dtype=np.int64)
            yield window, doc_index, target

    def _mixed_documents(self, shard: int, n_shards: int) -> Iterator[str | bytes]:
        streams = [s.endless(self.seed + 7919 * i, shard, n_shards, self.shuffle_buffer)
                   for i, s in enumerate(self.sources)]
        if len(streams) == 1:
            yield from streams[0]
            return
        rng = random.Random(f"mix/{self.seed}/{shard}/{n_shards}")
        while True:
            yield next(streams[rng.choices(range(len(streams)), weights=self.weights)[0]])

    def __iter__(self):
        info = get_worker_info()
        n_workers, slot = (info.num_workers, info.id) if info is not None else (1, 0)
        worker = (slot + self.start_batch) % n_workers
        done_batches = max(0, -(-(self.start_batch - worker) // n_workers))  # batches b < start with b % W == worker
        skip = done_batches * self.batch_size
        shard, n_shards = self.rank * n_workers + worker, self.world_size * n_workers
        docs = tokenize(self._mixed_documents(shard, n_shards), self.tokenizer)
        windows = pack_windows(docs, self.seq_len, self.tokenizer.eos_id, self.tokenizer.pad_id, self.align)
        windows = self._with_synthetic_tasks(windows, shard, n_shards)
        for i, (window, doc_index, target) in enumerate(windows):
            if i >= skip:
                yield make_sample(window, doc_index, target, self.with_doc_ids)


def validation_windows(sources: list[DocumentStream], tokenizer, seq_len: int, n: int, with_doc_ids: bool,
                       align: int | None = None) -> list[dict]:
    """The first ``n`` packed samples of the sources' validation records, sources interleaved: a fixed set."""
    def interleaved():
        iters = [s.documents("val", 0, 0, 0, 1) for s in sources]
        while iters:
            for it in list(iters):
                doc = next(it, None)
                if doc is None:
                    iters.remove(it)
                else:
                    yield doc

    samples = []
    for window, doc_index, target in pack_windows(tokenize(interleaved(), tokenizer), seq_len, tokenizer.eos_id,
                                                  tokenizer.pad_id, align):
        samples.append(make_sample(window, doc_index, target, with_doc_ids))
        if len(samples) == n:
            break
    if not samples:
        raise DataError(
            f"the validation split has fewer than seq_len + 1 = {seq_len + 1} tokens; raise data.val_fraction"
        )
    return samples
