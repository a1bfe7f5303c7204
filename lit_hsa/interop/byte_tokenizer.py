"""A Hugging Face ``tokenizers`` tokenizer equivalent to ``data_modules.tokenizers.ByteTokenizer``, for exports.

Ids 0..255 are the UTF-8 bytes, ``<|endoftext|>`` = 256 (end of document), ``<pad>`` = 257; no BOS, no merges. The
byte-level pre-tokenizer maps each byte to one printable character (GPT-2's table) and the BPE vocabulary holds
those 256 characters at id = byte value, so every byte is its own token and the ByteLevel decoder turns ids back
into bytes (invalid UTF-8 decodes to U+FFFD, as ``ByteTokenizer.decode`` does).

One difference: the two special tokens are added tokens, so ``tokenizers`` (and lit-hsa's ``HFTokenizer``) encode
the literal text ``<|endoftext|>`` as id 256, where ``ByteTokenizer`` encodes its 13 bytes. ``tokenizer_config``
sets ``split_special_tokens`` so that ``transformers.AutoTokenizer`` encodes it as bytes, like ``ByteTokenizer``.
"""
from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from data_modules.tokenizers import ByteTokenizer

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte → character table (the one ``pre_tokenizers.ByteLevel`` applies): printable Latin-1 bytes map to
    themselves, the other 68 to the characters from U+0100 on, so no byte becomes whitespace or a control."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer() -> Tokenizer:
    """The ``tokenizers`` form of ``ByteTokenizer`` (vocabulary 258: bytes, EOS 256, pad 257)."""
    vocab = {char: b for b, char in byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: with no merges, splitting text into words first changes no id, it only costs time
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False),
                            AddedToken(PAD_TOKEN, special=True, normalized=False)])
    # The ids are fixed by ByteTokenizer: a mismatch here would silently shift every special token of the export.
    assert (tok.token_to_id(EOS_TOKEN), tok.token_to_id(PAD_TOKEN)) == (ByteTokenizer.eos_id, ByteTokenizer.pad_id)
    return tok
