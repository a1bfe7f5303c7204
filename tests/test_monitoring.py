import pytest
import torch

from lit_hsa.callbacks import retrieval_stats, selection_heatmap
from lit_hsa.cli import main
from lit_hsa.config import ModelConfig
from lit_hsa.flops import mean_keys_causal, mean_keys_hsa, training_flops_per_token
from lit_hsa.module import HSALitModule
from tests.test_cli import FAST, ROOT, scalars


def test_attention_key_counts():
    assert mean_keys_causal(4, None) == 2.5 and mean_keys_causal(4, 2) == 1.75
    assert mean_keys_hsa(8, chunk=2, topk=2) == 2.5  # visible chunks 0,0,1,1,2,2,3,3 capped at 2, × 2 keys


def test_sparse_attention_flops_grow_linearly():
    cfg = ModelConfig.from_name("small")
    hsa = [training_flops_per_token(cfg, 130_000_000, T) for T in (16384, 65536)]
    full = [training_flops_per_token(ModelConfig.from_name("small", attention="full"), 130_000_000, T)
            for T in (16384, 65536)]
    assert hsa[1] / hsa[0] < 1.1  # per-token cost ~constant: window and top-k bound the keys
    assert full[1] / full[0] > 2.0  # full attention's per-token cost grows with T


def test_retrieval_stats_and_heatmap():
    S = 4
    idx = torch.full((1, 16, 1, 2), -1)
    idx[0, 8:, 0, 0] = 0  # tokens of chunks 2-3 pick chunk 0 (distance 2-3 chunks)
    idx[0, 12:, 0, 1] = 2
    w = torch.zeros(1, 16, 1, 2)
    w[0, 8:12, 0, 0] = 1.0
    w[0, 12:, 0] = 0.5
    stats = retrieval_stats(w, idx, S, window=8)
    assert stats["distance_mean"] == pytest.approx((4 * 2 + 4 * 3 + 4 * 1) / 12)
    assert stats["far_share"] == pytest.approx(4 / 12)  # only distance-3 picks lie beyond 8 tokens
    assert stats["empty_share"] == pytest.approx(20 / 32)
    assert stats["fusion_entropy"] == pytest.approx(torch.log(torch.tensor(2.0)).item() / 2)
    img = selection_heatmap(idx[0], S)
    assert img.shape == (1, 4, 4) and img[0, 3, 0] == 1 and img[0, 2, 0] == 1 and img[0, 1].sum() == 0


@pytest.fixture
def nan_on_step_one(monkeypatch):
    real = HSALitModule._lm_loss
    calls = {"train": 0}

    def lm_loss(self, batch):  # the second training batch of each run gives a NaN loss
        loss = real(self, batch)
        if self.training:
            calls["train"] += 1
            if calls["train"] % 100 == 2:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(HSALitModule, "_lm_loss", lm_loss)
    calls["reset"] = lambda: calls.update(train=0)
    return calls


def test_nan_policy_skip_and_stop(tmp_path, nan_on_step_one, capsys):
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), f"trainer.root_dir={tmp_path}", *FAST,
            "trainer.max_steps=3", "trainer.retrieval_stats_every=1"]
    assert main([*args, "trainer.nan_policy=skip", "trainer.run_name=skip"]) == 0
    run = sorted((tmp_path / "skip").glob("version_*"))[-1]
    assert max(scalars(run, "train/skipped_nonfinite").values()) == 1
    assert len(scalars(run, "train/loss")) == 3  # the bad batch was skipped, three good steps were taken
    assert scalars(run, "retrieval/block0_far_share") and scalars(run, "train/device/flops_per_sec")
    nan_on_step_one["reset"]()
    assert main([*args, "trainer.nan_policy=stop", "trainer.run_name=stop"]) == 3
    assert "non-finite training loss (nan) at step 1" in capsys.readouterr().err
