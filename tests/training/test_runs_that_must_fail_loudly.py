"""Hardening (issue 27): runs that must fail loudly instead of reporting success (a diverged model under either
``trainer.nan_policy``, binary data files), the shipped fine-tuning configs as shipped, and first-run friction on
CPU (no Triton, thread oversubscription, library notices)."""
import copy
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_hsa.cli import main
from lit_hsa.config import ConfigError, ModelConfig, OptimConfig, load_config
from lit_hsa.training.module import HSALitModule
from tests.helpers import FAST, ROOT, run_dir, scalars

# CPU-sized overrides of configs/tiny.yaml.
SMALL = ["data.seq_len=64", "data.batch_size=2", "data.num_workers=0", "data.val_samples=2",
         "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python main.py ARGS`` from the repository root, as a user types it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The run's one-line error: the last stderr line, the only one saying 'error:', no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], proc.stderr[-3000:]
    return lines[-1]


# --- non-finite guard -----------------------------------------------------------------------------------------


def absurd_lr_run(tmp_path: Path, policy: str) -> subprocess.CompletedProcess:
    """lr=1e6: the loss stays finite (≈ ln vocab) while the gradient norm is NaN from the second step on."""
    return cli("fit", "--config", "configs/tiny.yaml", *SMALL, f"trainer.root_dir={tmp_path}",
               f"trainer.run_name={policy}", "trainer.max_steps=20", "trainer.val_check_interval=100",
               "optim.lr=1e6", f"trainer.nan_policy={policy}")


@pytest.mark.slow
def test_absurd_lr_under_skip_stops_after_consecutive_skips_counted_truthfully(tmp_path):
    proc = absurd_lr_run(tmp_path, "skip")
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = error_line(proc)
    assert line.startswith("error: 5 optimizer steps in a row skipped for a non-finite loss or gradient norm")
    assert "trainer.max_consecutive_nonfinite=5" in line
    run = run_dir(tmp_path, "skip")
    skipped = scalars(run, "train/skipped_nonfinite")
    grad_norm = scalars(run, "train/grad_norm")
    # Every step whose gradient norm was NaN is counted, at its own step; the last count reaches the logger too.
    bad = sorted(step for step, value in grad_norm.items() if value != value)
    assert bad and max(skipped.values()) == 5 == len(bad) + 1  # the fifth skip stops the run before its own log
    assert all(skipped[step] == bad.index(step) + 1 for step in bad)
    assert not list(run.glob("checkpoints/*.ckpt"))  # nothing of the dead model is kept as a result


@pytest.mark.slow
def test_absurd_lr_under_stop_names_the_step(tmp_path):
    proc = absurd_lr_run(tmp_path, "stop")
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = error_line(proc)
    assert line.startswith("error: non-finite gradient norm (nan) at step ")
    assert line.endswith("lower optim.lr or set trainer.nan_policy=skip")


def test_max_consecutive_nonfinite_is_validated():
    with pytest.raises(ConfigError, match="trainer.max_consecutive_nonfinite must be >= 1, got 0"):
        load_config(str(ROOT / "configs/tiny.yaml"), ["trainer.max_consecutive_nonfinite=0"])


class NaNGradientOnce(L.Callback):
    """Poisons one gradient entry of batch ``at`` and records weights and optimizer state around that batch."""

    def __init__(self, at: int):
        self.at, self.batch_idx, self.before, self.after, self.weights = at, -1, None, None, []

    def snapshot(self, trainer, module) -> dict:
        return {"params": {k: v.detach().clone() for k, v in module.state_dict().items()},
                "optim": copy.deepcopy(trainer.optimizers[0].state_dict()["state"])}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batch_idx = batch_idx
        if batch_idx == self.at:
            self.before = self.snapshot(trainer, module)

    def on_after_backward(self, trainer, module):
        if self.batch_idx == self.at:
            next(p for p in module.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            self.after = self.snapshot(trainer, module)
        self.weights.append(module.model.embed.weight.detach().clone())


def test_one_nan_gradient_step_under_skip_changes_nothing_and_training_goes_on():
    torch.manual_seed(0)
    module = HSALitModule(ModelConfig.from_name("tiny", vocab_size=320), OptimConfig(lr=1e-2, warmup_steps=0),
                          max_steps=5, nan_policy="skip", max_consecutive_nonfinite=2)
    tokens = torch.randint(0, 320, (10, 65))
    batches = [{"input_ids": t[:-1], "labels": t[1:]} for t in tokens]
    spy = NaNGradientOnce(at=2)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        callbacks=[spy])
    trainer.fit(module, DataLoader(batches, batch_size=2))
    assert trainer.global_step == 5 and module.nonfinite_steps == 1
    before, after = spy.before, spy.after
    assert all(torch.equal(before["params"][k], after["params"][k]) for k in before["params"])  # MoE biases too
    assert before["optim"].keys() == after["optim"].keys()
    for i, state in before["optim"].items():  # AdamW moments and step counts untouched, no NaN in them
        assert all(torch.equal(v, after["optim"][i][k]) for k, v in state.items())
    assert not torch.equal(spy.weights[2], spy.weights[3])  # the next step trains again
    assert all(torch.isfinite(p).all() for p in module.parameters())


# --- binary data files ----------------------------------------------------------------------------------------


def text_and_binary_folder(root: Path, n_text: int, n_binary: int) -> Path:
    """``n_text`` stdlib source files and ``n_binary`` random-byte files (one of them an 'image')."""
    folder = root / "corpus"
    folder.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["argparse.py", "ast.py", "csv.py", "dataclasses.py", "difflib.py", "enum.py"][:n_text]:
        shutil.copy(stdlib / name, folder / f"{name}.txt")
    gen = torch.Generator().manual_seed(0)
    for i in range(n_binary):
        data = torch.randint(0, 256, (20_000,), generator=gen, dtype=torch.uint8).numpy().tobytes()
        (folder / (f"blob{i}.bin" if i else "photo.png")).write_bytes(data)
    return folder


def test_a_folder_of_binary_files_is_one_error_naming_a_file(tmp_path, capsys):
    folder = text_and_binary_folder(tmp_path, 0, 2)
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), *SMALL, f"data.paths=[{folder}]"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: '{folder / 'blob1.bin'}' looks binary (it contains NUL bytes); text files must be UTF-8 "
                   "text: remove it, or set data.skip_bad_records=true to skip such files")
    assert main([*args, "data.skip_bad_records=true"]) == 2  # skipped, and then nothing is left
    assert capsys.readouterr().err.strip().startswith("error: data.paths: every file looks binary (")


