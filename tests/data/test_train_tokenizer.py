"""The BPE tokenizer trainer (data_modules/train_tokenizer.py) and the tokenizer it shipped
(configs/tokenizers/stdlib-bpe-8k.json): special ids where the data pipeline expects them, exact round trips, and
subword compression on text it never saw (the embedded corpus's held-out split)."""
from data_modules.text import build_document_streams
from data_modules.tokenizers import build_tokenizer
from data_modules.train_tokenizer import main, train_bpe
from lit_hsa.config import DataConfig
from tests.helpers import ROOT

SHIPPED = ROOT / "configs/tokenizers/stdlib-bpe-8k.json"
ODD_TEXT = "tabs\tand  spaces\n\n ünïcödé 漢字 🙂\r\nend"


def held_out_documents(n: int) -> list[str]:
    docs = []
    for doc in build_document_streams(DataConfig())[0][0].documents("val", 0, 0, 0, 1):
        docs.append(doc if isinstance(doc, str) else doc.decode("utf-8", errors="replace"))
        if len(docs) == n:
            return docs
    return docs


def test_trained_tokenizer_round_trips_and_names_its_special_tokens(tmp_path):
    texts = ["def add(a, b):\n    return a + b\n"] * 50 + ["class Point:\n    x: int\n"] * 50
    path = tmp_path / "tok.json"
    train_bpe(texts, vocab_size=300).save(str(path))
    tok = build_tokenizer(str(path))
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    for text in (ODD_TEXT, texts[0]):
        assert tok.decode(tok.encode(text)) == text  # byte-level: nothing is unknown
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 2  # merges learned from the texts


def test_shipped_tokenizer_compresses_held_out_text(tmp_path):
    tok = build_tokenizer(str(SHIPPED))
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (8192, 0, 1)
    docs = held_out_documents(20)
    chars = sum(len(d) for d in docs)
    tokens = sum(len(tok.encode(d)) for d in docs)
    assert all(tok.decode(tok.encode(d)) == d for d in docs + [ODD_TEXT])
    assert chars / tokens > 3.0  # measured 3.6 characters per token (bytes: 1.0)


def test_command_writes_a_tokenizer(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: the quick brown fox jumps over the lazy dog\n" * 20)
    config = tmp_path / "data.yaml"
    config.write_text(f"data:\n  paths: [{corpus}]\n")
    main(["--out", str(tmp_path / "tok.json"), "--vocab-size", "280", "--config", str(config)])
    tok = build_tokenizer(str(tmp_path / "tok.json"))
    assert tok.vocab_size == 280
    assert len(tok.encode("the quick brown fox")) < 10
