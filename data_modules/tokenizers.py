"""Tokenizers: byte-level by default (no files needed), or any Hugging Face ``tokenizers`` ``tokenizer.json``.

Both expose ``encode(text) -> int32 array``, ``encode_batch(texts) -> list of arrays``, ``decode(ids)``,
``vocab_size``, ``eos_id`` and ``pad_id``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .sources import DataError

# Tried in order when the config does not name the end-of-document token.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]", "<|end_of_text|>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; ``eos_id`` ends every document, ``pad_id`` fills chunk alignment."""

    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: list[str | bytes]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers`` ``tokenizer.json`` (BPE, Unigram, …). ``encode_batch`` runs in Rust threads."""

    def __init__(self, path: str, eos_token: str | None = None):
        if not Path(path).is_file():
            raise DataError(f"data.tokenizer: tokenizer file '{path}' does not exist")
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a plain Exception with the parse error
            raise DataError(f"data.tokenizer: '{path}' is not a valid tokenizer.json ({str(e).splitlines()[0]})") from e
        vocab = self._tok.get_vocab(with_added_tokens=True)
        names = (eos_token,) if eos_token else _EOS_CANDIDATES
        eos = next((vocab[n] for n in names if n in vocab), None)
        if eos is None:
            raise DataError(
                f"data.tokenizer: '{path}' has no end-of-document token "
                f"{'named ' + repr(eos_token) if eos_token else 'among ' + ', '.join(_EOS_CANDIDATES)}; set "
                "data.eos_token"
            )
        self.eos_id = eos
        self.pad_id = next((vocab[n] for n in _PAD_CANDIDATES if n in vocab), eos)
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)

    def encode(self, text: str | bytes) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str | bytes]) -> list[np.ndarray]:
        texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def build_tokenizer(name: str, eos_token: str | None = None):
    """``byte`` or a path to a ``tokenizer.json``."""
    if name == "byte":
        return ByteTokenizer()
    if name.endswith(".json"):
        return HFTokenizer(name, eos_token)
    raise DataError(f"data.tokenizer: '{name}' is neither 'byte' nor a path to a tokenizer.json file")