def test_binary_files_among_text_are_skipped_and_counted(tmp_path, caplog, capsys):
    folder = text_and_binary_folder(tmp_path, 6, 2)
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), *SMALL, f"data.paths=[{folder}]",
            f"trainer.root_dir={tmp_path}", "trainer.max_steps=2", "data.val_fraction=0.3"]
    assert main(args) == 2 and "blob1.bin' looks binary" in capsys.readouterr().err
    assert main([*args, "data.skip_bad_records=true"]) == 0
    skipped = [r.getMessage() for r in caplog.records if "binary" in r.getMessage()]
    assert skipped == [f"skipped 2 binary files (data.skip_bad_records): {folder / 'blob1.bin'}, "
                       f"{folder / 'photo.png'}"]


def test_the_embedded_corpus_keeps_every_file():
    from data_modules.sources import binary_reason, stdlib_files
    from data_modules.text import build_document_streams

    cfg = load_config(str(ROOT / "configs/tiny.yaml"))
    (stream,), _ = build_document_streams(cfg.data)
    files = stdlib_files()
    assert stream.files == files and len(files) > 1000
    # Not sniffed at all (known text), and no stdlib file has NUL bytes; the few the UTF-8 share would flag are test
    # modules in legacy encodings on purpose (latin-1, koi8-r).
    flagged = [f for f in files if binary_reason(f.read_bytes()[:8192])]
    assert all("NUL" not in binary_reason(f.read_bytes()[:8192]) for f in flagged) and len(flagged) < 10


