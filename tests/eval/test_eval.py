import json
from typing import Callable

import numpy as np
import pytest
import torch

from data_modules.synthetic import TaskSample, score
from data_modules.tokenizers import ByteTokenizer
from lit_hsa.config import parse_length
from lit_hsa.eval import ruler
from lit_hsa.model.transformer import HSATransformer
from tests.helpers import fit, tiny

HAYSTACK = ByteTokenizer().encode("The quick brown fox jumps over the lazy dog.\n" * 200)


def test_parse_length():
    assert parse_length("4k") == 4096 and parse_length("1M") == 1048576 and parse_length("300") == 300
    assert parse_length(512) == 512 and parse_length("1.5k") == 1536
    with pytest.raises(ValueError, match="bad length"):
        parse_length("lots")


def test_oracle_answers_score_one(monkeypatch):
    """Plumbing check: if the model produced the true continuation, every task scores 1.0."""
    made = {}

    def spy(*args, **kwargs):
        made["sample"] = real_make_task(*args, **kwargs)
        return made["sample"]

    real_make_task = ruler.make_task
    monkeypatch.setattr(ruler, "make_task", spy)
    monkeypatch.setattr(ruler, "generate", lambda model, prompt, n, **kw: torch.as_tensor(made["sample"].tokens)[None])
    tasks = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "self_copy"]
    rows = ruler.evaluate_retrieval(torch.nn.Identity(), ByteTokenizer(), HAYSTACK, tasks, [600, 900],
                                    [0.0, 0.5, 1.0], samples=2)
    assert len(rows) == 5 * 2 * 3 + 2  # self_copy has no depth
    assert all(r.accuracy == 1.0 for r in rows)


def test_score_is_the_fraction_of_answers_found():
    """RULER's string match on known answers: the exact value scores 1 (inside other text, in any case), a wrong or
    missing value 0, and k of a multi-value sample's 4 values k / 4."""
    tok, rng = ByteTokenizer(), np.random.default_rng(0)
    single = ruler.make_task("niah_single", HAYSTACK[:600], 600, tok, rng, 0.5)
    (value,) = single.answers
    wrong = value[:-1] + str((int(value[-1]) + 1) % 10)
    assert score(single, value) == 1.0 and score(single, f"The value is: {value.upper()}.") == 1.0
    assert score(single, wrong) == 0.0 and score(single, "") == 0.0 and score(single, value[:-1]) == 0.0
    multi = ruler.make_task("niah_multivalue", HAYSTACK[:600], 600, tok, rng, 0.5)
    assert len(multi.answers) == 4 and len(set(multi.answers)) == 4
    for k in range(5):
        assert score(multi, ", ".join(multi.answers[:k])) == k / 4


def generation_spy(monkeypatch, answer: Callable[[int, TaskSample], bool]):
    """Replace the model's generation in ``ruler.evaluate_retrieval``: call ``i`` (counted from 0) continues the
    prompt with the sample's true answer when ``answer(i, sample)``, else with question marks."""
    made, calls = {}, []

    def make_task(*args, **kwargs):
        made["sample"] = real_make_task(*args, **kwargs)
        return made["sample"]

    def generate(model, prompt, n, **kwargs):
        sample = made["sample"]
        right = answer(len(calls), sample)
        calls.append(right)
        continuation = sample.tokens[sample.prompt_len :] if right else np.full(n, ord("?"))
        return torch.cat([prompt, torch.as_tensor(continuation, dtype=prompt.dtype)[None]], dim=1)

    real_make_task = ruler.make_task
    monkeypatch.setattr(ruler, "make_task", make_task)
    monkeypatch.setattr(ruler, "generate", generate)
    return calls


def test_accuracy_is_the_mean_score_of_the_generated_answers(monkeypatch):
    """Answers right in 3 of every 4 samples give 0.75 per row, never right 0."""
    calls = generation_spy(monkeypatch, lambda i, sample: i % 4 != 3)
    rows = ruler.evaluate_retrieval(torch.nn.Identity(), ByteTokenizer(), HAYSTACK, ["niah_single", "vt"], [600],
                                    [0.0, 1.0], samples=4)
    assert len(rows) == 4 and len(calls) == 16 and [r.accuracy for r in rows] == [0.75] * 4

    calls = generation_spy(monkeypatch, lambda i, sample: False)
    rows = ruler.evaluate_retrieval(torch.nn.Identity(), ByteTokenizer(), HAYSTACK, ["niah_single"], [600], [0.0],
                                    samples=2)
    assert len(calls) == 2 and rows[0].accuracy == 0.0


