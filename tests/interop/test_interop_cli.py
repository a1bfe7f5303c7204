"""`main.py convert` and `main.py export` as a user runs them: a Hugging Face folder in, a checkpoint that
`generate` and `fit` (with the shipped recipe) read; a lit-hsa checkpoint out and back bit-exactly; bad input one line
with exit code 2."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from lit_hsa.checkpoint_io import load_checkpoint_file, load_model  # noqa: E402
from lit_hsa.cli import main  # noqa: E402
from tests.helpers import FAST, ROOT, run_dir, tiny  # noqa: E402
from tests.interop.test_hf_export import random_model, write_ckpt  # noqa: E402
from tests.interop.test_hf_import import save_hf  # noqa: E402


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3")
    hf = save_hf(folder, "Qwen3Config", dict(head_dim=16, num_hidden_layers=4))
    return folder, hf


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_convert_full_then_generate(qwen3_dir, tmp_path, capsys):
    folder, hf = qwen3_dir
    out = tmp_path / "qwen3.ckpt"
    assert main(["convert", "--hf", str(folder), "--out", str(out)]) == 0
    assert "qwen3 → full: 4 blocks" in capsys.readouterr().out
    model, tokenizer = load_model(str(out), "cpu")
    x = torch.randint(0, 280, (1, 24))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() < 1e-4
    assert main(["generate", "--ckpt", str(out), "--prompt", "the quick", "--max-new-tokens", "4"]) == 0


@pytest.mark.slow
def test_convert_to_hsa_then_continue_with_the_recipe(qwen3_dir, tmp_path):
    folder, hf = qwen3_dir
    out = tmp_path / "converted" / "model.ckpt"
    assert (
        main(
            [
                "convert",
                "--hf",
                str(folder),
                "--out",
                str(out),
                "--to",
                "hsa",
                "model.swa_window=32",
                "model.chunk_size=16",
                "model.hsa_topk=2",
            ]
        )
        == 0
    )
    model, _ = load_model(str(out), "cpu")
    assert (model.cfg.attention, model.cfg.n_lower_layers, model.cfg.n_groups) == ("hsa", 2, 1)
    x = torch.randint(0, 280, (1, 32))
    with torch.no_grad():  # within the window the converted model is the dense one
        assert (model(x) - hf(x).logits).abs().max() < 1e-4
    assert (
        main(
            [
                "fit",
                "--config",
                str(out.with_suffix(".yaml")),
                "--config",
                str(ROOT / "configs/convert/hsa_from_dense.yaml"),
                f"trainer.root_dir={tmp_path}",
                *FAST,
                "data.seq_len=512",
                "data.batch_size=1",
                "data.num_workers=0",
                "trainer.max_steps=2",
                "trainer.precision=32-true",
                "trainer.accumulate_grad_batches=1",
                "trainer.topk_schedule=[[0,32],[1,2]]",
                "trainer.val_check_interval=2",
            ]
        )
        == 0
    )
    config = (run_dir(tmp_path, "hsa-from-dense") / "config.yaml").read_text()
    assert "name: qwen3-hsa" in config and "model.tokenizer.json" in config


@pytest.mark.parametrize("args", [["--hsa-out-std", "0.01"], ["model.hsa_gate=true"]])
def test_convert_to_hsa_with_another_output_start(args, qwen3_dir, tmp_path):
    """--hsa-out-std: the HSA output projections drawn from N(0, std²); model.hsa_gate: random behind a zero gate."""
    out = tmp_path / "model.ckpt"
    assert main(["convert", "--hf", str(qwen3_dir[0]), "--out", str(out), "--to", "hsa", "model.swa_window=32",
                 "model.chunk_size=16", *args]) == 0
    model, _ = load_model(str(out), "cpu")
    block = model.hsa_blocks()[0]
    if "--hsa-out-std" in args:
        assert block.gate is None and 0.008 < float(block.o_proj.weight.std()) < 0.012
    else:
        assert block.gate.tolist() == [0.0] and float(block.o_proj.weight.std()) > 0.01


def test_export_and_convert_back_is_bit_exact(tmp_path, capsys):
    model = random_model(tiny(vocab_size=320))
    ckpt = write_ckpt(tmp_path / "m.ckpt", model)
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "lit_hsa"
    assert main(["convert", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back.ckpt")]) == 0
    back = load_checkpoint_file(tmp_path / "back.ckpt")
    assert back["hyper_parameters"]["model"] == load_checkpoint_file(ckpt)["hyper_parameters"]["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(back["state_dict"][f"model.{k}"], v), k


@pytest.mark.parametrize(
    "args, message",
    [
        (["convert", "--hf", "{tmp}/nowhere", "--out", "{tmp}/o.ckpt"], "nowhere"),
        (["convert", "--hf", "{tmp}/empty", "--out", "{tmp}/o.ckpt"], "has no config.json or .gguf file"),
        (["convert", "--hf", "{tmp}/gpt2", "--out", "{tmp}/o.ckpt"], "gpt2"),
        (["convert", "--hf", "{tmp}/broken", "--out", "{tmp}/o.ckpt"], "is not readable JSON"),
        (["convert", "--hf", "{qwen3}", "--out", "{tmp}/o.ckpt", "model.swa_window=8"], "apply with --to hsa"),
        (["convert", "--hf", "{qwen3}", "--out", "{tmp}/o.ckpt", "--hsa-out-std", "0.01"], "apply with --to hsa"),
        (
            ["convert", "--hf", "{qwen3}", "--out", "{tmp}/o.ckpt", "--to", "hsa", "--hsa-out-std", "0.01",
             "model.hsa_gate=true"],
            "zero gate",
        ),
        (
            ["convert", "--hf", "{qwen3}", "--out", "{tmp}/o.ckpt", "--to", "hsa", "trainer.max_steps=3"],
            "model.* overrides only",
        ),
        (
            ["convert", "--hf", "{qwen3}", "--out", "{tmp}/o.ckpt", "--to", "hsa", "model.swa_windw=8"],
            "unknown config key 'model.swa_windw'",
        ),
        (
            ["convert", "--hf", "{qwen3}", "--out", "{tmp}/o.ckpt", "--to", "hsa", "model.n_groups=3"],
            "must equal the dense model's 4 layers",
        ),
        (["export", "--ckpt", "{tmp}/missing.ckpt", "--out", "{tmp}/hf"], "does not exist"),
        (["convert", "--hf", "{tmp}/two_gguf", "--out", "{tmp}/o.ckpt"], "holds 2 .gguf files (a.gguf, b.gguf)"),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(args, message, qwen3_dir, tmp_path, capsys):
    (tmp_path / "two_gguf").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two_gguf" / name).write_bytes(b"GGUF")
    (tmp_path / "empty").mkdir()
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "llama",')
    argv = [a.format(tmp=tmp_path, qwen3=qwen3_dir[0]) for a in args]
    assert main(argv) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "o.ckpt").exists()


def test_a_gguf_folder_needs_the_gguf_package_and_a_readable_file(tmp_path, monkeypatch, capsys):
    """A folder of one .gguf: without the gguf package, one line saying what to install; a file that is not GGUF,
    one line naming it; nothing written either way (the temporary HF folder removed too)."""
    import sys
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.gguf").write_bytes(b"not a gguf file")
    argv = ["convert", "--hf", str(tmp_path / "m"), "--out", str(tmp_path / "o.ckpt")]
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "gguf", None)  # import gguf → ImportError
        assert main(argv) == 2
        assert "pip install gguf" in error_line(capsys)
    if importlib.util.find_spec("gguf") is not None:
        assert main(argv) == 2
        assert "model.gguf' could not be read as a GGUF model" in error_line(capsys)
    assert not (tmp_path / "o.ckpt").exists() and not list((tmp_path / "tmp").iterdir())


def test_a_converted_folder_can_be_moved(qwen3_dir, tmp_path, capsys):
    """The .yaml that convert writes names its checkpoint and tokenizer relative to itself (${config_dir:}), and a
    checkpoint finds its tokenizer beside it: the folder works after a move (it held absolute paths)."""
    import shutil

    from lit_hsa.config import load_config

    folder, _ = qwen3_dir
    out = tmp_path / "made" / "model.ckpt"
    assert main(["convert", "--hf", str(folder), "--out", str(out)]) == 0
    text = out.with_suffix(".yaml").read_text()
    assert str(tmp_path) not in text and "${config_dir:}/model.ckpt" in text
    moved = tmp_path / "elsewhere"
    shutil.move(str(out.parent), moved)
    cfg = load_config([str(moved / "model.yaml")], [])
    assert cfg.init_from == str(moved.resolve() / "model.ckpt")
    assert cfg.data.tokenizer == str(moved.resolve() / "model.tokenizer.json")
    capsys.readouterr()
    assert (
        main(["generate", "--ckpt", str(moved / "model.ckpt"), "--prompt", "the quick", "--max-new-tokens", "2"]) == 0
    )
