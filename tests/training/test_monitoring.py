import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_hsa.cli import main
from lit_hsa.config import ModelConfig, OptimConfig
from lit_hsa.training.callbacks import retrieval_stats, selection_heatmap
from lit_hsa.training.flops import mean_keys_causal, mean_keys_hsa, training_flops_per_token
from lit_hsa.training.module import HSALitModule
from tests.helpers import FAST, ROOT, VOCAB, scalars, tiny


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


def test_logged_flops_follow_topk_and_window_schedules():
    """The FLOPs behind train/device/flops_per_sec and MFU, after a schedule changes top-k or the SWA window,
    against a count written here from the definitions: each query of an HSA block reads min(topk, t // S) chunks
    of S keys, each query of an SWA block min(t + 1, W) keys, each key 12 · heads · head_dim FLOPs (QKᵀ and PV,
    forward + backward). A cache keyed on the sequence length alone kept the first values for the whole run."""
    cfg = tiny(hsa_topk=4, swa_window=16)
    module = HSALitModule(cfg, OptimConfig())
    B, T, S = 2, 128, cfg.chunk_size
    batch = {"input_ids": torch.randint(0, VOCAB, (B, T)), "labels": torch.randint(0, VOCAB, (B, T))}

    def flops() -> float:
        module.training_step(batch, 0)
        return module.flops_per_batch

    def hsa_keys(topk):  # summed over the batch's tokens
        return B * sum(min(topk, t // S) * S for t in range(T))

    def swa_keys(window):
        return B * sum(min(t + 1, window) for t in range(T))

    per_key_hsa = 12 * cfg.hsa_q_heads * cfg.head_dim * cfg.n_groups
    n_swa_blocks = cfg.n_lower_layers + cfg.n_groups * cfg.swa_layers_per_group
    per_key_swa = 12 * cfg.n_heads * cfg.head_dim * n_swa_blocks
    start = flops()
    module.model.set_hsa_topk(1)
    after_topk = flops()
    assert start - after_topk == pytest.approx(per_key_hsa * (hsa_keys(4) - hsa_keys(1)), rel=1e-9)
    module.model.set_swa_window(4)
    after_window = flops()
    assert after_topk - after_window == pytest.approx(per_key_swa * (swa_keys(16) - swa_keys(4)), rel=1e-9)
    module.model.set_hsa_topk(4)
    module.model.set_swa_window(16)
    assert flops() == start  # back to the first schedule values: the first count again


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
        objective, loss = real(self, batch)
        if self.training:
            calls["train"] += 1
            if calls["train"] % 100 == 2:
                return objective * float("nan"), loss * float("nan")
        return objective, loss

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
    for tag in ("retrieval/block0_far_share", "train/device/flops_per_sec", "grad_norm/retrieval", "hsa/o_proj_rms"):
        assert scalars(run, tag), tag
    nan_on_step_one["reset"]()
    assert main([*args, "trainer.nan_policy=stop", "trainer.run_name=stop"]) == 3
    assert "non-finite training loss (nan) at step 1" in capsys.readouterr().err


def test_hsa_learning_stats_follow_a_converted_model_opening():
    """grad_norm/<part> are the 2-norms of the gradients of the parameters each part's names cover, brute force over
    the parameter list here. In a dense model converted to HSA (output projections at zero) the retrieval and chunk
    memory get no gradient at all until the projection opens: the stats show exactly that."""
    from lit_hsa.interop.to_hsa import dense_to_hsa
    from lit_hsa.model.transformer import HSATransformer
    from lit_hsa.training.callbacks import hsa_learning_stats

    torch.manual_seed(0)
    dense_cfg = tiny(attention="full", n_lower_layers=6, n_groups=0, swa_layers_per_group=0, moe=False)
    cfg, state = dense_to_hsa(dense_cfg, HSATransformer(dense_cfg).state_dict(), swa_window=8, chunk_size=8)
    model = HSATransformer(cfg)
    model.load_state_dict(state)
    x = torch.randint(0, VOCAB, (2, 40))

    def stats_after_backward() -> dict[str, float]:
        model.zero_grad()
        model(x[:, :-1], labels=x[:, 1:]).backward()
        return {k: float(v) for k, v in hsa_learning_stats(model.named_parameters()).items()}

    def brute(keep) -> float:
        return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for n, p in model.named_parameters()
                             if keep(n) and p.grad is not None))

    shut = stats_after_backward()
    assert shut["grad_norm/retrieval"] == 0 and shut["grad_norm/chunk_memory"] == 0 and shut["hsa/o_proj_rms"] == 0
    assert shut["grad_norm/hsa_attention"] > 0  # the zero projection's own gradient
    with torch.no_grad():
        for block in model.hsa_blocks():
            block.o_proj.weight.normal_(0, 0.02)
    opened = stats_after_backward()
    retrieval = lambda n: ".retrieval." in n or n.startswith("memory.landmark")  # noqa: E731
    memory = lambda n: n.startswith("memory.") and not retrieval(n)  # noqa: E731
    hsa_own = lambda n: n.split(".")[0] == "upper" and n.split(".")[2] in ("q_proj", "q_norm", "hsa_norm", "o_proj")  # noqa: E501,E731
    for key, keep in (("retrieval", retrieval), ("chunk_memory", memory), ("hsa_attention", hsa_own)):
        assert opened[f"grad_norm/{key}"] == pytest.approx(brute(keep), rel=1e-5) and opened[f"grad_norm/{key}"] > 0
    weights = torch.cat([b.o_proj.weight.detach().flatten() for b in model.hsa_blocks()])
    assert opened["hsa/o_proj_rms"] == pytest.approx(float(weights.pow(2).mean().sqrt()), rel=1e-5)
    assert "hsa/gate" not in opened
    gated = HSATransformer(tiny(hsa_gate=True))
    with torch.no_grad():
        gated.hsa_blocks()[0].gate.fill_(0.25)
    assert float(hsa_learning_stats(gated.named_parameters())["hsa/gate"]) == pytest.approx(0.25)


