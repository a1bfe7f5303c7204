import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_modules.packing import (
    IGNORE_INDEX,
    POSITION_KEY,
    TOKENIZE_BATCH,
    Document,
    DocumentStream,
    PackedStream,
    collate_with_position,
    pack_windows,
)
from data_modules.sources import DataError, resolve_paths, stdlib_files
from data_modules.text import TextDataModule
from data_modules.tokenizers import ByteTokenizer, build_tokenizer
from lit_hsa.cli import main
from lit_hsa.config import DataConfig, SourceConfig
from tests.helpers import ROOT, fit, scalars


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"record {i} " * (3 + i), "id": i}) for i in range(40)) + "\n")
    return path


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "héllo\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size > tok.pad_id > tok.eos_id > 255


def test_stdlib_corpus_excludes_third_party():
    files = stdlib_files()
    assert len(files) > 500
    assert not any("site-packages" in f.parts or "dist-packages" in f.parts for f in files)


def test_pack_windows_keeps_every_token_in_order():
    docs = [np.arange(n, dtype=np.int32) + 10 * i for i, n in enumerate([5, 17, 3, 40, 2])]
    windows = list(pack_windows(iter(Document(d) for d in docs), seq_len=8, eos_id=-1))
    stream = np.concatenate([np.append(d, -1) for d in docs])
    for w, (tokens, doc_index, target) in enumerate(windows):
        assert len(tokens) == 9 and target.all()
        np.testing.assert_array_equal(tokens, stream[w * 8 : w * 8 + 9])  # stride 8: each token a target once
        assert np.all(np.diff(doc_index) >= 0)
    assert len(windows) == (len(stream) - 1) // 8


def test_align_docs_to_chunks_starts_every_document_on_a_chunk():
    docs = [Document(np.full(n, 5, dtype=np.int32)) for n in (3, 9, 1, 20, 7)]
    windows = list(pack_windows(iter(docs), seq_len=16, eos_id=1, pad_id=0, align=4))
    tokens = np.concatenate([w[0][:-1] for w in windows])
    doc_index = np.concatenate([w[1][:-1] for w in windows])
    target = np.concatenate([w[2][:-1] for w in windows])
    starts = np.flatnonzero(np.diff(doc_index)) + 1
    assert np.all(starts % 4 == 0)
    assert not np.any(target[tokens == 0]) and np.all(target[tokens != 0])  # padding is never a target


def test_jsonl_stream_shards_cover_records_exactly_once(jsonl):
    """2 ranks × 2 workers over ONE file: every record read by exactly one shard per epoch."""
    stream = DocumentStream([jsonl], "text", val_fraction=0.1)
    seen = []
    for shard in range(4):
        seen += list(stream.documents("train", 0, 0, shard, 4))
    val = list(stream.documents("val", 0, 0, 0, 1))
    assert len(seen) == len(set(seen)) and len(seen) + len(val) == 40 and val
    assert set(seen).isdisjoint(val)


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": [f"row {i} " * 9 for i in range(30)]}), path)
    docs = list(DocumentStream([path], "content", val_fraction=0.2).documents("train", 0, 0, 0, 1))
    assert 15 < len(docs) < 30 and docs[0].startswith("row")
    with pytest.raises(DataError, match="no column 'text'"):
        list(DocumentStream([path], "text", 0.2).documents("train", 0, 0, 0, 1))


def test_mixture_follows_weights(tmp_path, corpus, jsonl):
    cfg = DataConfig(sources=[SourceConfig(paths=[str(corpus)], weight=1.0),
                              SourceConfig(paths=[str(jsonl)], weight=3.0)],
                     seq_len=32, num_workers=0, val_fraction=0.05)
    dm = TextDataModule(cfg)
    docs = dm.train_dataset()._mixed_documents(0, 1)
    from_jsonl = sum(isinstance(next(docs), str) for _ in range(400))  # jsonl gives str, text files bytes
    assert 0.65 < from_jsonl / 400 < 0.85


