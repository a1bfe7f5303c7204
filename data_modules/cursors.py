"""Resumable document streams: one source's training documents for one shard (``SourceCursor``) and the weighted
mixture of sources (``MixedCursor``), each with a compact ``state()`` that restores it in O(shuffle buffer) reads,
whatever the position: counters, file positions and record references, never text and never a replay.

Random choices (shuffle-buffer slot, mixture source) are hashes of a counter instead of a generator's state, so the
state is one integer and a resumed stream draws exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
from typing import Iterator, Protocol

from .sources import DataError

Ref = tuple  # (file index, Start): one record, read again alone by DocumentStream.decode
Cursor = tuple  # (index in the epoch's file order, Start inside that file, split records counted before it)


class DocumentSource(Protocol):
    """What a cursor reads (``packing.DocumentStream``): a split's records owned by a shard, in an epoch's order
    from a cursor on, one record read again by its reference, and how often a document is repeated."""

    files: list

    def owned(self, split: str, epoch: int, seed: int, shard: int, n_shards: int,
              cursor: Cursor) -> Iterator[tuple[Cursor, Ref, object]]: ...

    def decode(self, ref: Ref) -> object: ...

    def copies(self, doc) -> int: ...


def unit_hash(key: tuple) -> float:
    """A uniform draw in [0, 1) that is a function of ``key`` alone (no generator state to carry or replay)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "big") / 2**64


class SourceCursor:
    """Training documents of one source for one shard, epoch after epoch, through a bounded seeded shuffle buffer.

    ``state()`` after any document: the epoch, the cursor in its file order, the buffer and a pending long-document
    repeat as record references, and the number of buffer draws. ``SourceCursor(..., state=s)`` continues exactly
    there, reading only the buffered records again.
    """

    def __init__(self, stream: DocumentSource, seed: int, shard: int, n_shards: int, buffer_size: int,
                 state: dict | None = None):
        self.stream, self.seed, self.shard, self.n_shards, self.buffer_size = stream, seed, shard, n_shards, buffer_size
        state = state or {"epoch": 0, "cursor": (0, (0, 0), 0), "produced": False, "draws": 0, "buffer": [],
                          "repeat": None}
        self.epoch, self.cursor, self.produced = state["epoch"], tuple(state["cursor"]), state["produced"]
        self.draws = state["draws"]
        self.buffer = [(tuple(ref), stream.decode(ref)) for ref in state["buffer"]]
        self.repeat = None  # (ref, document, copies still to come)
        if state["repeat"] is not None:
            ref, left = state["repeat"]
            self.repeat = (tuple(ref), stream.decode(ref), left)
        self._records = self._open()

    def _open(self):
        return self.stream.owned("train", self.epoch, self.seed, self.shard, self.n_shards, self.cursor)

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "produced": self.produced, "draws": self.draws,
                "buffer": [ref for ref, _ in self.buffer],
                "repeat": None if self.repeat is None else (self.repeat[0], self.repeat[2])}

    def _next_record(self) -> tuple[Ref, object]:
        """The next (reference, document) entering the buffer: a pending repeat, else the next owned record."""
        if self.repeat is not None:
            ref, doc, left = self.repeat
            self.repeat = (ref, doc, left - 1) if left > 1 else None
            return ref, doc
        for cursor, ref, doc in self._records:
            self.cursor, self.produced = cursor, True
            copies = self.stream.copies(doc)
            if copies > 1:
                self.repeat = (ref, doc, copies - 1)
            return ref, doc
        if not self.produced:
            raise DataError(
                f"a training shard got no documents ({len(self.stream.files)} files, shard {self.shard} of "
                f"{self.n_shards}): the corpus is empty, too small for ranks × data.num_workers, or filtered away"
            )
        self.epoch, self.cursor, self.produced = self.epoch + 1, (0, (0, 0), 0), False
        self._records = self._open()
        return self._next_record()

    def __iter__(self) -> SourceCursor:
        return self

    def __next__(self):
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self._next_record())
        incoming = self._next_record()
        slot = int(unit_hash((self.seed, self.shard, self.n_shards, self.draws)) * self.buffer_size)
        self.draws += 1
        (_, doc), self.buffer[slot] = self.buffer[slot], incoming
        return doc


class MixedCursor:
    """Weighted mixture of ``SourceCursor``s: draw ``k`` picks a source by a hash of ``(seed, shard, k)``."""

    def __init__(self, sources: list[SourceCursor], weights: list[float], seed: int, shard: int, n_shards: int,
                 draws: int = 0):
        self.sources, self.key, self.draws = sources, ("mix", seed, shard, n_shards), draws
        self.cumulative = list(itertools.accumulate(weights))

    def state(self) -> dict:
        return {"draws": self.draws, "sources": [s.state() for s in self.sources]}

    def __iter__(self) -> MixedCursor:
        return self

    def __next__(self):
        if len(self.sources) == 1:
            return next(self.sources[0])
        u = unit_hash((*self.key, self.draws)) * self.cumulative[-1]
        self.draws += 1
        return next(self.sources[min(bisect.bisect_right(self.cumulative, u), len(self.sources) - 1)])
