"""What cluster jobs meet every day: being killed, pre-empted, or running out of disk.

- ``AtomicCheckpointIO``: a checkpoint file is written next to its final name, flushed, fsynced, then renamed over
  the old one (and the folder fsynced): a kill at any moment leaves the previous checkpoint or the new one, never a
  truncated file under a checkpoint's name. Lightning's own writer stages the file under ``$TMPDIR`` and moves it
  into place, a copy over the old file when ``$TMPDIR`` is another filesystem (tmpfs ``/tmp``, runs on NFS), so a
  kill during that copy ruined ``last.ckpt``. Temporary files a kill leaves are removed at the next start
  (``remove_stale_temporaries``). A full disk is one ``CheckpointWriteError``.
- ``Preemption``: SIGTERM (how SLURM and Kubernetes stop or pre-empt a job) and SIGUSR1 (what SLURM sends ahead of a
  time limit with ``--signal=USR1@90``) save ``last.ckpt`` at the next optimizer-step boundary and stop the run
  with ``Preempted``, which ``main.py`` turns into exit code 143; ``ckpt_path=…/last.ckpt`` resumes it, validation
  of that step included.
"""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_hsa.checkpoint_io import TEMPORARY_MARK, write_atomically
from lit_hsa.config import ConfigError


class Preempted(Exception):
    """The run stopped on SIGTERM / SIGUSR1 after saving ``path`` at optimizer step ``step``."""

    def __init__(self, signal_name: str, step: int, path: str):
        super().__init__(f"stopped by {signal_name} at step {step}: saved {path}; resume with ckpt_path={path}")
        self.signal_name, self.step, self.path = signal_name, step, path


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary checkpoint files in ``folder`` whose writer (the pid in the name) is no longer running
    on this machine: what a kill during a save leaves. Returns them."""
    removed = []
    for candidate in Path(folder).glob(f".*{TEMPORARY_MARK}*"):
        pid = candidate.name.rpartition(TEMPORARY_MARK)[2]
        if pid.isdigit() and not process_alive(int(pid)):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer for single-file checkpoints, saving through ``write_atomically``."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        write_atomically(checkpoint, Path(path))


class RunFolderLock:
    """One writer per run folder: an exclusive ``flock`` on ``<folder>/.lock`` for the life of a ``fit`` (released by
    the kernel however the process ends, ``kill -9`` included); a second ``fit`` into the folder (two resumes of one
    checkpoint at once) is refused with one line naming the holder. Where ``fcntl`` does not exist (Windows) nothing
    is locked."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self._file = None

    def __enter__(self) -> "RunFolderLock":
        try:
            import fcntl
        except ImportError:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by another process
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ConfigError(f"run folder '{self.path.parent}' is in use by {holder}: one run writes a folder at a "
                              "time; wait for it, or give this run another trainer.run_name") from None
        except OSError:  # a filesystem without locks (some network mounts): run unlocked, as before
            f.close()
            return self
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self.path.unlink(missing_ok=True)
            self._file = None


class Preemption(L.Callback):
    """On SIGTERM or SIGUSR1: at the next optimizer-step boundary, save ``<checkpoint_dir>/last.ckpt`` (where and
    when Lightning's periodic checkpoints are saved, so the resume is the one they get) and stop with ``Preempted``
    as soon as the step's metrics are logged, before any validation of that step (the resume runs it). A validation
    under way when the signal comes finishes first. Every rank stops at the same step: the flag is all-reduced at
    each boundary (a signal may reach some ranks first)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, checkpoint_dir: Path):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.received: str | None = None
        self.stopping: Preempted | None = None
        self.validate_on_resume = False  # saved with the checkpoint
        self._previous: dict = {}

    def state_dict(self) -> dict:
        return {"validate_on_resume": self.validate_on_resume}

    def load_state_dict(self, state_dict: dict) -> None:
        self.validate_on_resume = bool(state_dict.get("validate_on_resume", False))

    def on_train_start(self, trainer, pl_module) -> None:
        # Replaces Lightning's SIGTERM handler (registered just before this hook), which makes the loops raise
        # SIGTERMException, a SystemExit with code 0, without saving.
        for signum in self.SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)
        if self.validate_on_resume:  # the stopped run saved at a step whose validation it did not run
            self.validate_on_resume = False
            trainer.validating = True
            trainer.fit_loop.epoch_loop.val_loop.run()
            trainer.training = True

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stopping is None and not trainer.fit_loop._should_accumulate() and self._signalled(trainer):
            path = self.checkpoint_dir / "last.ckpt"
            # Lightning validates after this hook, and a resume from here starts with the next batch: say so
            self.validate_on_resume = trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
            trainer.save_checkpoint(path, weights_only=False)
            self.validate_on_resume = False
            self.stopping = Preempted(self.received or "a signal to another rank", trainer.global_step, str(path))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stop()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.stopping is not None:
            raise self.stopping

    def _signalled(self, trainer) -> bool:
        received = self.received is not None
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            flag = torch.tensor(float(received), device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            received = bool(flag.item())
        return received
