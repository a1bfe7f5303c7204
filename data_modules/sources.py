"""Where documents come from: the embedded default corpus (the Python standard library's own source files, present
on every machine) or user files — ``.txt`` (and any other text file: one document per file), ``.jsonl`` (one
document per line, in a configurable field) and ``.parquet`` (one document per row) — streamed, never loaded whole.

A *record* is one document at a position of a file (line number for jsonl, row for parquet, 0 for text files). The
train/validation split and the sharding over ranks and workers are decided per record, so any number of shards
covers every record exactly once per epoch, even when the corpus is a single large file.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sysconfig
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

# Third-party packages live inside the stdlib folder on many installs; they differ per machine, so leave them out.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
SNIFF_BYTES = 8192  # a text file's first bytes looked at to tell text from binary
MAX_UNDECODABLE = 0.01  # share of those bytes' characters that may be invalid UTF-8 in a text file


class DataError(ValueError):
    """Input data is missing or unusable; the message names the file (and line) or key."""


class BinaryFileError(DataError):
    """A file read as text (one document per file) is binary or not UTF-8; ``data.skip_bad_records`` skips it."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every ``.py`` file of the standard library (sorted), third-party folders excluded."""
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts))
    if not files:
        raise DataError(f"the embedded corpus is empty: no .py files under {root}")
    return files


def resolve_paths(patterns: list[str]) -> list[Path]:
    """Files, directories (all files below, recursively) or glob patterns → sorted unique readable files."""
    found: set[Path] = set()
    for pattern in patterns:
        path = Path(pattern)
        if any(ch in pattern for ch in "*?["):
            matches = [Path(m) for m in glob.glob(pattern, recursive=True)]
            if not matches:
                raise DataError(f"data.paths: pattern '{pattern}' matches no files")
            found.update(m for m in matches if m.is_file())
        elif path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            found.add(path)
        else:
            raise DataError(f"data.paths: '{pattern}' does not exist")
    if not found:
        raise DataError(f"data.paths {list(patterns)} contain no files")
    for p in found:
        if not os.access(p, os.R_OK):
            raise DataError(f"data.paths: '{p}' is not readable")
    return sorted(found)


def is_validation(path: Path, position: int, val_fraction: float) -> bool:
    """Deterministic split by a hash of (file name, parent folder name, record position): independent of the file
    list's order, the install prefix, and which other files exist."""
    key = f"{path.parent.name}/{path.name}:{position}".encode()
    return int.from_bytes(hashlib.sha1(key).digest()[:8], "big") / 2**64 < val_fraction


Start = tuple  # where a file's reading resumes: (lines read, byte offset) for jsonl, (row, 0) parquet, (0|1, 0) text


def records_from(path: Path, text_field: str, start: Start = (0, 0)) -> Iterator[tuple[int, object, Start, Start]]:
    """``(position, raw record, its start, the next record's start)`` from ``start`` on, without parsing (cheap
    enough to skip the records another shard owns). A record's start reads it again alone: a jsonl seek, the parquet
    row group holding the row, or the text file — so a stream resumes without re-reading what came before."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _jsonl_records(path, start)
    elif suffix in PARQUET_SUFFIXES:
        yield from _parquet_records(path, text_field, start[0])
    elif start[0] == 0:
        yield 0, path, (0, 0), (1, 0)


def _jsonl_records(path: Path, start: Start) -> Iterator[tuple[int, object, Start, Start]]:
    lineno, offset = start
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            at = (lineno, offset)
            lineno, offset = lineno + 1, offset + len(line)
            if line.strip():
                yield lineno, line, at, (lineno, offset)


def _parquet_records(path: Path, text_field: str, row: int) -> Iterator[tuple[int, object, Start, Start]]:
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column '{text_field}' (columns: {', '.join(pf.schema_arrow.names)})")
    first, group = 0, 0  # the row group holding `row`, and its first row
    while group < pf.num_row_groups and first + pf.metadata.row_group(group).num_rows <= row:
        first += pf.metadata.row_group(group).num_rows
        group += 1
    if group == pf.num_row_groups:
        return
    current = first
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024, row_groups=range(group, pf.num_row_groups)):
        for value in batch.column(0).to_pylist():
            if current >= row:
                yield current, value, (current, 0), (current + 1, 0)
            current += 1


def raw_records(path: Path, text_field: str) -> Iterator[tuple[int, object]]:
    """(position, raw record) of every record of a file: line number for jsonl, row for parquet, 0 for text."""
    for position, raw, _, _ in records_from(path, text_field):
        yield position, raw


def decode_record(path: Path, position: int, raw: object, text_field: str) -> str | bytes:
    """Raw record → document text (bytes for plain files). Raises ``DataError`` naming ``file:line``."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}:{position}: malformed JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(obj, dict) or text_field not in obj:
            raise DataError(f"{path}:{position}: record has no field '{text_field}' (set data.text_field)")
        if not isinstance(obj[text_field], str):
            raise DataError(f"{path}:{position}: field '{text_field}' is {type(obj[text_field]).__name__}, not text")
        return obj[text_field]
    if suffix in PARQUET_SUFFIXES:
        if not isinstance(raw, str):
            raise DataError(f"{path}: row {position}: '{text_field}' is {type(raw).__name__}, not text")
        return raw
    try:
        if Path(raw).stat().st_size >= LARGE_TEXT_BYTES:
            return TextFile(Path(raw))
        return Path(raw).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror}") from e


