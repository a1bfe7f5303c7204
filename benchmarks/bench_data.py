"""Data pipeline throughput: tokens/s of read + tokenize + pack + batch through the DataLoader, for the byte-level
tokenizer and for a byte-level BPE `tokenizer.json` trained here on the embedded corpus.

    python benchmarks/bench_data.py [--workers 2] [--seq-len 4096] [--tokens 20000000] [--out results.json]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from common import write_result

from data_modules.sources import stdlib_files
from data_modules.text import TextDataModule
from lit_hsa.config import DataConfig


def train_bpe(path: Path, vocab_size: int = 8192, n_files: int = 400) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(p) for p in stdlib_files()[:n_files]], trainer)
    tok.save(str(path))


def measure(tokenizer: str, workers: int, seq_len: int, batch_size: int, target_tokens: int) -> dict:
    cfg = DataConfig(tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, num_workers=workers)
    loader = TextDataModule(cfg).train_dataloader()
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    tokens, start = 0, time.perf_counter()
    while tokens < target_tokens:
        tokens += next(it)["input_ids"].numel()
    elapsed = time.perf_counter() - start
    return {"tokenizer": Path(tokenizer).name, "workers": workers, "seq_len": seq_len, "tokens": tokens,
            "seconds": round(elapsed, 3), "tokens_per_s": round(tokens / elapsed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=20_000_000, help="tokens to time per tokenizer")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args()

    rows = [measure("byte", args.workers, args.seq_len, args.batch_size, args.tokens)]
    with tempfile.TemporaryDirectory() as tmp:
        bpe = Path(tmp) / "bpe8k.json"
        t0 = time.perf_counter()
        train_bpe(bpe)
        print(f"trained an 8K byte-level BPE on 400 stdlib files in {time.perf_counter() - t0:.1f}s")
        rows.append(measure(str(bpe), args.workers, args.seq_len, args.batch_size, args.tokens // 4))

    print("\n| tokenizer | workers | seq_len | tokens | seconds | tokens/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokenizer']} | {r['workers']} | {r['seq_len']} | {r['tokens']:,} | {r['seconds']} | "
              f"{r['tokens_per_s'] / 1e6:.2f}M |")
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
              "rows": rows}
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