def test_hsa_learning_stats_are_written_at_their_own_steps(tmp_path):
    """Every retrieval_stats_every steps, whatever log_every_n_steps is: a value logged off the logging steps is
    neither dropped nor written later under another step (where it would be stale)."""
    from tests.helpers import fit

    for accumulate in (1, 2):  # with accumulation: once per optimizer step, from the batch that completed it
        run = fit(tmp_path, f"stats{accumulate}", "trainer.max_steps=5", "trainer.retrieval_stats_every=2",
                  "data.seq_len=256", "trainer.log_every_n_steps=3", f"trainer.accumulate_grad_batches={accumulate}")
        for tag in ("grad_norm/retrieval", "grad_norm/chunk_memory", "grad_norm/hsa_attention", "hsa/o_proj_rms",
                    "retrieval/block0_distance_mean"):
            events = EventAccumulator(str(run)).Reload().Scalars(tag)
            assert [e.step for e in events] == [0, 2, 4] and all(e.value > 0 for e in events), (tag, events)


def test_scheduled_value():
    from lit_hsa.training.callbacks import scheduled_value

    schedule = [[0, 16], [5, 4]]
    assert [scheduled_value(schedule, s) for s in (0, 4, 5, 9)] == [16, 16, 4, 4]
    assert scheduled_value([[3, 2]], 1) is None


def test_schedules_and_in_training_eval_reach_tensorboard(tmp_path):
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), f"trainer.root_dir={tmp_path}", *FAST,
            "trainer.run_name=sched", "trainer.max_steps=4", "trainer.topk_schedule=[[0,8],[2,2]]",
            "trainer.swa_window_schedule=[[0,32],[3,64]]", "trainer.eval_every_n_steps=2",
            "trainer.eval_lengths=[300]", "trainer.eval_tasks=[niah_single]", "trainer.eval_samples=1"]
    assert main(args) == 0
    run = sorted((tmp_path / "sched").glob("version_*"))[-1]
    assert scalars(run, "schedule/hsa_topk") == {0: 8.0, 1: 8.0, 2: 2.0, 3: 2.0}
    assert scalars(run, "schedule/swa_window")[3] == 64.0
    accuracy = scalars(run, "eval/niah_single_300")
    assert accuracy and all(0.0 <= a <= 1.0 for a in accuracy.values())


