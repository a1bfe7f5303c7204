"""Tokenizers. The default is byte-level: 256 byte ids + end-of-document + padding, no files needed."""
from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; ``eos_id`` ends every document."""

    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def build_tokenizer(name: str) -> ByteTokenizer:
    if name == "byte":
        return ByteTokenizer()
    raise ValueError(f"data.tokenizer: unknown tokenizer '{name}' (available: byte)")