def test_binary_reason():
    from data_modules.sources import binary_reason

    text = "naïve café — ünïcödé text ".encode() * 300
    assert binary_reason(text) is None
    assert binary_reason(text[:8191]) is None  # a character cut at the end of the sample is not binary
    assert binary_reason("replacement � characters are text".encode()) is None
    assert binary_reason(b"PK\x03\x04\x00\x00") == "it contains NUL bytes"
    assert "not UTF-8" in binary_reason("é".encode("latin-1") * 50 + b"abc" * 100)


# --- the shipped fine-tuning configs --------------------------------------------------------------------------


def test_shipped_finetune_example_fills_its_validation_split_at_the_shipped_seq_len():
    from data_modules.packing import validation_windows
    from data_modules.text import TextDataModule

    for name in ("lora", "full"):
        # init_from: any existing file passes validation; only the data section is used here
        cfg = load_config(str(ROOT / f"configs/finetune/{name}.yaml"), [f"init_from={ROOT / 'README.md'}"])
        assert cfg.data.seq_len == 8192
        datamodule = TextDataModule(cfg.data, cfg.model.chunk_size)
        windows = validation_windows(datamodule.sources, datamodule.tokenizer, cfg.data.seq_len,
                                     cfg.data.val_samples, cfg.data.document_masking, datamodule.align)
        assert len(windows) >= 2


@pytest.mark.slow
def test_shipped_finetune_configs_run_as_shipped(tmp_path):
    """README: the default run's checkpoint → lora.yaml / full.yaml on examples/sft → merge. Overrides only make it
    CPU-sized (and make model.* describe the tiny checkpoint); data paths and validation settings are as shipped."""
    base = cli("fit", "--config", "configs/tiny.yaml", *SMALL, f"trainer.root_dir={tmp_path}", "trainer.max_steps=2",
               "trainer.val_check_interval=100")
    assert base.returncode == 0, base.stderr[-3000:]
    ckpt = run_dir(tmp_path, "tiny") / "checkpoints" / "last.ckpt"
    speed = ["model.name=tiny", "data.seq_len=256", "data.num_workers=0", "trainer.accumulate_grad_batches=1",
             "trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
             f"trainer.root_dir={tmp_path}"]
    for name in ("lora", "full"):
        proc = cli("fit", "--config", f"configs/finetune/{name}.yaml", f"init_from={ckpt}", *speed)
        assert proc.returncode == 0, proc.stderr[-3000:]
    lora = run_dir(tmp_path, "finetune-lora") / "checkpoints" / "last.ckpt"
    assert (run_dir(tmp_path, "finetune-full") / "checkpoints" / "last.ckpt").is_file()
    merged = tmp_path / "merged.ckpt"
    proc = cli("merge", "--ckpt", str(lora), "--out", str(merged))
    assert proc.returncode == 0 and merged.is_file(), proc.stderr[-3000:]
    config = (run_dir(tmp_path, "finetune-lora") / "config.yaml").read_text()
    assert "- examples/sft" in config and "val_fraction: 0.1" in config


