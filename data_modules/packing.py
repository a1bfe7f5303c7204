"""Documents → fixed-length training windows: a weighted mixture of sources, sharded over ranks and dataloader
workers, seeded shuffling, batched tokenization, optional chunk alignment, resumable."""
from __future__ import annotations

import itertools
import random
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from .cursors import Cursor, MixedCursor, Ref, SourceCursor, unit_hash
from .ruler_tasks import RulerTrainingTasks
from .sources import (
    DataError,
    TextFile,
    chat_segments,
    decode_record,
    held_out_tail,
    is_validation,
    records_from,
)
from .synthetic import TRAINING_TASKS, TaskSample, make_random_task

IGNORE_INDEX = -100
POSITION_KEY = "stream_position"  # batch entry: (worker, where its shard continues); the DataModule pops it
TOKENIZE_BATCH = 32  # documents per encode_batch call: lets a Rust tokenizer use its threads


@dataclass
class Document:
    """tokens: int32 [n]; target: bool [n] or None (every token is a prediction target). ``last`` False: a piece of
    a document read in pieces (``TextFile``), which the next ``Document`` continues (no EOS between them)."""

    tokens: np.ndarray
    target: np.ndarray | None = None
    last: bool = True


class DocumentStream:
    """Records of one source's files for one shard: ``(split, epoch)`` fix the file order; record ``g`` of the
    split (in that order) belongs to shard ``g % n_shards``. Only owned records are parsed."""

    def __init__(self, files, text_field: str, val_fraction: float, min_chars: int = 0, long_doc_chars: int = 0,
                 long_doc_repeat: int = 1, skip_bad_records: bool = False, chat: bool = False):
        self.files, self.text_field, self.val_fraction, self.chat = list(files), text_field, val_fraction, chat
        self.min_chars, self.long_doc_chars, self.long_doc_repeat = min_chars, long_doc_chars, long_doc_repeat
        self.skip_bad_records = skip_bad_records
        self.bad_records = 0
        # "records": whole records are held out (``is_validation``); "tails": every text record gives its last
        # val_fraction to validation (``held_out_tail``), for corpora of a few (large) documents, where whole
        # records leave no validation split (``TextDataModule`` switches when that happens)
        self.held_out = "records"

    def file_order(self, split: str, epoch: int, seed: int) -> list[int]:
        order = list(range(len(self.files)))
        if split == "train":
            random.Random(seed + epoch).shuffle(order)
        return order

    def owned(self, split: str, epoch: int, seed: int, shard: int, n_shards: int,
              cursor: Cursor = (0, (0, 0), 0)) -> Iterator[tuple[Cursor, Ref, str | bytes | list]]:
        """``(cursor after, reference, document)`` for the shard's records of a split, read from ``cursor`` =
        (index in the epoch's file order, start inside that file, split records counted before it) on. A
        reference ``(file index, start)`` reads the record again alone (``decode``)."""
        order = self.file_order(split, epoch, seed)
        file_pos, start, g = cursor
        tails = self._holds_out_tails()
        for k in range(file_pos, len(order)):
            path = self.files[order[k]]
            for position, raw, at, after in records_from(path, self.text_field, start if k == file_pos else (0, 0)):
                if not tails and is_validation(path, position, self.val_fraction) != (split == "val"):
                    continue
                g += 1
                if (g - 1) % n_shards != shard:
                    continue
                doc = self._part(self._parse(path, position, raw), split)
                if doc is not None and (len(doc) or not tails):
                    yield (k, after, g), (order[k], at), doc

    def _parse(self, path, position: int, raw) -> str | bytes | list | None:
        """A raw record → document; None when it is too short, or malformed and skipped (counted)."""
        try:
            doc = chat_segments(path, position, raw) if self.chat else decode_record(path, position, raw,
                                                                                     self.text_field)
        except DataError:
            if not self.skip_bad_records:
                raise
            self.bad_records += 1
            return None
        return doc if len(doc) >= self.min_chars else None

    def _holds_out_tails(self) -> bool:
        return self.held_out == "tails" and not self.chat  # chat records are held out whole

    def _part(self, doc, split: str):
        """The part of a parsed record (None: skipped) that ``split`` reads: all of it, or its head / tail."""
        if doc is None or not self._holds_out_tails():
            return doc
        return held_out_tail(doc, self.val_fraction)[split == "val"]

    def decode(self, ref: Ref) -> str | bytes | list:
        """The document of a record reference (one seek / row group / file read)."""
        file_index, at = ref
        path = self.files[file_index]
        record = next(records_from(path, self.text_field, tuple(at)), None)
        doc = None if record is None else self._part(self._parse(path, record[0], record[1]), "train")
        if doc is None:
            raise DataError(f"{path}: the record at {tuple(at)} that a checkpoint points to is gone or no longer a "
                            "document; a resumed run needs the same data files")
        return doc

    def copies(self, doc) -> int:
        """Documents at least ``long_doc_chars`` long are seen ``long_doc_repeat`` times per epoch."""
        return self.long_doc_repeat if self.long_doc_chars and len(doc) >= self.long_doc_chars else 1

    def documents(self, split: str, epoch: int, seed: int, shard: int, n_shards: int) -> Iterator[str | bytes]:
        for _, _, doc in self.owned(split, epoch, seed, shard, n_shards):
            for _ in range(self.copies(doc)):
                yield doc

    def endless(self, seed: int, shard: int, n_shards: int, shuffle_buffer: int,
                state: dict | None = None) -> SourceCursor:
        """Training documents, epoch after epoch, through a bounded seeded shuffle buffer; resumable (``state``)."""
        return SourceCursor(self, seed, shard, n_shards, shuffle_buffer, state)


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
        if isinstance(doc, TextFile):  # in pieces, in order: what is batched before it goes first
            yield from flush()
            batch = []
            yield from pieces_of(doc, tokenizer)
            continue
        batch.append(doc)
        if len(batch) == TOKENIZE_BATCH:
            yield from flush()
            batch = []
    yield from flush()


