"""Parallelism configured from the trainer config: activation checkpointing is exact; FSDP2 over 2 CPU processes
(gloo) trains, writes a sharded checkpoint, resumes from it and matches a single-process run."""
import copy
import subprocess
import sys

import pytest
import torch

from lit_hsa.model import HSATransformer
from lit_hsa.parallel import parallelize
from tests.test_cli import ROOT, scalars
from tests.test_model import VOCAB, tiny


def test_activation_checkpointing_is_exact():
    model = HSATransformer(tiny())
    wrapped = copy.deepcopy(model)
    parallelize(wrapped, activation_checkpointing=True, compile=False)
    x = torch.randint(0, VOCAB, (2, 40))
    for m in (model, wrapped):
        m(x).logsumexp(-1).mean().backward()
    torch.testing.assert_close(wrapped(x), model(x))
    for (name, p), q in zip(model.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    assert wrapped.state_dict().keys() == model.state_dict().keys()  # checkpoints stay interchangeable
    assert len(wrapped.hsa_blocks()) == 1


@pytest.fixture(scope="module")
def same_docs(tmp_path_factory):
    """Every document identical: each rank's shard then yields the same samples as a single process, so 2 ranks ×
    batch 1 compute the same gradient as 1 process × batch 1 and the losses must agree."""
    d = tmp_path_factory.mktemp("same")
    for i in range(8):
        (d / f"d{i}.txt").write_text("the same document text, repeated for every file. " * 20)
    return d


def fit_cli(root, name, docs, *extra):
    args = [sys.executable, "main.py", "fit", "--config", "configs/tiny.yaml", f"trainer.root_dir={root}",
            f"trainer.run_name={name}", f"data.paths=[{docs}]", "data.batch_size=1", "data.seq_len=64",
            "data.val_samples=2", "data.val_fraction=0.3", "data.num_workers=0", "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
            "trainer.checkpoint_every_n_steps=2", *extra]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sorted((root / name).glob("version_*"))[-1]


def test_fsdp_two_processes_match_single_process_and_resume(tmp_path, same_docs):
    single = scalars(fit_cli(tmp_path, "single", same_docs, "trainer.max_steps=4"), "train/loss")
    fsdp = ["trainer.strategy=fsdp", "trainer.devices=2"]
    first = fit_cli(tmp_path, "fsdp", same_docs, "trainer.max_steps=2", *fsdp)
    sharded = first / "checkpoints" / "last.ckpt"
    assert sharded.is_dir() and len(list(sharded.glob("*.distcp"))) == 2  # one shard per rank
    resumed = fit_cli(tmp_path, "resumed", same_docs, "trainer.max_steps=4", f"ckpt_path={sharded}", *fsdp)
    losses = {**scalars(first, "train/loss"), **scalars(resumed, "train/loss")}
    assert sorted(losses) == [0, 1, 2, 3]
    for step, loss in single.items():
        assert losses[step] == pytest.approx(loss, abs=1e-4), step

    out = tmp_path / "one.ckpt"
    proc = subprocess.run([sys.executable, "main.py", "consolidate", "--ckpt", str(sharded), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from lit_hsa.module import HSALitModule

    module = HSALitModule.load_from_checkpoint(out, map_location="cpu")  # strict: every weight and buffer present
    assert all(m.expert_bias.abs().sum() > 0 for m in module.model.moe_layers())  # trained balancing state came back
