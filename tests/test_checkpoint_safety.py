"""Issue 27 (hardening): no checkpoint a user names runs code; bad checkpoints and inputs are one line with exit code
2, not tracebacks; a resumed run continues in its own version folder and `validate` makes no training version."""
import pathlib
import subprocess
import sys

import pytest
import torch

from data_modules.sources import DataError
from lit_hsa.checkpoint_io import load_checkpoint_file
from lit_hsa.cli import main
from lit_hsa.config import ConfigError
from tests.helpers import FAST, ROOT, scalars

TINY = ["--config", str(ROOT / "configs/tiny.yaml"), *FAST, "data.num_workers=0", "trainer.val_check_interval=100"]
UNSAFE = "holds objects other than tensors and plain data: refusing to unpickle it (weights_only)"
UNREADABLE = "is not a readable checkpoint (truncated or not a PyTorch file)"


class TouchOnLoad:
    """Unpickling this calls ``pathlib.Path.touch(marker)``: what a crafted checkpoint could do (any code)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> pathlib.Path:
    """A real tiny checkpoint (2 steps)."""
    root = tmp_path_factory.mktemp("base")
    assert main(["fit", *TINY, f"trainer.root_dir={root}", "trainer.run_name=base", "trainer.max_steps=2"]) == 0
    return root / "base" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def truncated(ckpt, tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("bad") / "truncated.ckpt"
    data = ckpt.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # e.g. a copy cut short or a save killed midway
    return path


def main_py(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def one_line_error(args: list[str] | subprocess.CompletedProcess) -> str:
    """``main.py args`` (run in a fresh process, or its result): exit code 2 and exactly one stderr line, returned."""
    proc = main_py(args) if isinstance(args, list) else args
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def reading_commands(path, tmp_path) -> dict[str, list[str]]:
    """Every command line that reads a checkpoint file the user names, reading ``path``."""
    fit = ["fit", *TINY, f"trainer.root_dir={tmp_path}", "trainer.max_steps=1"]
    return {
        "init_from": [*fit, f"init_from={path}"],
        "ckpt_path": [*fit, f"ckpt_path={path}"],
        "lora_base": [*fit, "finetune.method=lora", f"init_from={path}"],
        "validate": ["validate", *TINY, f"trainer.root_dir={tmp_path}", f"ckpt_path={path}"],
        "generate": ["generate", "--ckpt", str(path), "--prompt", "x", "--max-new-tokens", "1", "--device", "cpu"],
        "eval": ["eval", "--ckpt", str(path), "--device", "cpu", "--tasks", "niah_single", "--lengths", "1k",
                 "--samples", "1", "--out", str(tmp_path / "eval")],
        "export": ["export", "--ckpt", str(path), "--out", str(tmp_path / "hf")],
        "merge": ["merge", "--ckpt", str(path), "--out", str(tmp_path / "merged.ckpt")],
        "experiment": ["experiment", "--config", "configs/experiments/length_generalization.yaml", "--models",
                       "swa", "--eval-only", f"out_dir={tmp_path}", "train.data.num_workers=0"],
    }


NO_OUTPUT = ("tiny", "eval", "hf", "merged.ckpt")  # what the commands above would have written


@pytest.mark.parametrize("command", ["init_from", "ckpt_path", "lora_base", "validate", "generate", "eval", "export",
                                     "merge", "experiment"])
@pytest.mark.slow
def test_a_crafted_checkpoint_runs_no_code(command, ckpt, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / ("swa.weights.pt" if command == "experiment" else "evil.ckpt")
    checkpoint = torch.load(ckpt, weights_only=True)  # a genuine checkpoint with one extra entry
    checkpoint["payload"] = TouchOnLoad(marker)
    checkpoint["lora_base"] = {"path": str(ckpt), "fingerprint": "0"}  # what `merge` looks for
    checkpoint.update(model_config={}, train={})  # what `experiment --eval-only` looks for
    torch.save(checkpoint, evil)
    proc = main_py(reading_commands(evil, tmp_path)[command])
    assert not marker.exists()  # nothing of the pickle ran
    assert one_line_error(proc) == f"error: checkpoint '{evil}' {UNSAFE}"
    assert not any((tmp_path / name).exists() for name in NO_OUTPUT)  # refused before any output


@pytest.mark.parametrize("command", ["init_from", "ckpt_path", "lora_base", "validate", "generate", "eval", "export",
                                     "merge"])
@pytest.mark.slow
def test_a_truncated_checkpoint_is_one_line(command, truncated, tmp_path):
    assert one_line_error(reading_commands(truncated, tmp_path)[command]) == (
        f"error: checkpoint '{truncated}' {UNREADABLE}")
    assert not any((tmp_path / name).exists() for name in NO_OUTPUT)  # no run folder or output for a refused run


@pytest.mark.parametrize("case", ["empty prompt", "eval length too short", "eval length 0", "run folder"])
@pytest.mark.slow
def test_bad_inputs_are_one_line(case, ckpt, tmp_path):
    evaluate = ["eval", "--ckpt", str(ckpt), "--device", "cpu", "--tasks", "niah_single", "--samples", "1",
                "--out", str(tmp_path / "eval")]
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder cannot be made under a file (like /proc/x: refused by the OS)
    args, expected = {
        "empty prompt": (["generate", "--ckpt", str(ckpt), "--device", "cpu", "--prompt", ""],
                         "--prompt is empty: give at least one character"),
        "eval length too short": ([*evaluate, "--lengths", "64"], "--lengths: 64 tokens cannot hold task "
                                  "'niah_single': its needles, question and answer take 123 tokens"),
        "eval length 0": ([*evaluate, "--lengths", "0"],
                          "--lengths must be >= 64 tokens, got 0"),
        "run folder": (["fit", *TINY, f"trainer.root_dir={blocker / 'runs'}"],
                       f"cannot create the run directory '{blocker / 'runs' / 'tiny' / 'version_0'}': Not a directory"),
    }[case]
    assert one_line_error(args) == f"error: {expected}"
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: tiny\n  hsa_topk: [1, 2\ndata:\n  seq_len: 64\n")
    assert one_line_error(["fit", "--config", str(bad)]) == (
        f"error: config file '{bad}' is not valid YAML: line 4, column 5: did not find expected ',' or ']' "
        "(while parsing a flow sequence at line 3, column 13)")


def test_checkpoint_loader_accepts_our_files_and_names_bad_ones(ckpt, tmp_path):
    assert set(load_checkpoint_file(ckpt)) >= {"state_dict", "hyper_parameters", "optimizer_states"}
    for name, content in (("empty.ckpt", b""), ("text.ckpt", b"hello\n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match=f"^checkpoint '{tmp_path / name}' is not a readable checkpoint"):
            load_checkpoint_file(tmp_path / name)
    torch.save(torch.ones(2), tmp_path / "tensor.pt")
    with pytest.raises(ConfigError, match="holds a Tensor, not a checkpoint's dict"):
        load_checkpoint_file(tmp_path / "tensor.pt")
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint_file(tmp_path / "missing.ckpt")


def test_resume_continues_in_its_own_version_and_validate_makes_none(tmp_path):
    common = [*TINY, f"trainer.root_dir={tmp_path}", "trainer.run_name=r", "trainer.checkpoint_every_n_steps=2"]
    assert main(["fit", *common, "trainer.max_steps=2"]) == 0
    last = tmp_path / "r" / "version_0" / "checkpoints" / "last.ckpt"
    assert main(["fit", *common, "trainer.max_steps=4", f"ckpt_path={last}"]) == 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["version_0"]
    assert sorted(scalars(tmp_path / "r" / "version_0", "train/loss")) == [0, 1, 2, 3]  # both runs' steps
    assert torch.load(last, weights_only=True)["global_step"] == 4  # the resumed run's checkpoints, same place
    assert main(["validate", *common, f"ckpt_path={last}"]) == 0
    assert main(["validate", *common, f"init_from={last}"]) == 0  # weights only, no run of its own: logged apart
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["validate", "version_0"]
    assert scalars(tmp_path / "r" / "version_0" / "validate", "val/loss")
    assert scalars(tmp_path / "r" / "validate" / "version_0", "val/loss")


def test_a_run_failing_before_its_first_batch_leaves_no_version_folder(tmp_path, monkeypatch, capsys):
    from data_modules.text import TextDataModule

    def broken(self):
        raise DataError("no training data")

    monkeypatch.setattr(TextDataModule, "train_dataloader", broken)
    assert main(["fit", *TINY, f"trainer.root_dir={tmp_path}", "trainer.run_name=r", "trainer.max_steps=2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: no training data"
    assert list((tmp_path / "r").iterdir()) == []


class SystemOnLoad:
    def __reduce__(self):
        import os

        return os.system, ("true",)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_checkpoint_calling_a_blocked_module_is_reported_as_refused(tmp_path, legacy):
    """torch words the refusal of a global from a module it blocks (os / posix) differently from other globals
    ("...whose module posix is blocked"): it is a refusal all the same, not a truncated file."""
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": SystemOnLoad()}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(ConfigError) as refused:
        load_checkpoint_file(path)
    assert UNSAFE in str(refused.value)
