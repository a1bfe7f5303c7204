"""Faults cluster jobs meet (``lit_hsa/training/faults.py``): pre-emption by SIGTERM / SIGUSR1 saves at a step
boundary, exits 143 and resumes to the uninterrupted run's losses and validations; checkpoint files survive
``kill -9`` during a save with ``$TMPDIR`` on another filesystem; a full disk is one line, exit 2, and no file under
a checkpoint's name that cannot be read."""
import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from lit_hsa.checkpoint_io import CheckpointWriteError, write_atomically
from lit_hsa.cli import main
from lit_hsa.training import faults
from lit_hsa.training.faults import AtomicCheckpointIO, Preemption, remove_stale_temporaries
from tests.helpers import FAST, ROOT, fit, run_dir, scalars

# Constant LR (a cosine schedule depends on max_steps); validation every 3 steps.
COMMON = ["trainer.val_check_interval=3", "trainer.checkpoint_every_n_steps=100", "optim.schedule=constant",
          "data.num_workers=0"]


@pytest.fixture
def signal_at_step(monkeypatch):
    """Sends this process ``signum`` while the optimizer step ``step`` (0-based) is being computed."""
    def arm(signum: int, step: int) -> None:
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == step and self.received is None:
                os.kill(os.getpid(), signum)
            real(self, trainer, pl_module, batch, batch_idx)

        real = Preemption.on_train_batch_start
        monkeypatch.setattr(Preemption, "on_train_batch_start", on_train_batch_start)

    return arm


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_at_the_step_boundary_exits_143_and_resumes_exactly(tmp_path, signal_at_step, signum, capsys):
    """The signal arrives during step 2 (0-based), whose end is a validation point (val_check_interval=3): the run
    saves last.ckpt at step 3, before that validation, and exits 143 naming the checkpoint; the resume validates at
    step 3 and continues, and train and validation losses equal an uninterrupted run's."""
    straight = fit(tmp_path, "straight", "trainer.max_steps=6", *COMMON)
    signal_at_step(signum, 2)
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), f"trainer.root_dir={tmp_path}",
            "trainer.run_name=stopped", "trainer.max_steps=6", *FAST, *COMMON]
    assert main(args) == 143
    err = capsys.readouterr().err
    last = run_dir(tmp_path, "stopped") / "checkpoints" / "last.ckpt"
    assert f"stopped by {signal.Signals(signum).name} at step 3: saved {last}" in err
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
    assert sorted(scalars(last.parents[1], "train/loss")) == [0, 1, 2]
    with pytest.raises(KeyError):  # stopped before step 3's validation
        scalars(last.parents[1], "val/loss")

    resumed = fit(tmp_path, "stopped", "trainer.max_steps=6", *COMMON, f"ckpt_path={last}")
    assert resumed == last.parents[1]  # the same version folder
    expected, got = scalars(straight, "train/loss"), scalars(resumed, "train/loss")
    assert sorted(got) == list(range(6))
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], abs=1e-5), step
    expected_val, got_val = scalars(straight, "val/loss"), scalars(resumed, "val/loss")
    assert sorted(got_val) == sorted(expected_val) and len(expected_val) == 2  # after steps 3 and 6: none lost
    for step, loss in got_val.items():
        assert loss == pytest.approx(expected_val[step], abs=1e-5), step


@pytest.mark.slow
def test_sigterm_from_outside_through_the_command_line(tmp_path):
    """A real SIGTERM from another process (as SLURM or Kubernetes send it) to ``python main.py fit``: exit code
    143, a loadable last.ckpt at the step the message names."""
    args = [sys.executable, "main.py", "fit", "--config", "configs/tiny.yaml", f"trainer.root_dir={tmp_path}",
            "trainer.max_steps=100000", *FAST, *COMMON, "trainer.val_check_interval=100000"]
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list(tmp_path.glob("tiny/version_0/events.*")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # into the training steps
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-2000:]
    line = [x for x in err.splitlines() if "stopped by SIGTERM" in x][-1]
    step = int(line.split("at step ")[1].split(":")[0])
    last = tmp_path / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert step > 0 and torch.load(last, map_location="cpu", weights_only=True)["global_step"] == step


def test_fit_writes_checkpoints_through_the_atomic_writer(tmp_path):
    from lit_hsa.config import load_config
    from lit_hsa.training.run import build_run

    cfg = load_config([str(ROOT / "configs/tiny.yaml")], [f"trainer.root_dir={tmp_path}", *FAST])
    _, _, trainer = build_run(cfg)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, Preemption) for c in trainer.callbacks)


KILL_LOOP = """
import sys, torch
sys.path.insert(0, {root!r})
from pathlib import Path
from lit_hsa.checkpoint_io import write_atomically
state = {{"state_dict": {{"w": torch.randn(4_000_000)}}, "global_step": 0}}  # 16 MB
print("ready", flush=True)
step = 0
while True:
    step += 1
    state["global_step"] = step
    write_atomically(state, Path({path!r}))
"""


