"""Context-length curriculum (trainer.seq_len_schedule): validation, batch shapes by step at constant tokens per
step, an unbroken token stream across a shape change, and exact resume across a stage boundary."""
from types import SimpleNamespace

import pytest
import torch

from data_modules.text import TextDataModule
from lit_hsa.config import ConfigError, DataConfig, load_config
from tests.helpers import fit, scalars


@pytest.mark.parametrize("schedule, needle", [
    ("[[0,48]]", "seq_len 48 must be a multiple of model.chunk_size (32)"),
    ("[[0,512]]", "seq_len 512 must divide the tokens per step (data.batch_size × data.seq_len = 256)"),
    ("[[4,32],[2,64]]", "trainer.seq_len_schedule steps must be increasing"),
    ("[[4]]", "trainer.seq_len_schedule must be [[step, value], ...]"),
])
def test_schedule_errors_name_the_key(schedule, needle):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["data.seq_len=128", "data.batch_size=2", f"trainer.seq_len_schedule={schedule}"])
    assert needle in str(error.value)


def batches_by_step(dm: TextDataModule, steps: int) -> list[torch.Tensor]:
    """input_ids of steps 0..steps-1, building a new loader whenever one ends and handing each batch to the
    DataModule as it is consumed (what Lightning does)."""
    dm.trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=1, global_rank=0, world_size=1)
    out = []
    while len(out) < steps:
        for batch in dm.train_dataloader():
            out.append(dm.on_before_batch_transfer(batch, 0)["input_ids"])
            dm.trainer.global_step += 1
            if len(out) == steps:
                break
    return out


def shard_streams(batches: list[torch.Tensor], n_workers: int) -> list[torch.Tensor]:
    """Each worker shard's tokens in order: batch b comes from shard b % n_workers; rows are consecutive windows."""
    return [torch.cat([row for b in batches[w::n_workers] for row in b]) for w in range(n_workers)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shape_changes_by_step_and_the_token_stream_continues(corpus, num_workers):
    cfg = DataConfig(paths=[str(corpus)], seq_len=64, batch_size=2, num_workers=num_workers, val_fraction=0.1,
                     shuffle_buffer=4)
    switched = batches_by_step(TextDataModule(cfg, seq_len_schedule=[[3, 32], [5, 128]]), 8)
    assert [tuple(b.shape) for b in switched] == [(2, 64)] * 3 + [(4, 32)] * 2 + [(1, 128)] * 3
    plain = batches_by_step(TextDataModule(cfg), 8)
    for got, expected in zip(shard_streams(switched, max(1, num_workers)), shard_streams(plain, max(1, num_workers))):
        assert torch.equal(got, expected)  # same tokens in the same order: nothing repeated or skipped


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("curriculum")
    return root, fit(root, "straight", "trainer.max_steps=6", *CURRICULUM)


CURRICULUM = ["trainer.seq_len_schedule=[[3,32]]", "data.num_workers=2", "trainer.val_check_interval=100",
              "trainer.checkpoint_every_n_steps=1", "optim.schedule=constant"]


@pytest.mark.parametrize("stop", [3, 4])  # exactly at the stage boundary, and one step into the new stage
def test_resume_across_the_stage_boundary_gives_the_same_losses(straight_run, stop):
    root, straight = straight_run
    first = fit(root, f"first{stop}", f"trainer.max_steps={stop}", *CURRICULUM)
    resumed = fit(root, f"resumed{stop}", "trainer.max_steps=6", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
                  *CURRICULUM)
    expected, got = scalars(straight, "train/loss"), scalars(resumed, "train/loss")
    assert sorted(got) == list(range(stop, 6))
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], abs=1e-5), step
    assert scalars(straight, "train/seq_len") == {s: 64.0 if s < 3 else 32.0 for s in range(6)}
    assert scalars(resumed, "train/batch_size") == {s: 4.0 for s in range(stop, 6)}
