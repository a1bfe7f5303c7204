"""`main.py experiment` (issue 7) end to end at tiny shapes, the answer-weighted loss it trains with, and the
blocked sliding-window attention that keeps long prefill segments linear."""
import json

import pytest
import torch

from data_modules.packing import PackedStream
from data_modules.sources import DataError
from data_modules.tokenizers import build_tokenizer
from lit_hsa.cli import main
from lit_hsa.config import ConfigError, DataConfig
from lit_hsa.experiment import load_experiment
from lit_hsa.model.attention import AttentionMask, attend, sliding_window_blocks
from lit_hsa.model.loss import IGNORE_INDEX, chunked_cross_entropy
from tests.helpers import load_benchmark, saved_plots

EXPERIMENT = "configs/experiments/length_generalization.yaml"
# The shipped recipe shrunk to seconds on a CPU: same sections, tiny model, 3 steps, two short eval lengths.
TINY = ["train.data.seq_len=512", "train.data.batch_size=2", "train.data.num_workers=0", "train.trainer.max_steps=3",
        "train.trainer.eval_every_n_steps=0", "train.trainer.val_check_interval=3", "train.trainer.limit_val_batches=1",
        "train.trainer.precision=32-true", "train.model.d_model=64", "train.model.n_heads=2",
        "train.model.n_kv_heads=1", "train.model.head_dim=32", "train.model.hsa_heads=2",
        "train.model.retrieval_dim=64", "train.model.ffn_hidden=128", "eval.lengths=[512,1024]",
        "eval.depths=[0.5]", "eval.tasks=[niah_single]", "eval.max_length.full=512"]


@pytest.mark.slow
def test_experiment_trains_every_model_and_summarizes(tmp_path, capsys, monkeypatch):
    from lit_hsa.eval import ruler

    made = {}
    real_make_task, real_generate = ruler.make_task, ruler.generate

    def make_task(*args, **kwargs):
        made["sample"] = real_make_task(*args, **kwargs)
        return made["sample"]

    def generate(model, prompt, n, **kwargs):  # the models decode; the HSA model's answers are then made right
        generated = real_generate(model, prompt, n, **kwargs)
        if model.cfg.attention != "hsa":
            return generated
        return torch.as_tensor(made["sample"].tokens, device=generated.device)[None]

    monkeypatch.setattr(ruler, "make_task", make_task)
    monkeypatch.setattr(ruler, "generate", generate)
    out = tmp_path / "exp"
    with saved_plots() as plots:
        assert main(["experiment", "--config", EXPERIMENT, f"out_dir={out}", *TINY]) == 0
    summary = json.loads((out / "length_generalization.json").read_text())
    assert set(summary["models"]) == {"hsa", "hsa-moe", "full", "swa"}
    acc = summary["accuracy"]["niah_single"]
    assert set(acc["hsa"]) == {"512", "1024"} and set(acc["full"]) == {"512"}  # full is capped at 512
    # Right answers score 1 and the answers of models trained 3 steps (noise: no 8-digit value) 0, each in its own
    # model's and length's cell: a scorer reading the prompt (where the value stands), or one that cannot score a
    # right answer, or a summary mixing models or lengths up, fails here.
    assert acc == {"hsa": {"512": 1.0, "1024": 1.0}, "hsa-moe": {"512": 1.0, "1024": 1.0}, "full": {"512": 0.0},
                   "swa": {"512": 0.0, "1024": 0.0}}
    assert (out / "accuracy_vs_length.png").is_file()  # drawing the same numbers, model by model:
    assert sorted(plots["accuracy_vs_length.png"]["niah_single"]) == sorted(
        [([512.0, 1024.0], [1.0, 1.0])] * 2 + [([512.0], [0.0]), ([512.0, 1024.0], [0.0, 0.0])])
    assert "| niah_single | hsa |" in (out / "summary.md").read_text()
    hsa = json.loads((out / "hsa.json").read_text())
    assert hsa["train"]["steps"] == 3 and hsa["train_seq_len"] == 512
    assert "hsa @ 1K" in capsys.readouterr().out  # progress is printed length by length


@pytest.mark.slow
def test_experiment_eval_only_reuses_the_trained_weights(tmp_path):
    out = tmp_path / "exp"
    assert main(["experiment", "--config", EXPERIMENT, "--models", "swa", f"out_dir={out}", *TINY]) == 0
    first = json.loads((out / "swa.json").read_text())
    (out / "swa.json").unlink()
    assert main(["experiment", "--config", EXPERIMENT, "--models", "swa", "--eval-only", f"out_dir={out}", *TINY]) == 0
    again = json.loads((out / "swa.json").read_text())
    assert again["retrieval"] == first["retrieval"]  # same weights, same seeded samples, greedy decoding
    assert again["train"] == first["train"]
    # A later eval-only run at another length adds its rows and keeps the earlier lengths'.
    assert main(["experiment", "--config", EXPERIMENT, "--models", "swa", "--eval-only", f"out_dir={out}", *TINY,
                 "eval.lengths=[768]"]) == 0
    combined = json.loads((out / "swa.json").read_text())
    assert sorted({r["length"] for r in combined["retrieval"]}) == [512, 768, 1024]
    assert [r for r in combined["retrieval"] if r["length"] != 768] == first["retrieval"]