@pytest.mark.parametrize("num_workers,start", [(0, 5), (2, 5), (2, 6)])
def test_resumed_stream_continues_exactly(corpus, num_workers, start):
    stream = DocumentStream(resolve_paths([str(corpus / "*.txt")]), "text", 0.1)

    def batches(start_batch, n):
        ds = PackedStream([stream], [1.0], ByteTokenizer(), 16, seed=3, batch_size=2, start_batch=start_batch,
                          shuffle_buffer=4)
        it = iter(DataLoader(ds, batch_size=2, num_workers=num_workers))
        return [next(it)["input_ids"] for _ in range(n)]

    full = batches(0, start + 6)
    for a, b in zip(full[start:], batches(start, 6)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_datamodule_resumes_from_saved_positions(corpus, num_workers):
    cfg = DataConfig(paths=[str(corpus)], seq_len=16, batch_size=2, num_workers=num_workers, val_fraction=0.1,
                     shuffle_buffer=4)

    def consume(dm, n):  # hand each batch to the DataModule as Lightning does when it takes it
        it = iter(dm.train_dataloader())
        return [dm.on_before_batch_transfer(next(it), 0)["input_ids"] for _ in range(n)]

    full = consume(TextDataModule(cfg), 11)
    interrupted = TextDataModule(cfg)
    consume(interrupted, 5)
    resumed = TextDataModule(cfg)
    resumed.load_state_dict(interrupted.state_dict())
    for a, b in zip(full[5:], consume(resumed, 6)):
        assert torch.equal(a, b)
    other_workers = TextDataModule(DataConfig(paths=[str(corpus)], seq_len=16, val_fraction=0.1, num_workers=3))
    with pytest.raises(DataError, match="resume with the same devices and data.num_workers"):
        other_workers.load_state_dict(interrupted.state_dict())


@pytest.fixture
def mixed_files(tmp_path, corpus):
    """(folder of text files, a jsonl with blank lines, a parquet file of several row groups)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [json.dumps({"text": f"record {i} " * (3 + i % 17)}) if i % 7 else "" for i in range(300)]
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": [f"row {i} " * (2 + i % 13) for i in range(500)]}), tmp_path / "p.parquet",
                   row_group_size=64)
    return corpus, tmp_path / "x.jsonl", tmp_path / "p.parquet"


@pytest.fixture
def mixed_sources(mixed_files):
    """Text files (long ones repeated), a jsonl with blank lines and a parquet file of several row groups."""
    text, jsonl, parquet = mixed_files
    return [DocumentStream(resolve_paths([str(text)]), "text", 0.1, long_doc_chars=150, long_doc_repeat=2),
            DocumentStream([jsonl], "text", 0.1), DocumentStream([parquet], "text", 0.1)]


def positioned_stream(sources, positions=None, **options):
    return PackedStream(sources, [1.0, 2.0, 1.5][: len(sources)], ByteTokenizer(), 48, seed=3, shuffle_buffer=5,
                        track_position=True, start_positions=positions, **options)


def pending_repeats(position: dict) -> int:
    """Sources whose saved cursor state holds a long document still to be repeated."""
    return sum(source["repeat"] is not None for source in position["documents"]["sources"])


def test_stream_restored_from_every_position_continues_exactly(mixed_sources):
    """The position saved with each of 260 windows (≈ 12K tokens: past the first epoch of every source; shuffle
    buffer on; long text files repeated) restores a stream that continues exactly as the uninterrupted one. Some
    positions fall while a long document's repeat is pending: it must come back with them."""
    options = {"align": 8, "with_doc_ids": True, "synthetic_fraction": 0.2, "synthetic_tasks": ["self_copy"]}
    n, ahead = 260, 12
    full = list(itertools.islice(iter(positioned_stream(mixed_sources, **options)), n + ahead))
    positions = [sample[POSITION_KEY][1] for sample in full[:n]]
    for j, position in enumerate(positions):
        resumed = list(itertools.islice(iter(positioned_stream(mixed_sources, {0: position}, **options)), ahead))
        for a, b in zip(full[j + 1 : j + 1 + ahead], resumed, strict=True):
            assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "doc_ids")), j
    assert sum(pending_repeats(p) > 0 for p in positions) >= 5  # the window did test restoring pending repeats


def loader_batches(dataset: PackedStream, n_workers: int, n: int) -> list[dict]:
    """The first ``n`` batches a DataLoader with ``n_workers`` workers makes of ``dataset`` (batch ``b`` from worker
    ``b % n_workers``, as ``collate_with_position`` stacks them), each worker's iterator run in this process."""
    from types import SimpleNamespace

    from data_modules import packing

    per_worker = []
    for slot in range(n_workers):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(packing, "get_worker_info", lambda: SimpleNamespace(num_workers=n_workers, id=slot))
            count = packing.batches_of(slot, n_workers, n) * dataset.batch_size
            per_worker.append(iter(list(itertools.islice(iter(dataset), count))))
    return [collate_with_position([next(per_worker[b % n_workers]) for _ in range(dataset.batch_size)])
            for b in range(n)]


