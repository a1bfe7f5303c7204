"""FSDP2 on a CUDA GPU through the whole command, as a cluster job runs it: ``main.py fit trainer.strategy=fsdp
trainer.devices=1`` for a dense and a MoE model under bf16-mixed with activation checkpointing, eager and compiled;
the first steps' losses equal ``strategy=auto``'s; the sharded checkpoint resumes and ``consolidate`` turns it into
one file that loads. (FSDP over several ranks is checked on CPU with gloo in ``test_parallel.py``.)"""
import subprocess
import sys

import pytest
import torch

from lit_hsa.training.module import HSALitModule
from tests.helpers import ROOT, scalars

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

STEPS = 4
# bf16-mixed: the same math in both strategies, but FSDP's reduce-scatter and the compiled kernels order sums
# differently; losses around 5.5 agree to about 1e-3 on an H100/H200.
LOSS_ATOL = 2e-2


def fit(root, name, *extra) -> "Path":  # noqa: F821
    args = [sys.executable, "main.py", "fit", "--config", "configs/tiny.yaml", f"trainer.root_dir={root}",
            f"trainer.run_name={name}", "trainer.precision=bf16-mixed", "trainer.activation_checkpointing=true",
            "data.seq_len=512", "data.batch_size=4", "data.val_samples=2", "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", f"trainer.val_check_interval={STEPS}",
            f"trainer.checkpoint_every_n_steps={STEPS}", "optim.warmup_steps=2", *extra]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return sorted((root / name).glob("version_*"))[-1]


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    """strategy=auto, eager: the losses of the first steps for the dense and the MoE model."""
    root = tmp_path_factory.mktemp("auto")
    return {moe: scalars(fit(root, f"auto-{moe}", f"model.moe={moe}", f"trainer.max_steps={STEPS}"), "train/loss")
            for moe in ("false", "true")}


@pytest.mark.parametrize("compile", ["false", "true"])
@pytest.mark.parametrize("moe", ["false", "true"])
def test_fsdp_fit_matches_auto_then_resumes_and_consolidates(tmp_path, reference_losses, moe, compile):
    fsdp = ["trainer.strategy=fsdp", "trainer.devices=1", f"model.moe={moe}", f"trainer.compile={compile}"]
    run = fit(tmp_path, "fsdp", *fsdp, f"trainer.max_steps={STEPS}")
    losses = scalars(run, "train/loss")
    expected = reference_losses[moe]
    assert sorted(losses) == sorted(expected) == list(range(STEPS))
    for step, loss in expected.items():
        assert abs(losses[step] - loss) <= LOSS_ATOL, (step, losses[step], loss)

    sharded = run / "checkpoints" / "last.ckpt"
    assert sharded.is_dir()
    resumed = fit(tmp_path, "fsdp", *fsdp, f"trainer.max_steps={STEPS + 2}", f"ckpt_path={sharded}")
    assert resumed == run  # a resume continues in its own version folder
    assert sorted(scalars(resumed, "train/loss")) == list(range(STEPS + 2))

    out = tmp_path / "consolidated.ckpt"
    proc = subprocess.run([sys.executable, "main.py", "consolidate", "--ckpt", str(sharded), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    module = HSALitModule.load_from_checkpoint(out, map_location="cpu")  # strict: every weight and buffer
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert bool(module.model.moe_layers()) == (moe == "true")