def test_experiment_errors_name_the_problem(tmp_path, capsys):
    assert main(["experiment", "--config", EXPERIMENT, "--models", "hsx", f"out_dir={tmp_path}", *TINY]) == 2
    assert "did you mean 'hsa'" in capsys.readouterr().err
    assert main(["experiment", "--config", EXPERIMENT, "--eval-only", "--models", "hsa", f"out_dir={tmp_path}",
                 *TINY]) == 2
    assert "hsa.weights.pt' does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown config key 'model.no_such_key'"):
        load_experiment(EXPERIMENT, [*TINY, "models.hsa=[model.no_such_key=1]"])
    with pytest.raises(ConfigError, match="eval.tasks"):
        load_experiment(EXPERIMENT, [*TINY, "eval.tasks=[niah_singel]"])


def test_weighted_loss_is_the_weighted_mean_of_token_losses():
    torch.manual_seed(0)
    h, head = torch.randn(10, 8, requires_grad=True), torch.randn(16, 8)
    labels = torch.randint(0, 16, (10,))
    labels[3] = IGNORE_INDEX
    w = torch.rand(10) + 0.5
    per_token = torch.nn.functional.cross_entropy(h @ head.T, labels, ignore_index=IGNORE_INDEX, reduction="none")
    keep = labels != IGNORE_INDEX
    expected = (per_token * w)[keep].sum() / w[keep].sum()
    got = chunked_cross_entropy(h, head, labels, w, chunk_rows=4)  # several row chunks
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_cross_entropy(h, head, labels, torch.ones(10)),
                               chunked_cross_entropy(h, head, labels), rtol=1e-6, atol=1e-6)


def test_synthetic_answers_carry_their_loss_weight(corpus):
    from data_modules.text import build_document_streams

    cfg = DataConfig(paths=[str(corpus)])
    sources, weights = build_document_streams(cfg)
    tok = build_tokenizer("byte")
    stream = PackedStream(sources, weights, tok, 1024, seed=0, synthetic_fraction=1.0,
                          synthetic_tasks=("niah_single",), answer_loss_weight=7.0)
    sample = next(iter(stream))
    w = sample["loss_weight"]
    heavy = w == 7.0
    assert 8 <= int(heavy.sum()) <= 9 and set(w.unique().tolist()) == {1.0, 7.0}  # the 8 digits (+ a boundary)
    assert tok.decode(sample["labels"][heavy].tolist()).isdigit()
    plain = next(iter(PackedStream(sources, weights, tok, 1024, seed=0, synthetic_fraction=1.0,
                                   synthetic_tasks=("niah_single",))))
    assert "loss_weight" not in plain  # weight 1: batches stay as they were


def test_too_short_windows_for_a_task_fail_up_front(corpus):
    from data_modules.text import TextDataModule

    cfg = DataConfig(paths=[str(corpus)], seq_len=256, synthetic_fraction=0.1, synthetic_tasks=["niah_multiquery"])
    with pytest.raises(DataError, match="niah_multiquery.*raise data.seq_len"):
        TextDataModule(cfg, 32)


@pytest.mark.parametrize("n,past", [(300, 50), (300, 0), (5, 40)])
def test_blocked_sliding_window_equals_the_masked_computation(n, past):
    torch.manual_seed(0)
    window, L = 40, n + past
    q, k, v = torch.randn(1, n, 4, 16), torch.randn(1, L, 2, 16), torch.randn(1, L, 2, 16)
    q_pos, k_pos = torch.arange(past, L), torch.arange(L)
    allowed = (k_pos[None] <= q_pos[:, None]) & (q_pos[:, None] - k_pos[None] < window)
    expected = attend(q, k, v, AttentionMask(window, dense=allowed[None, None]))
    torch.testing.assert_close(sliding_window_blocks(q, k, v, window, block=64), expected, atol=1e-5, rtol=1e-5)


def test_retrieval_norm_normalises_queries_and_landmarks():
    from lit_hsa.config import ModelConfig
    from lit_hsa.model.transformer import HSATransformer

    cfg = ModelConfig(vocab_size=64, retrieval_norm=True, hsa_topk=2)
    model = HSATransformer(cfg)
    names = {n for n, _ in model.named_parameters()}
    assert {"memory.landmark_norm.weight", "upper.0.retrieval.q_norm.weight"} <= names
    memory = model.memory(torch.randn(1, 96, cfg.d_model))
    rms = memory.landmarks.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=1e-3)
    model(torch.randint(0, 64, (1, 96)), labels=torch.randint(0, 64, (1, 96))).backward()
    assert model.memory.landmark_norm.weight.grad.abs().sum() > 0


def test_recall_probe_batches_put_the_answer_far_back():
    diag = load_benchmark("diag_recall")
    x, labels = diag.recall_batch(8, 64, torch.Generator().manual_seed(0), "cpu")
    assert (labels != -100).sum() == 8 and (labels[:, -2] == x[:, -1]).all()
    for row in x:  # the key appears once in the first half, followed by its value
        where = (row[:32] == row[-2]).nonzero().flatten()
        assert len(where) == 1 and row[where[0] + 1] == row[-1]
    assert diag.parse_variant("hsa:attention=hsa,hsa_topk=16,retrieval_norm=true") == (
        "hsa", {"attention": "hsa", "hsa_topk": 16, "retrieval_norm": True})
