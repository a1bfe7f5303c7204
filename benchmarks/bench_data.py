"""Data pipeline throughput: tokens/s of read + tokenize + pack + batch through the DataLoader, for the byte-level
tokenizer and for a byte-level BPE `tokenizer.json` trained here on the embedded corpus.

    python benchmarks/bench_data.py [--workers 2] [--seq-len 4096] [--tokens 20000000] [--out results.json]
                                    [--single-file-mb 1024]

``--single-file-mb N`` adds a corpus of one N-MB single-line text file (read in pieces, never whole): tokens/s and
the peak resident memory of the process that streams it, in a fresh interpreter per tokenizer.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
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


SINGLE_FILE_RUN = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from lit_hsa.config import DataConfig
from data_modules.text import TextDataModule
cfg = DataConfig(paths=[{path!r}], tokenizer={tokenizer!r}, seq_len={seq_len}, batch_size={batch_size}, num_workers=0)
dm = TextDataModule(cfg)
dm.validation_samples()
it = iter(dm.train_dataloader())
next(it)
tokens, start = 0, time.perf_counter()
while tokens < {target}:
    tokens += next(it)["input_ids"].numel()
elapsed = time.perf_counter() - start
print(json.dumps({{"tokens": tokens, "seconds": round(elapsed, 3), "tokens_per_s": round(tokens / elapsed),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}}))
"""


def single_file(folder: Path, size_mb: int) -> Path:
    """One line of ``size_mb`` MB: words from the stdlib's text, separated by single spaces."""
    words = Path(stdlib_files()[0]).read_text(errors="replace").split()[:50_000]
    chunk = (" ".join(words) + " ").encode()
    path = folder / "one_line.txt"
    with open(path, "wb") as f:
        for _ in range(size_mb * 2**20 // len(chunk) + 1):
            f.write(chunk)
    return path


def measure_single_file(path: Path, tokenizer: str, seq_len: int, batch_size: int, target_tokens: int) -> dict:
    code = SINGLE_FILE_RUN.format(root=str(Path(__file__).resolve().parents[1]), path=str(path), tokenizer=tokenizer,
                                  seq_len=seq_len, batch_size=batch_size, target=target_tokens)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    return {"corpus": f"one {path.stat().st_size / 2**20:.0f} MB line", "tokenizer": Path(tokenizer).name,
            "workers": 0, "seq_len": seq_len, **row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=20_000_000, help="tokens to time per tokenizer")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--single-file-mb", type=int, default=0, help="also stream one single-line file this large")
    args = parser.parse_args()

    rows = [measure("byte", args.workers, args.seq_len, args.batch_size, args.tokens)]
    with tempfile.TemporaryDirectory() as tmp:
        bpe = Path(tmp) / "bpe8k.json"
        t0 = time.perf_counter()
        train_bpe(bpe)
        print(f"trained an 8K byte-level BPE on 400 stdlib files in {time.perf_counter() - t0:.1f}s")
        rows.append(measure(str(bpe), args.workers, args.seq_len, args.batch_size, args.tokens // 4))
        if args.single_file_mb:
            path = single_file(Path(tmp), args.single_file_mb)
            for tokenizer in ("byte", str(bpe)):
                rows.append(measure_single_file(path, tokenizer, args.seq_len, args.batch_size, args.tokens // 4))

    print("\n| corpus | tokenizer | workers | seq_len | tokens | seconds | tokens/s | peak memory |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_rss_mb']:,} MB" if "peak_rss_mb" in r else "—"
        print(f"| {r.get('corpus', 'stdlib')} | {r['tokenizer']} | {r['workers']} | {r['seq_len']} | "
              f"{r['tokens']:,} | {r['seconds']} | {r['tokens_per_s'] / 1e6:.2f}M | {peak} |")
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
              "rows": rows}
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