LARGE_TEXT_BYTES = 1 << 22  # plain-text files from 4 MiB on are documents read in pieces (``TextFile``), never whole
PIECE_BYTES = 1 << 20  # bytes of such a document read and tokenized at a time
CUT_SEARCH = 1 << 16  # how far before a wanted cut a word boundary is looked for


_WORD_END = {bytes: re.compile(rb"\S(?=\s)"), str: re.compile(r"\S(?=\s)")}


def word_boundary(text: bytes | str, at: int) -> int:
    """The cut nearest before ``at`` (0 < cut <= at) where whitespace follows a non-whitespace character: byte-level
    BPE pre-tokenizers (GPT-2's pattern) never match across such a point (a match that starts on a non-space stays
    off whitespace, and one that starts on whitespace starts there either way), so the two sides tokenize as the
    whole does. Failing that (none within ``CUT_SEARCH``), at ``at``, moved back to a UTF-8 character boundary."""
    at = min(at, len(text))
    last = None
    for last in _WORD_END[type(text)].finditer(text, max(0, at - CUT_SEARCH - 1), at):
        pass
    if last is not None:
        return last.end()
    return max(utf8_boundary(text, at) if isinstance(text, bytes) else at, 1)


def utf8_boundary(data: bytes, at: int) -> int:
    """The start of the character ``at`` falls inside, or ``at`` when it falls between characters; at the end of
    ``data``, the start of a last character cut short."""
    if at < len(data):
        while at > 0 and data[at] & 0xC0 == 0x80:
            at -= 1
        return at
    lead = at - 1
    while lead > 0 and data[lead] & 0xC0 == 0x80 and at - lead < 4:
        lead -= 1
    first = data[lead] if data else 0
    size = 1 if first < 0xC0 else 2 if first < 0xE0 else 3 if first < 0xF0 else 4
    return lead if lead + size > len(data) else at


