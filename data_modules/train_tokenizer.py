"""Train a byte-level BPE ``tokenizer.json`` on the training split of a data config's sources (by default the
embedded corpus), so text models train on subword tokens with no download:

    python -m data_modules.train_tokenizer --out configs/tokenizers/stdlib-bpe-8k.json [--vocab-size 8192]

Only the training split is read (``data.val_fraction`` holds the rest out), so held-out perplexity is measured on
text the tokenizer never saw. Special tokens: ``<|endoftext|>`` (id 0: ends every document) and ``<pad>`` (id 1).
Byte-level (GPT-2's pre-tokenizer and decoder): every string round-trips, no unknown tokens.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_modules.sources import TextFile

SPECIAL_TOKENS = ["<|endoftext|>", "<pad>"]


def training_texts(data_cfg):
    """Every training-split document of ``data_cfg``'s sources, as text (chat records as their turns)."""
    from data_modules.text import build_document_streams

    for stream in build_document_streams(data_cfg)[0]:
        for doc in stream.documents("train", 0, 0, 0, 1):
            if isinstance(doc, list):
                yield "".join(text for text, _ in doc)
            elif isinstance(doc, TextFile):
                yield from (piece.decode("utf-8", errors="replace") for piece in doc.pieces())
            else:
                yield doc.decode("utf-8", errors="replace") if isinstance(doc, bytes) else doc


def train_bpe(texts, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    from lit_hsa.config import load_config

    parser = argparse.ArgumentParser(prog="python -m data_modules.train_tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="tokenizer.json to write")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--config", help="YAML whose data section names the text (default: the embedded corpus)")
    args = parser.parse_args(argv)
    data_cfg = load_config(args.config).data
    tokenizer = train_bpe(training_texts(data_cfg), args.vocab_size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(args.out)
    print(f"wrote {args.out} ({tokenizer.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