def test_datamodule_with_workers_resumes_from_every_batch(mixed_files):
    """Two dataloader workers keep a position each: the DataModule's state after any of 100 consumed batches
    (shuffle buffer on, long documents repeated, repeats pending at some of them) resumes exactly."""
    text, jsonl, parquet = mixed_files
    cfg = DataConfig(sources=[SourceConfig(paths=[str(text)], long_doc_chars=150, long_doc_repeat=3),
                              SourceConfig(paths=[str(jsonl)], weight=2.0, long_doc_chars=40, long_doc_repeat=2),
                              SourceConfig(paths=[str(parquet)])],
                     seq_len=48, batch_size=2, num_workers=2, val_fraction=0.1, shuffle_buffer=5)
    n, ahead = 100, 6
    dm = TextDataModule(cfg)
    states = [copy.deepcopy(dm.state_dict())]
    full = []
    for batch in loader_batches(dm.train_dataset(), 2, n + ahead):
        full.append(dm.on_before_batch_transfer(batch, 0)["input_ids"])
        states.append(copy.deepcopy(dm.state_dict()))
    for j in range(n):
        resumed = TextDataModule(cfg)
        resumed.load_state_dict(states[j])
        for a, b in zip(full[j : j + ahead], loader_batches(resumed.train_dataset(), 2, ahead), strict=True):
            assert torch.equal(a, b["input_ids"]), j
    saved = [p for state in states[:n] for p in state["ranks"][0]["positions"] if p is not None]
    assert sum(pending_repeats(p) > 0 for p in saved) >= 10  # the window did test restoring pending repeats


def test_resume_reads_a_bounded_number_of_records(tmp_path, monkeypatch):
    """Restoring a position reads the shuffle buffer's records and those of about one window, not the stream so
    far: the same count deep into the fourth epoch as near the start."""
    from data_modules import packing

    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"line {i} " * (2 + i % 9)}) for i in range(500)) + "\n")
    source = DocumentStream([path], "text", 0.01)
    full = list(itertools.islice(iter(positioned_stream([source])), 2000))  # ~96K tokens, epochs of ~27K
    real, reads = packing.records_from, []

    def counting(*args):
        for record in real(*args):
            reads.append(record)
            yield record

    monkeypatch.setattr(packing, "records_from", counting)
    cost = {}
    for j in (10, 1990):
        reads.clear()
        _, position = full[j][POSITION_KEY]
        assert position["documents"]["sources"][0]["epoch"] == (0 if j == 10 else 3)
        assert torch.equal(next(iter(positioned_stream([source], {0: position})))["input_ids"],
                           full[j + 1]["input_ids"])
        cost[j] = len(reads)
    assert cost[1990] <= 5 + TOKENIZE_BATCH + 8 and abs(cost[1990] - cost[10]) <= 8  # buffer + tokenizer batch


def test_datamodule_batches_doc_ids_and_alignment(tmp_path):
    """Documents of 5-19 bytes packed into windows of 32 with chunk alignment 8: the first batch holds several
    document boundaries and padding, and doc_ids are exactly those read off the tokens (a new document starts after
    EOS and its padding), every document starting on a chunk boundary, no padding or EOS→next-token target."""
    for i in range(40):
        (tmp_path / f"d{i:02d}.txt").write_text("x" * (5 + i % 15))
    cfg = DataConfig(paths=[str(tmp_path)], seq_len=32, batch_size=2, num_workers=0, document_masking=True,
                     align_docs_to_chunks=True, val_fraction=0.2, val_samples=3)
    dm = TextDataModule(cfg, chunk_size=8)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["doc_ids"].shape == (2, 32)
    ids, labels, docs = batch["input_ids"], batch["labels"], batch["doc_ids"]
    pad, eos = ByteTokenizer.pad_id, ByteTokenizer.eos_id
    for row in range(2):
        expected, doc = [], 0
        for t in range(32):  # a token that is not padding, after EOS or padding, opens the next document
            if t > 0 and ids[row, t] != pad and ids[row, t - 1] in (pad, eos):
                doc += 1
            expected.append(doc)
        assert docs[row].tolist() == expected
        assert doc >= 2 and (ids[row] == pad).any()  # the row really holds boundaries and padding
    starts = (docs[:, 1:] != docs[:, :-1]).nonzero()[:, 1] + 1
    assert len(starts) >= 4 and torch.all(starts % 8 == 0)
    predicted = labels != IGNORE_INDEX
    assert torch.equal(ids[:, 1:][predicted[:, :-1]], labels[:, :-1][predicted[:, :-1]])
    assert not predicted[:, :-1][ids[:, 1:] == pad].any()
    assert len(dm.val_dataloader().dataset) == 3