def test_set_swa_window_changes_the_attention_reach():
    from lit_hsa.model.transformer import HSATransformer

    model = HSATransformer(tiny(attention="swa", n_lower_layers=1, n_groups=1, swa_layers_per_group=0)).eval()
    x = torch.randint(0, VOCAB, (1, 40))
    y = x.clone()
    y[:, 2] = (y[:, 2] + 1) % VOCAB
    assert torch.allclose(model(x)[:, 30:], model(y)[:, 30:])  # window 8, two blocks: reach < 16
    model.set_swa_window(64)
    assert not torch.allclose(model(x)[:, 30:], model(y)[:, 30:])


def test_mfu_on_gpus_lightning_does_not_know():
    """Lightning's FLOPs table has no 'NVIDIA H200' (its H200 SXM1 entry is the sparse rate): the monitor takes
    NVIDIA's dense peak (989.4 TFLOP/s bf16, as the H100 SXM: same compute), so MFU = FLOP/s / peak is logged."""
    from lightning.fabric.utilities.throughput import Throughput

    from lit_hsa.training.callbacks import MFUThroughputMonitor, dense_peak_flops

    assert dense_peak_flops("NVIDIA H200", "bf16-mixed") == 989.4e12
    assert dense_peak_flops("NVIDIA H200 NVL", "bf16-true") == 835e12
    assert dense_peak_flops("NVIDIA H200", "32-true") in (67e12, 494.7e12)  # fp32, or TF32 tensor cores
    assert dense_peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") is None  # Lightning's own table serves it
    monitor = MFUThroughputMonitor(batch_size_fn=lambda b: 1)
    monitor._throughputs = {"train": Throughput(window_size=2)}
    monitor.use_peak_flops(989.4e12)
    throughput = monitor._throughputs["train"]
    for step in (1, 2, 3):
        throughput.update(time=float(step), batches=step, samples=step, flops=989.4e12 / 2)
    assert throughput.compute()["device/mfu"] == pytest.approx(0.5)


@pytest.mark.parametrize("rich", [True, False])
def test_progress_bar_counts_the_runs_batches_without_an_epoch_total(monkeypatch, rich):
    """Runs are counted in steps (max_epochs=-1): Rich's bar printed "Epoch 0/-2", and a resumed run "40/10" (the
    run's batches over the current loader's). Ours: the run's batch index out of max_steps × accumulation."""
    from types import SimpleNamespace

    import lightning.pytorch.utilities.imports as imports

    from lit_hsa.training.callbacks import progress_bar

    if rich and not imports._RICH_AVAILABLE:
        pytest.skip("rich is not installed")
    monkeypatch.setattr(imports, "_RICH_AVAILABLE", rich)
    bar = progress_bar()
    seen = []
    monkeypatch.setattr(type(bar).__mro__[2], "on_train_batch_end",
                        lambda self, trainer, pl_module, outputs, batch, batch_idx: seen.append(batch_idx))
    epoch_loop = SimpleNamespace(total_batch_idx=35)
    trainer = SimpleNamespace(max_epochs=-1, max_steps=20, accumulate_grad_batches=2, num_training_batches=10,
                              global_step=17, fit_loop=SimpleNamespace(epoch_loop=epoch_loop))
    bar._trainer = trainer
    assert bar.total_train_batches == 40
    bar.on_train_batch_end(trainer, None, None, None, 5)  # batch 5 of a resumed loader, the run's 36th
    assert seen == [35]
    if rich:
        assert bar._get_train_description(0).strip() == "Epoch 0"
