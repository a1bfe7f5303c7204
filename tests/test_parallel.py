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


def test_compiled_checkpointed_blocks_match_eager_without_hitting_the_recompile_limit():
    """trainer.compile with activation checkpointing: same loss and gradients as eager, at two lengths, and no unit
    falls back to eager because dynamo ran out of recompiles (all checkpoint wrappers share one forward). The
    aot_eager backend captures the same graphs as inductor without generating C++ (seconds instead of minutes)."""
    dynamo = pytest.importorskip("torch._dynamo")
    model = HSATransformer(tiny(moe=False))
    compiled = copy.deepcopy(model)
    parallelize(compiled, activation_checkpointing=True, compile=True, compile_backend="aot_eager")
    # A unit may compile for a few shapes and argument lists; a low limit makes sharing one forward among every
    # kind of unit (what compiling the checkpoint wrappers did) fail here instead of silently running eager.
    limit = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"
    patch = {limit: 4}
    if hasattr(dynamo.config, "fail_on_recompile_limit_hit"):
        patch["fail_on_recompile_limit_hit"] = True
    with dynamo.config.patch(**patch):
        for T in (64, 96):
            x = torch.randint(0, VOCAB, (1, T + 1), generator=torch.Generator().manual_seed(T))
            losses = [m(x[:, :-1], labels=x[:, 1:]) for m in (model, compiled)]
            for loss in losses:
                loss.backward()
            torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
            for (name, p), q in zip(model.named_parameters(), compiled.parameters()):
                torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
                p.grad = q.grad = None