def pieces_of(doc: TextFile, tokenizer) -> Iterator[Document]:
    """A large text file's tokens piece by piece (memory: one piece), the last piece marked ``last``."""
    previous = None
    for text in doc.pieces():
        if previous is not None:
            yield Document(previous, last=False)
        previous = tokenizer.encode(text)
    yield Document(previous if previous is not None else np.zeros(0, dtype=np.int32))


def document_pieces(docs: Iterator[Document], eos_id: int, pad_id: int | None = None,
                    align: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each document as ``(tokens [n] int32, doc_index [n] int64, target [n] bool)``: its tokens, then EOS, then
    padding to a multiple of ``align`` when given (so the next document starts on a chunk boundary). A document read
    in pieces comes as several such arrays, EOS and padding after its last."""
    d, length = 0, 0  # document index, tokens of it so far
    for doc in docs:
        n = len(doc.tokens) + doc.last
        length += n
        total = n if not (align and doc.last) else n + (-length) % align
        tokens = np.full(total, pad_id if pad_id is not None else eos_id, dtype=np.int32)
        tokens[: len(doc.tokens)] = doc.tokens
        if doc.last:
            tokens[n - 1] = eos_id
        target = np.zeros(total, dtype=bool)
        target[:n] = True if doc.target is None else np.append(doc.target, [True] * doc.last)
        yield tokens, np.full(total, d, dtype=np.int64), target
        if doc.last:
            d, length = d + 1, 0


def skip_tokens(pieces: Iterator[tuple[np.ndarray, ...]], n: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Drop the first ``n`` tokens of a stream of parallel-array pieces (whole pieces, then a piece's head)."""
    for piece in pieces:
        if n >= len(piece[0]):
            n -= len(piece[0])
            continue
        yield tuple(a[n:] for a in piece) if n else piece
        n = 0


def cut_windows(pieces: Iterator[tuple[np.ndarray, ...]], seq_len: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Concatenate parallel-array pieces and cut windows of ``seq_len + 1`` tokens with stride ``seq_len``: window
    ``i`` starts at token ``i × seq_len`` of the concatenation, so every token is a prediction target once."""
    held: list[tuple[np.ndarray, ...]] = []
    n_held = 0
    for piece in pieces:
        held.append(piece)
        n_held += len(piece[0])
        if n_held < seq_len + 1:
            continue
        arrays = [np.concatenate(a) for a in zip(*held)]
        n_windows = (n_held - 1) // seq_len
        for w in range(n_windows):
            yield tuple(a[w * seq_len : w * seq_len + seq_len + 1] for a in arrays)
        held = [tuple(a[n_windows * seq_len :] for a in arrays)]
        n_held = len(held[0][0])


def pack_windows(docs: Iterator[Document], seq_len: int, eos_id: int, pad_id: int | None = None,
                 align: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Concatenate documents (each followed by EOS, then padded to a multiple of ``align`` when given, so every
    document starts on a chunk boundary) and cut windows of ``seq_len + 1`` tokens with stride ``seq_len``: every
    token is a prediction target once.

    Yields ``(tokens [L+1] int32, doc_index [L+1] int64, target [L+1] bool)``; ``target`` is False on padding and
    on tokens a document marked as not-to-learn. Numpy buffers throughout; no per-token Python work.
    """
    return cut_windows(document_pieces(docs, eos_id, pad_id, align), seq_len)


def make_sample(window: np.ndarray, doc_index: np.ndarray, target: np.ndarray, with_doc_ids: bool,
                weight: np.ndarray | None = None) -> dict:
    """[L+1] arrays → input_ids [L], labels [L] (next token, −100 where not a target), doc_ids [L] (optional),
    loss_weight [L] float32 (when ``weight`` [L+1] is given: the weight of each label)."""
    tokens = torch.from_numpy(window.astype(np.int64))
    labels = tokens[1:].clone()
    labels[torch.from_numpy(~target[1:])] = IGNORE_INDEX
    sample = {"input_ids": tokens[:-1], "labels": labels}
    if with_doc_ids:
        sample["doc_ids"] = torch.from_numpy(doc_index[:-1] - doc_index[0])
    if weight is not None:
        sample["loss_weight"] = torch.from_numpy(weight[1:].astype(np.float32))
    return sample


class PackedStream(IterableDataset):
    """Endless stream of packed samples from a weighted mixture of ``DocumentStream`` sources, one shard per
    (rank, dataloader worker).

    Exact resume: with W workers a DataLoader takes batch ``b`` from worker ``b % W``. To restart at batch
    ``start_batch``, worker slot ``s`` plays the worker shard ``w`` that owned batch ``start_batch + s`` and starts
    at ``start_positions[w]``: the position after that shard's last consumed sample, which every sample carries
    (``track_position``: under ``POSITION_KEY``) — the document cursors' state before the document holding the
    next window's first token, that token's offset in the document and its index in the shard's token stream.
    Restoring it reads O(shuffle buffer + one window) records, whatever the position. A shard without a saved
    position replays from the start and skips the tokens it produced before ``start_batch``. Positions count
    tokens, not windows, so a stream restarted with another (seq_len, batch_size) continues at the same token.
    ``max_batches``: the loader ends after that many batches (a curriculum stage); None: endless.
    """

    def __init__(self, sources: list[DocumentStream], weights: list[float], tokenizer, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, batch_size: int = 1, start_batch: int = 0,
                 with_doc_ids: bool = False, align: int | None = None, shuffle_buffer: int = 64,
                 synthetic_fraction: float = 0.0, synthetic_tasks: tuple[str, ...] = TRAINING_TASKS,
                 answer_only_loss: bool = False, answer_loss_weight: float = 1.0, max_batches: int | None = None,
                 start_positions: dict[int, dict] | None = None, track_position: bool = False,
                 synthetic_format: str = "ours"):
        super().__init__()
        self.sources, self.weights, self.tokenizer = sources, weights, tokenizer
        self.seq_len, self.seed, self.rank, self.world_size = seq_len, seed, rank, world_size
        self.batch_size, self.start_batch, self.with_doc_ids = batch_size, start_batch, with_doc_ids
        self.align, self.shuffle_buffer = align, shuffle_buffer
        self.synthetic_fraction, self.synthetic_tasks = synthetic_fraction, tuple(synthetic_tasks)
        self.answer_only_loss, self.answer_loss_weight = answer_only_loss, answer_loss_weight
        self.max_batches, self.start_positions = max_batches, start_positions or {}
        self.track_position = track_position
        self.synthetic_format = synthetic_format  # ours (data_modules/synthetic.py) | ruler (ruler_tasks.py)
        self._ruler: RulerTrainingTasks | None = None  # built in the worker, on the first RULER window

    def _with_synthetic_tasks(self, windows, shard: int, n_shards: int, start_token: int):
        """Turn a seeded share of windows into a retrieval task built over the window's own text (spec §5).
        Yields ``(tokens, doc_index, target, weight)``; ``weight`` [L+1] (answer tokens × ``answer_loss_weight``) or
        None when every weight would be 1, so batches only carry ``loss_weight`` when it matters. Each window's
        draw is seeded by its first token's position in the shard's stream: the same whatever seq_len came before."""
        weighted = self.answer_loss_weight != 1.0
        for i, (window, doc_index, target) in enumerate(windows):
            key = (self.seed, shard, n_shards, 17, start_token + i * self.seq_len)
            weight = np.ones(len(window), dtype=np.float32) if weighted else None
            if self.synthetic_fraction and unit_hash(key) < self.synthetic_fraction:
                rng = np.random.default_rng(key)  # built only for the chosen few: ~30 µs, a hash ~1 µs
                task = self._make_task(window, rng)
                target = task.answer_mask if self.answer_only_loss else np.ones(len(window), dtype=bool)
                window, doc_index = task.tokens, np.zeros(len(window), dtype=np.int64)
                if weighted and task.task != "self_copy":  # a copy's "answer" is half the window: dense already
                    weight[task.answer_mask] = self.answer_loss_weight
            yield window, doc_index, target, weight

    def _make_task(self, window: np.ndarray, rng: np.random.Generator) -> TaskSample:
        if self.synthetic_format == "ruler":
            if self._ruler is None:
                self._ruler = RulerTrainingTasks(self.tokenizer, self.seed)
            return self._ruler(window, rng, self.synthetic_tasks)
        return make_random_task(window, len(window), self.tokenizer, rng, self.synthetic_tasks)

    def _mixed_documents(self, shard: int, n_shards: int, state: dict | None = None) -> MixedCursor:
        states = state["sources"] if state else [None] * len(self.sources)
        sources = [s.endless(self.seed + 7919 * i, shard, n_shards, self.shuffle_buffer, states[i])
                   for i, s in enumerate(self.sources)]
        return MixedCursor(sources, self.weights, self.seed, shard, n_shards, state["draws"] if state else 0)

    def _start_position(self, worker: int, n_workers: int) -> dict:
        """Where worker shard ``worker`` starts: its saved position, else a replay from the beginning that skips
        the tokens of its batches before ``start_batch`` (a fresh start: none)."""
        if worker in self.start_positions:
            return self.start_positions[worker]
        tokens = batches_of(worker, n_workers, self.start_batch) * self.batch_size * self.seq_len
        return {"documents": None, "offset": tokens, "token": tokens}

    def _positioned_windows(self, shard: int, n_shards: int, position: dict):
        """Windows from ``position`` on, each with the position after it: ``(tokens, doc_index, target, weight,
        position)``. Documents are drawn ahead (tokenizer batches), so each one's cursor state is kept from its
        draw until the packer has cut past it."""
        mixed = self._mixed_documents(shard, n_shards, position["documents"])
        drawn_states: deque = deque()  # cursor state before each drawn document, in draw order

        def documents():
            while True:
                drawn_states.append(mixed.state())
                yield next(mixed)

        packed: deque = deque()  # (stream index of its first token, cursor state) of documents in the packer
        first_token = position["token"] - position["offset"]

        def pieces():
            nonlocal first_token
            lasts: deque = deque()  # whether each tokenized piece ends its document (one piece each, in order)

            def tokenized():
                for doc in tokenize(documents(), self.tokenizer):
                    lasts.append(doc.last)
                    yield doc

            starts = True  # the next piece is a document's first
            for piece in document_pieces(tokenized(), self.tokenizer.eos_id, self.tokenizer.pad_id, self.align):
                if starts:  # a document read in pieces is one entry: positions inside it count from its start
                    packed.append((first_token, drawn_states.popleft()))
                starts = lasts.popleft()
                first_token += len(piece[0])
                yield piece

        windows = cut_windows(skip_tokens(pieces(), position["offset"]), self.seq_len)
        windows = self._with_synthetic_tasks(windows, shard, n_shards, position["token"])
        for i, window in enumerate(windows):
            token = position["token"] + (i + 1) * self.seq_len  # the next window's first token
            while len(packed) > 1 and packed[1][0] <= token:
                packed.popleft()
            start, state = packed[0]
            yield (*window, {"documents": state, "offset": token - start, "token": token})

    def _samples_for(self, slot: int, n_workers: int) -> int | None:
        """Samples worker ``slot`` yields: the batches ``k < max_batches`` with ``k % n_workers == slot``."""
        if self.max_batches is None:
            return None
        return batches_of(slot, n_workers, self.max_batches) * self.batch_size

    def __iter__(self):
        info = get_worker_info()
        n_workers, slot = (info.num_workers, info.id) if info is not None else (1, 0)
        worker = (slot + self.start_batch) % n_workers
        shard, n_shards = self.rank * n_workers + worker, self.world_size * n_workers
        windows = self._positioned_windows(shard, n_shards, self._start_position(worker, n_workers))
        for window, doc_index, target, weight, position in itertools.islice(windows,
                                                                             self._samples_for(slot, n_workers)):
            sample = make_sample(window, doc_index, target, self.with_doc_ids, weight)
            if self.track_position:
                sample[POSITION_KEY] = (worker, position)
            yield sample


def batches_of(worker: int, n_workers: int, n_batches: int) -> int:
    """How many of the loader's batches ``b < n_batches`` worker ``worker`` makes (batch b comes from b % n_workers)."""
    return max(0, -(-(n_batches - worker) // n_workers))


def collate_with_position(samples: list[dict]) -> dict:
    """Stack samples into a batch; ``POSITION_KEY`` keeps the last sample's ``(worker, position)``: where that
    worker's shard continues after this batch."""
    position = samples[-1][POSITION_KEY]
    batch = default_collate([{k: v for k, v in s.items() if k != POSITION_KEY} for s in samples])
    batch[POSITION_KEY] = position
    return batch


def validation_windows(sources: list[DocumentStream], tokenizer, seq_len: int, n: int, with_doc_ids: bool,
                       align: int | None = None) -> list[dict]:
    """The first ``n`` packed samples of the sources' validation records, sources interleaved: a fixed set (empty
    when they cannot fill one window; ``TextDataModule.validation_samples`` says so)."""
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
    return samples