def test_long_documents_filter_and_upweight(corpus):
    stream = DocumentStream(resolve_paths([str(corpus)]), "text", 0.01, min_chars=60, long_doc_chars=300,
                            long_doc_repeat=3)
    docs = list(stream.documents("train", 0, 0, 0, 1))
    assert all(len(d) >= 60 for d in docs)
    long = [d for d in docs if len(d) >= 300]
    assert long and all(docs.count(d) == 3 for d in long)


def test_bad_records_name_file_and_line_or_are_skipped(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken\n{"body": "x"}\n{"text": "also fine"}\n')
    stream = DocumentStream([path], "text", val_fraction=1e-9)
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        list(stream.documents("train", 0, 0, 0, 1))
    skipping = DocumentStream([path], "text", val_fraction=1e-9, skip_bad_records=True)
    assert list(skipping.documents("train", 0, 0, 0, 1)) == ["fine", "also fine"] and skipping.bad_records == 2


def test_wrong_text_field_fails_before_training(jsonl):
    with pytest.raises(DataError, match="no field 'body'"):
        TextDataModule(DataConfig(sources=[SourceConfig(paths=[str(jsonl)], text_field="body")]))


def test_missing_and_empty_inputs_raise(tmp_path):
    with pytest.raises(DataError, match="'nope.txt' does not exist"):
        resolve_paths(["nope.txt"])
    with pytest.raises(DataError, match="matches no files"):
        resolve_paths([str(tmp_path / "*.jsonl")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contain no files"):
        resolve_paths([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="no documents"):
        next(DocumentStream([], "text", 0.1).endless(0, 0, 1, 4))


def test_hf_tokenizer_file(tmp_path, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train([str(p) for p in corpus.iterdir()], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    hf = build_tokenizer(str(path))
    assert hf.eos_id == tok.token_to_id("<|endoftext|>") and hf.vocab_size == tok.get_vocab_size()
    ids = hf.encode("document 3 document 3")
    assert ids.dtype == np.int32 and len(ids) < 21
    with pytest.raises(DataError, match="no end-of-document token named '<eos>'"):
        build_tokenizer(str(path), eos_token="<eos>")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        build_tokenizer(str(tmp_path / "bad.json"))


def test_synthetic_tasks_mixed_into_training(corpus):
    cfg = DataConfig(paths=[str(corpus)], seq_len=256, num_workers=0, synthetic_fraction=0.5,
                     synthetic_tasks=["niah_single"], answer_only_loss=True)
    ds = TextDataModule(cfg).train_dataset()
    samples = [s for _, s in zip(range(40), iter(ds))]
    tok = ByteTokenizer()
    is_task = ["special magic number" in tok.decode(s["input_ids"]) for s in samples]
    tasks = [s for s, t in zip(samples, is_task) if t]
    assert 10 <= len(tasks) <= 30  # about half
    for s in tasks:
        target = s["labels"] != IGNORE_INDEX
        answer = tok.decode(s["labels"][target])
        assert answer.isdigit() and len(answer) == 8  # loss only on the 8-digit value
        assert answer in tok.decode(s["input_ids"][: target.nonzero()[0, 0]])  # the needle is in the context
    plain = [s for s, t in zip(samples, is_task) if not t]
    assert all((s["labels"] != IGNORE_INDEX).all() for s in plain)


def test_sft_chat_records_learn_assistant_tokens_only(tmp_path):
    path = tmp_path / "chat.jsonl"
    records = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {i}"},
                             {"role": "assistant", "content": f"Reply {i}"}]} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = DataConfig(sources=[SourceConfig(paths=[str(path)], format="chat")], seq_len=64, num_workers=0,
                     val_fraction=0.05)
    sample = next(iter(TextDataModule(cfg).train_dataset()))
    tok = ByteTokenizer()
    learned = tok.decode(sample["labels"][sample["labels"] != IGNORE_INDEX])
    assert "<|assistant|>" in tok.decode(sample["input_ids"]) and "Say" in tok.decode(sample["input_ids"])
    assert "Say" not in learned and "system" not in learned and "Reply" in learned  # answers (+ EOS) only


def test_bad_chat_record_is_named(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:1: messages\[0\] must be"):
        TextDataModule(DataConfig(sources=[SourceConfig(paths=[str(path)], format="chat")]))


# ---------------------------------------------------------------- large files, read in pieces; per-document held-out


@pytest.fixture
def small_pieces(monkeypatch):
    """Files from 1 KB on are read in pieces of 256 bytes: the large-file path at test sizes."""
    import data_modules.sources as sources

    monkeypatch.setattr(sources, "LARGE_TEXT_BYTES", 1000)
    monkeypatch.setattr(sources, "PIECE_BYTES", 256)
    monkeypatch.setattr(sources, "CUT_SEARCH", 200)


def stdlib_text(n_bytes: int) -> bytes:
    """Real source text: indentation runs, blank lines, punctuation, digits (what word cuts must get right)."""
    import typing

    return Path(typing.__file__).read_bytes()[:n_bytes]


def test_large_file_pieces_tokenize_as_the_whole_file(tmp_path, small_pieces):
    """Pieces cut at word boundaries concatenate to the file and, with a byte-level BPE (GPT-2 pre-tokenizer),
    tokenize to exactly the whole file's tokens."""
    from data_modules.sources import TextFile

    path = tmp_path / "big.txt"
    path.write_bytes(stdlib_text(20_000))
    pieces = list(TextFile(path).pieces())
    assert len(pieces) > 50 and b"".join(pieces) == path.read_bytes()
    tok = build_tokenizer(str(ROOT / "configs/tokenizers/stdlib-bpe-8k.json"))
    whole = tok.encode(path.read_bytes())
    assert np.array_equal(np.concatenate([tok.encode(p) for p in pieces]), whole)
    head, tail = TextFile(path).split_at(0.1)  # the held-out tail of a large file
    assert b"".join([*head.pieces(), *tail.pieces()]) == path.read_bytes() and 1800 < len(tail) < 2200


def test_pieces_of_text_without_spaces_split_between_characters(tmp_path, small_pieces):
    from data_modules.sources import TextFile

    path = tmp_path / "dense.txt"
    path.write_text("ü€𝄞x" * 500)  # 1- to 4-byte characters, no space or newline to cut at
    pieces = list(TextFile(path).pieces())
    assert len(pieces) > 3 and b"".join(pieces) == path.read_bytes()
    assert all(p.decode("utf-8") for p in pieces)  # no character split between two pieces


@pytest.mark.parametrize("align", [None, 32])
def test_a_large_file_packs_as_one_document(tmp_path, small_pieces, align):
    """Read in pieces, a large file gives the windows it gives read whole: one document index, no EOS inside,
    alignment padding only after it."""
    from data_modules.packing import pack_windows, tokenize
    from data_modules.sources import TextFile

    path = tmp_path / "big.txt"
    path.write_bytes(stdlib_text(5_000))
    tok = ByteTokenizer()

    def windows(docs):
        return list(pack_windows(tokenize(iter(docs), tok), 64, tok.eos_id, tok.pad_id, align))

    whole = windows([b"first doc", path.read_bytes(), b"last doc " * 30])
    pieced = windows([b"first doc", TextFile(path), b"last doc " * 30])
    assert len(whole) == len(pieced) > 70
    for a, b in zip(whole, pieced):
        for x, y in zip(a, b):
            assert np.array_equal(x, y)
    doc_index = np.concatenate([w[1][:-1] for w in pieced])
    assert sorted(set(doc_index.tolist())) == [0, 1, 2]


def test_resume_inside_a_large_document_continues_exactly(tmp_path, small_pieces):
    """Positions inside a document read in pieces count from its start: a resumed stream re-reads it and skips to
    the saved token."""
    (tmp_path / "big.txt").write_bytes(stdlib_text(6_000))
    for i in range(3):
        (tmp_path / f"small{i}.txt").write_text(f"small document {i} " * 20)
    cfg = DataConfig(paths=[str(tmp_path)], seq_len=32, batch_size=2, num_workers=0, val_fraction=0.05,
                     shuffle_buffer=2)

    def consume(dm, n):
        it = iter(dm.train_dataloader())
        return [dm.on_before_batch_transfer(next(it), 0)["input_ids"] for _ in range(n)]

    full = consume(TextDataModule(cfg), 40)
    for stop in (7, 23):
        interrupted = TextDataModule(cfg)
        consume(interrupted, stop)
        resumed = TextDataModule(cfg)
        resumed.load_state_dict(interrupted.state_dict())
        for a, b in zip(full[stop:], consume(resumed, 40 - stop)):
            assert torch.equal(a, b)


def test_held_out_tails_split_each_document_at_a_word_boundary():
    from data_modules.sources import held_out_tail

    doc = stdlib_text(10_000)
    head, tail = held_out_tail(doc, 0.1)
    assert head + tail == doc and 900 <= len(tail) <= 1100
    assert tail[:1].isspace() and not head[-1:].isspace()
    text = doc.decode()
    assert "".join(held_out_tail(text, 0.1)) == text


@pytest.mark.parametrize("layout", ["one file", "ten files"])
def test_a_few_text_files_train_and_validate(tmp_path, layout, caplog):
    """One file, or ten of them: whole held-out documents leave no validation window (one file is either all
    training or all validation), so every document gives its last val_fraction instead, said in one line."""
    data = tmp_path / "data"
    data.mkdir()
    text = stdlib_text(60_000)
    if layout == "one file":
        (data / "only.txt").write_bytes(text)
    else:
        for i in range(10):
            (data / f"part{i}.txt").write_bytes(text[i * 6000:(i + 1) * 6000])
    run = fit(tmp_path, "few", f"data.paths=[{data}]", "data.seq_len=128", "trainer.max_steps=2",
              "trainer.val_check_interval=2", "data.num_workers=0")
    assert scalars(run, "val/loss")
    assert "holding out the last 0.02 of every document instead" in caplog.text

    stream = DocumentStream(resolve_paths([str(data)]), "text", 0.02)
    stream.held_out = "tails"
    train, val = ({ref[0]: doc for _, ref, doc in stream.owned(split, 0, 0, 0, 1)} for split in ("train", "val"))
    assert sorted(train) == sorted(val) == list(range(len(stream.files)))
    for i, path in enumerate(stream.files):  # each file: training head + held-out tail, about 2% of it
        assert train[i] + val[i] == path.read_bytes() and 0 < len(val[i]) < 0.03 * len(train[i])


def test_too_little_text_to_validate_is_one_error_before_the_model(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "tiny.txt").write_text("print('hello')\n" * 4)
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), f"trainer.root_dir={tmp_path}",
            f"data.paths=[{data}]", "data.num_workers=0"]
    assert main(args) == 2
    err = capsys.readouterr()
    assert err.err.strip().splitlines()[-1].startswith("error: the validation split has fewer than seq_len + 1 = 257")
    assert "Params" not in err.out  # before the model summary
    assert not (tmp_path / "tiny").exists()


@pytest.mark.slow
def test_a_large_single_line_file_streams_in_bounded_memory(tmp_path):
    """A 64 MB single-line file: reading, tokenizing and packing add under 500 MB to the process's peak (it was
    about 250 times the file: 12.3 GB for 50 MB)."""
    path = tmp_path / "line.txt"
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon"]
    chunk = b" ".join(words[i % 5] for i in range(200_000)) + b" "
    with open(path, "wb") as f:
        for _ in range((64 << 20) // len(chunk)):
            f.write(chunk)
    code = (
        "import resource, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from types import SimpleNamespace\n"
        "from lit_hsa.config import DataConfig\n"
        "from data_modules.text import TextDataModule\n"
        f"cfg = DataConfig(paths=[{str(path)!r}], seq_len=4096, batch_size=4, num_workers=0)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "dm = TextDataModule(cfg)\n"
        "dm.validation_samples()\n"
        "it = iter(dm.train_dataloader())\n"
        "tokens = sum(next(it)['input_ids'].numel() for _ in range(200))\n"
        "print(tokens, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tokens, grown = map(int, proc.stdout.split())
    assert tokens == 200 * 4 * 4096 and grown < 500 << 20, grown