# --- first run on CPU -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_models_import_train_and_generate_without_triton():
    """Triton is no base dependency: everything outside the Triton kernel files imports and runs without it."""
    code = """
import sys
sys.modules["triton"] = None  # as on a machine without triton: `import triton` raises ImportError
import torch
import data_modules.text, lit_hsa.kernels.decode, lit_hsa.kernels.hsa  # noqa: F401
import lit_hsa.cli, lit_hsa.training.module  # noqa: F401
from lit_hsa.config import ModelConfig
from lit_hsa.inference.generate import generate
from lit_hsa.model.transformer import HSATransformer
model = HSATransformer(ModelConfig.from_name("tiny", vocab_size=320))
x = torch.randint(0, 320, (2, 129))
model(x[:, :-1], labels=x[:, 1:]).backward()
assert generate(model.eval(), x[:1, :64], 4).shape == (1, 68)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_triton_is_a_test_dependency_only():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("triton") for dep in project["dependencies"])
    assert any(dep.startswith("triton") for dep in project["optional-dependencies"]["test"])


def test_training_threads_leave_the_workers_their_cores(monkeypatch):
    from data_modules import text

    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: cores)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    text.share_cores_with_workers(0)
    text.share_cores_with_workers(1)
    assert calls == ([max(1, cores - 1)] if cores > 1 else [])
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))  # the user's choice stands
    text.share_cores_with_workers(1)
    assert len(calls) == (1 if cores > 1 else 0)


@pytest.mark.slow
def test_runs_print_no_library_adverts_or_deprecations(tmp_path):
    proc = cli("fit", "--config", "configs/tiny.yaml", *SMALL, f"trainer.root_dir={tmp_path}", "trainer.max_steps=2",
               "trainer.val_check_interval=100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "Tip:" not in out and "litlogger" not in out and "LeafSpec" not in out
    assert "GPU available" in out  # Lightning's own information stays


@pytest.mark.parametrize("flag, value, needle", [
    ("--temperature", "-0.5", "--temperature must be >= 0 (0: greedy), got -0.5"),
    ("--top-p", "0", "--top-p must be in (0, 1], got 0.0"),
    ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
    ("--max-new-tokens", "-1", "--max-new-tokens must be >= 0, got -1"),
])
def test_generate_refuses_sampling_options_out_of_range(tmp_path, capsys, flag, value, needle):
    ckpt = tmp_path / "any.ckpt"  # refused before the checkpoint is read
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "x", flag, value]) == 2
    assert capsys.readouterr().err.strip() == f"error: {needle}"


@pytest.mark.parametrize("command", ["merge", "consolidate", "convert"])
def test_commands_writing_out_refuse_an_existing_out_without_overwrite(tmp_path, capsys, command):
    """merge, consolidate and convert replaced an existing --out silently (export refused): all refuse now, and
    --overwrite passes that check (and fails later here, on the missing input)."""
    out = tmp_path / "exists.ckpt"
    out.write_bytes(b"keep me")
    source = ["--hf", str(tmp_path / "no-model")] if command == "convert" else ["--ckpt", str(tmp_path / "none")]
    assert main([command, *source, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out '{out}' exists: pass --overwrite to replace it"
    assert out.read_bytes() == b"keep me"
    assert main([command, *source, "--out", str(out), "--overwrite"]) == 2
    assert "exists: pass --overwrite" not in capsys.readouterr().err


def test_validate_without_a_checkpoint_is_refused(tmp_path, capsys):
    """validate with no ckpt_path validated a randomly initialised model and exited 0."""
    args = ["validate", "--config", str(ROOT / "configs/tiny.yaml"), f"trainer.root_dir={tmp_path}", *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: validate needs the checkpoint to validate: ckpt_path=")
    assert not (tmp_path / "tiny").exists()


def test_a_finished_fit_says_where_its_checkpoints_are(tmp_path, capsys):
    assert main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), f"trainer.root_dir={tmp_path}", *FAST,
                 "trainer.max_steps=2", "trainer.val_check_interval=2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    folder = tmp_path / "tiny" / "version_0" / "checkpoints"
    best = next(folder.glob("step*.ckpt"))
    assert out[-1].startswith(f"checkpoints: last {folder / 'last.ckpt'}; best by val/loss (")
    assert out[-1].endswith(str(best))