@pytest.mark.slow
def test_kill_9_during_saves_never_leaves_an_unreadable_checkpoint(tmp_path, tmp_path_factory):
    """A loop of saves killed with SIGKILL at random moments, ``$TMPDIR`` on another folder (a tmpfs /tmp in the
    report): every kill leaves a last.ckpt that loads, and the temporary file a kill leaves is removed at the next
    start. (Lightning's writer, staging under $TMPDIR, left it truncated in 7 of 10 aimed kills.)"""
    path = tmp_path / "run" / "last.ckpt"
    env = {**os.environ, "TMPDIR": str(tmp_path_factory.mktemp("elsewhere"))}
    rng = random.Random(0)
    steps = []
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", KILL_LOOP.format(root=str(ROOT), path=str(path))], env=env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.3, 2.0))
        proc.kill()
        proc.wait()
        checkpoint = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
        if checkpoint is not None:
            assert checkpoint["state_dict"]["w"].numel() == 4_000_000
            steps.append(checkpoint["global_step"])
        leftovers = remove_stale_temporaries(path.parent)
        assert not list(path.parent.glob(".*tmp*")) and len(leftovers) <= 1
    assert steps and all(s >= 1 for s in steps)
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.ckpt.tmp-{int(dead.stdout)}"
    live = tmp_path / f".last.ckpt.tmp-{os.getpid()}"
    for f in (stale, live):
        f.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and live.exists()


def failing_save(after_bytes: int):
    """torch.save that writes ``after_bytes`` bytes, then fails as a full disk does."""
    def save(obj, f, *args, **kwargs):
        f.write(b"x" * after_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_full_disk_keeps_the_previous_checkpoint_and_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    write_atomically({"global_step": 1}, path)
    monkeypatch.setattr(torch, "save", failing_save(1000))
    with pytest.raises(CheckpointWriteError, match="no space left .* the previous checkpoint is unchanged"):
        write_atomically({"global_step": 2}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_full_disk_during_fit_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """The second save of a run fails as on a full disk: exit code 2, one line naming the checkpoint, and every
    file left under checkpoints/ loads."""
    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        return failing_save(5000)(obj, f) if calls["n"] >= 2 else real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), f"trainer.root_dir={tmp_path}", *FAST,
            "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", "trainer.val_check_interval=100"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write checkpoint") and "no space left" in err[-1]
    files = list((run_dir(tmp_path, "tiny") / "checkpoints").iterdir())
    assert [f.name for f in files] == ["last.ckpt"]
    assert torch.load(files[0], map_location="cpu", weights_only=True)["global_step"] == 2


def test_a_second_fit_into_a_run_folder_in_use_is_refused(tmp_path, capsys):
    """Two resumes of one checkpoint at once wrote into one version folder; the second is now refused with one line
    naming the holder, and runs once the folder is free. A lock a killed run left (no holder) does not block."""
    first = fit(tmp_path, "tiny", "trainer.max_steps=2")
    last = first / "checkpoints" / "last.ckpt"
    resume = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), f"trainer.root_dir={tmp_path}", *FAST,
              "trainer.max_steps=3", f"ckpt_path={last}"]
    with faults.RunFolderLock(first):
        assert main(resume) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"run folder '{first}' is in use by process {os.getpid()}" in err[0]
    (first / ".lock").write_text("process 1 on a machine that died")  # the file alone holds no lock
    assert main(resume) == 0
    assert not (first / ".lock").exists() and max(scalars(first, "train/loss")) == 2


def test_a_resume_with_more_steps_keeps_the_learning_rate_horizon(tmp_path, caplog):
    """A cosine schedule planned over 4 steps, resumed with max_steps=8: the learning rate does not jump back up;
    it stays at optim.min_lr after step 4, and the resume says so in one line; no last-v1.ckpt appears."""
    run = fit(tmp_path, "tiny", "trainer.max_steps=4", "optim.schedule=cosine", "optim.lr=3e-3", "optim.min_lr=3e-4")
    with caplog.at_level("INFO"):
        fit(tmp_path, "tiny", "trainer.max_steps=8", "optim.schedule=cosine", "optim.lr=3e-3", "optim.min_lr=3e-4",
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert ("resuming at step 4 with trainer.max_steps=8: the learning-rate schedule keeps the 4 steps it was planned "
            "over (cosine to optim.min_lr=0.0003 at step 4, then constant)") in caplog.text
    lr = scalars(run, "lr-AdamW/pg1")
    assert lr[1] == pytest.approx(3e-3) and lr[3] > 3e-4  # warm-up of 2 steps, then the cosine
    for step in range(4, 8):
        assert lr[step] == pytest.approx(3e-4, rel=1e-6), step
    assert sorted(p.name for p in (run / "checkpoints").glob("last*")) == ["last.ckpt"]


@pytest.mark.slow
def test_a_real_full_disk(tmp_path):
    """trainer.root_dir on a 24 MB tmpfs (room for one checkpoint of the tiny model, not two): exit 2 with one
    error line, and the checkpoint under its name loads. Needs the right to mount (root); skipped otherwise."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        args = [sys.executable, "main.py", "fit", "--config", "configs/tiny.yaml", f"trainer.root_dir={disk}",
                "trainer.checkpoint_every_n_steps=1", "data.batch_size=2", "data.seq_len=128", "trainer.max_steps=10",
                "trainer.val_check_interval=5", "trainer.enable_progress_bar=false", "data.num_workers=0"]
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert len(errors) == 1 and "no space left on its filesystem" in errors[0]
        for f in (disk / "tiny" / "version_0" / "checkpoints").iterdir():
            assert torch.load(f, map_location="cpu", weights_only=True)["global_step"] >= 1, f
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