def test_real_model_rows_and_perplexity_buckets():
    """An untrained model emits noise: it cannot write the sample's 8-digit value, so its accuracy is 0 (a scorer
    that also read the prompt, where the value stands, would give 1)."""
    model = HSATransformer(tiny(vocab_size=320)).eval()
    rows = ruler.evaluate_retrieval(model, ByteTokenizer(), HAYSTACK, ["niah_single"], [300], [0.5], samples=1)
    assert len(rows) == 1 and rows[0].accuracy == 0.0
    ppl = ruler.perplexity_by_position(model, HAYSTACK[:300], segment_size=128)
    assert [(b["from"], b["to"]) for b in ppl] == [(0, 64), (64, 128), (128, 256), (256, 299)]
    # each bucket: the mean next-token loss of one full forward over the sequence (segments and caches inside)
    x = torch.as_tensor(HAYSTACK[:300], dtype=torch.long)[None]
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(model(x[:, :-1])[0].float(), x[0, 1:], reduction="none")
    for b in ppl:
        assert b["loss"] == pytest.approx(float(losses[b["from"]:b["to"]].mean()), rel=1e-4)
        assert b["ppl"] == pytest.approx(np.exp(b["loss"]), rel=1e-6)


def test_samples_of_a_row_differ_and_repeat_with_the_seed():
    """The samples averaged in one (task, length, depth) row are different draws (not one sample counted n times),
    and the same seed draws the same ones again."""
    tok = ByteTokenizer()
    draw = lambda i, seed=0: ruler.retrieval_sample("niah_single", 600, 0.5, i, seed, HAYSTACK, tok)  # noqa: E731
    answers = [tuple(draw(i).answers) for i in range(4)]
    assert len(set(answers)) == 4
    assert [tuple(draw(i).answers) for i in range(4)] == answers
    assert tuple(draw(0, seed=1).answers) != answers[0]


def test_eval_cli_writes_json_plots_and_events(tmp_path):
    from lit_hsa.cli import main

    run = fit(tmp_path, "ev", "trainer.max_steps=2")
    out = tmp_path / "eval"
    args = ["eval", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--tasks", "niah_single,vt", "--lengths",
            "300,400", "--depths", "0,1", "--samples", "1", "--ppl-length", "300", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    result = json.loads((out / "eval.json").read_text())
    assert len(result["retrieval"]) == 2 * 2 * 2 and result["perplexity_by_position"]
    assert (out / "accuracy_vs_length.png").is_file() and (out / "depth_length_vt.png").is_file()
    assert list(out.glob("events.out.tfevents.*"))
    assert main(["eval", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--tasks", "nope"]) == 2


@pytest.mark.parametrize("field_name, bad, message", [
    ("tasks", ["niah_singel"], "'niah_singel' is not one of"),
    ("lengths", [32], "must be >= 64 tokens, got 32"),
    ("lengths", ["4q"], "bad length '4q'"),
    ("depths", [1.5], "must be non-empty and lie in [0, 1]"),
    ("samples", 0, "must be >= 1, got 0"),
])
def test_eval_options_follow_one_rule_set_at_every_entry_point(field_name, bad, message):
    """``main.py eval``, an experiment's ``eval`` section and the in-training probe (``trainer.eval_*``) refuse the
    same values with the same rule, each message naming the key as its user wrote it."""
    from argparse import Namespace

    from lit_hsa.config import ConfigError, TrainerConfig
    from lit_hsa.eval.run import cli_options
    from lit_hsa.experiment import Experiment, ExperimentEval

    def as_flag(value):
        return ",".join(map(str, value)) if isinstance(value, list) else value

    cli = dict(tasks="niah_single", lengths="1k", depths="0.5", samples=1, segment_size=64)
    cli[field_name] = as_flag(bad)
    exp = Experiment(models={"hsa": []}, eval=ExperimentEval(**{field_name: bad}))
    entry_points = {"--" + field_name: lambda: cli_options(Namespace(**cli)),
                    "eval." + field_name: exp.validate_eval}
    if field_name != "depths":  # the in-training probe draws depths at random
        entry_points["trainer.eval_" + field_name] = TrainerConfig(**{"eval_" + field_name: bad}).validate
    for key, check in entry_points.items():
        with pytest.raises(ConfigError) as refused:
            check()
        assert key in str(refused.value) and message in str(refused.value), (key, str(refused.value))
    # and the same options with the value fixed pass everywhere
    assert cli_options(Namespace(**dict(cli, **{field_name: as_flag(getattr(ExperimentEval(), field_name))})))
