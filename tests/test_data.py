import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_modules.packing import PackedStream, pack_windows
from data_modules.sources import DataError, resolve_paths, split_train_val, stdlib_files
from data_modules.text import TextDataModule
from data_modules.tokenizers import ByteTokenizer
from lit_hsa.config import DataConfig


@pytest.fixture
def corpus(tmp_path):
    for i in range(12):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i} " * (5 + 3 * i))
    return tmp_path


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "héllo\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size > tok.eos_id > 255


def test_stdlib_corpus_excludes_third_party():
    files = stdlib_files()
    assert len(files) > 500
    assert not any("site-packages" in f.parts or "dist-packages" in f.parts for f in files)


def test_pack_windows_keeps_every_token_in_order():
    docs = [np.arange(n, dtype=np.int32) + 10 * i for i, n in enumerate([5, 17, 3, 40, 2])]
    windows = list(pack_windows(iter(docs), seq_len=8, eos_id=-1))
    stream = np.concatenate([np.append(d, -1) for d in docs])
    for w, (tokens, doc_index) in enumerate(windows):
        assert len(tokens) == 9
        np.testing.assert_array_equal(tokens, stream[w * 8 : w * 8 + 9])  # stride 8: each token a target once
        assert np.all(np.diff(doc_index) >= 0)
    assert len(windows) == (len(stream) - 1) // 8


def test_shards_cover_corpus_exactly_once_per_epoch(corpus):
    """2 ranks × 2 workers: every file read by exactly one shard in an epoch."""
    files = resolve_paths([str(corpus)])
    seen = []
    for rank in range(2):
        for shard in range(2):
            ds = PackedStream(files, ByteTokenizer(), 8, seed=0, rank=rank, world_size=2)
            seen += [f.name for f in _epoch_files(ds, rank * 2 + shard, 4)]
    assert sorted(seen) == sorted(f.name for f in files)


def _epoch_files(ds: PackedStream, shard: int, n_shards: int) -> list:
    import random

    order = list(range(len(ds.files)))
    random.Random(ds.seed).shuffle(order)
    docs = list(ds._documents(shard, n_shards, epochs=1))
    names = [ds.files[i] for i in order[shard::n_shards]]
    assert [len(d) for d in docs] == [f.stat().st_size for f in names]
    return names


@pytest.mark.parametrize("num_workers,start", [(0, 5), (2, 5), (2, 6)])
def test_resumed_stream_continues_exactly(corpus, num_workers, start):
    files = resolve_paths([str(corpus / "*.txt")])

    def batches(start_batch, n):
        ds = PackedStream(files, ByteTokenizer(), 16, seed=3, batch_size=2, start_batch=start_batch)
        it = iter(DataLoader(ds, batch_size=2, num_workers=num_workers))
        return [next(it)["input_ids"] for _ in range(n)]

    full = batches(0, start + 6)
    resumed = batches(start, 6)
    for a, b in zip(full[start:], resumed):
        assert torch.equal(a, b)


def test_datamodule_batches_and_doc_ids(corpus):
    dm = TextDataModule(DataConfig(source="files", paths=[str(corpus)], seq_len=32, batch_size=2, num_workers=0,
                                   document_masking=True, val_fraction=0.2, val_samples=3))
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["doc_ids"].shape == (2, 32)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    eos = batch["input_ids"] == ByteTokenizer.eos_id
    # The document id steps up right after each end-of-document token.
    steps = batch["doc_ids"][:, 1:] - batch["doc_ids"][:, :-1]
    assert torch.equal(steps.bool(), eos[:, :-1])
    assert len(dm.val_dataloader().dataset) == 3


def test_split_is_deterministic_and_disjoint(corpus):
    files = resolve_paths([str(corpus)])
    train, val = split_train_val(files, 0.3)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(files)
    assert sorted(split_train_val(list(reversed(files)), 0.3)[1]) == sorted(val)


def test_missing_and_empty_paths_raise(tmp_path):
    with pytest.raises(DataError, match="'nope.txt' does not exist"):
        resolve_paths(["nope.txt"])
    with pytest.raises(DataError, match="matches no files"):
        resolve_paths([str(tmp_path / "*.jsonl")])