class TextFile:
    """A plain-text file too large to hold whole (``LARGE_TEXT_BYTES``), as a document: its bytes ``[start, end)``,
    read ``PIECE_BYTES`` at a time and cut at word boundaries (``word_boundary``). Its length is its size in bytes
    (what ``min_chars`` and ``long_doc_chars`` compare)."""

    def __init__(self, path: Path, start: int = 0, end: int | None = None):
        self.path, self.start = Path(path), start
        self.end = self.path.stat().st_size if end is None else end

    def __len__(self) -> int:
        return self.end - self.start

    def __eq__(self, other) -> bool:
        return isinstance(other, TextFile) and (self.path, self.start, self.end) == (other.path, other.start, other.end)

    def pieces(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            carry, left = b"", len(self)
            while True:
                read = f.read(min(PIECE_BYTES, left))
                data, left = carry + read, left - len(read)
                if left <= 0 or not read:  # the end (or a file that shrank since)
                    if data:
                        yield data
                    return
                cut = word_boundary(data, len(data))
                yield data[:cut]
                carry = data[cut:]

    def split_at(self, fraction: float) -> tuple["TextFile", "TextFile"]:
        """(head, tail): the tail about ``fraction`` of the bytes, cut at a word boundary."""
        wanted = self.end - int(len(self) * fraction)
        lo = max(self.start, wanted - CUT_SEARCH)
        with open(self.path, "rb") as f:
            f.seek(lo)
            window = f.read(min(self.end, wanted + 1) - lo)
        cut = lo + word_boundary(window, wanted - lo) if wanted - lo > 0 else wanted
        return TextFile(self.path, self.start, cut), TextFile(self.path, cut, self.end)


def held_out_tail(doc, fraction: float) -> tuple:
    """(training head, held-out tail) of one document: the tail is about ``fraction`` of it, cut at a word boundary
    (``data.val_fraction`` per document, when whole documents held out leave too little; see ``DocumentStream``)."""
    if isinstance(doc, TextFile):
        return doc.split_at(fraction)
    wanted = len(doc) - int(len(doc) * fraction)
    if wanted >= len(doc):
        return doc, doc[:0]
    cut = word_boundary(doc, wanted) if wanted > 0 else 0
    return doc[:cut], doc[cut:]


CHAT_ROLES = ("system", "user", "assistant")


def chat_segments(path: Path, position: int, raw: object) -> list[tuple[str, bool]]:
    """A jsonl chat record ``{"messages": [{"role", "content"}, ...]}`` → ``[(text, is_target), ...]`` rendered with
    the chat template ``<|role|>\n{content}\n``; only assistant contents (and their closing newline) are targets."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}:{position}: malformed JSON ({getattr(e, 'msg', e)})") from None
    messages = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{path}:{position}: chat record has no non-empty 'messages' list")
    segments = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            raise DataError(
                f"{path}:{position}: messages[{i}] must be {{'role': one of {', '.join(CHAT_ROLES)}, 'content': str}}"
            )
        assistant = m["role"] == "assistant"
        segments.append((f"<|{m['role']}|>\n", False))
        segments.append((m["content"] + "\n", assistant))
    if not any(target for _, target in segments):
        raise DataError(f"{path}:{position}: chat record has no assistant message to learn from")
    return segments


def binary_reason(head: bytes) -> str | None:
    """Why a file starting with ``head`` is not text, or None: NUL bytes (images, archives, compiled files, UTF-16),
    or more than ``MAX_UNDECODABLE`` of its characters invalid UTF-8 (random bytes: ~45%). A multi-byte character
    cut at the end of ``head`` costs one replacement character, and real U+FFFD characters in the text none."""
    if b"\0" in head:
        return "it contains NUL bytes"
    text = head.decode("utf-8", errors="replace")
    invalid = text.count("\ufffd") - head.count("\ufffd".encode())
    if invalid > MAX_UNDECODABLE * max(1, len(text)):
        return f"{invalid / len(text):.0%} of its first {len(head)} bytes are not UTF-8"
    return None


def check_text_file(path: Path) -> None:
    """Raise ``BinaryFileError`` naming ``path`` when its first ``SNIFF_BYTES`` bytes do not look like text."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror}") from e
    reason = binary_reason(head)
    if reason:
        raise BinaryFileError(f"'{path}' looks binary ({reason}); text files must be UTF-8 text: remove it, or set "
                              "data.skip_bad_records=true to skip such files")


def check_first_record(path: Path, text_field: str, chat: bool = False) -> None:
    """Pre-flight: open the file and decode its first record, so a wrong field name fails before training; a plain
    text file (one document) is only sniffed for binary content, not read whole."""
    if path.suffix.lower() not in JSONL_SUFFIXES | PARQUET_SUFFIXES:
        check_text_file(path)
        return
    for position, raw in raw_records(path, text_field):
        chat_segments(path, position, raw) if chat else decode_record(path, position, raw, text_field)
        return
