"""bAbI-in-a-haystack (``lit_hsa/eval/babilong.py``) against BABILong's protocol: the prompt word for word, story
answers recomputed here by an independent simulation of the facts' text, facts spread in order over the background
within the length, and BABILong's scoring on hand-written outputs."""

import json
import re

import pytest
import torch

from data_modules.tokenizers import build_tokenizer
from lit_hsa.eval import babilong, ruler
from lit_hsa.eval.babilong import build_sample, compare_answers, evaluate_babilong, make_story
from tests.helpers import fit, saved_plots, scalars

BACKGROUND = [f"This is background sentence number {i} about nothing in particular." for i in range(50)]
ROOM = r"(bathroom|bedroom|garden|hallway|kitchen|office)"


def solve(facts: list[str], question: str) -> str:
    """The answer from the facts' text alone: a fresh simulation of bAbI's world (people's rooms, who holds what,
    where dropped things lie, each object's rooms in turn)."""
    place, holder, lying, rooms = {}, {}, {}, {}

    def seen(obj):
        room = place[holder[obj]] if obj in holder else lying[obj]
        if not rooms.setdefault(obj, []) or rooms[obj][-1] != room:
            rooms[obj].append(room)

    for fact in facts:
        if m := re.fullmatch(rf"(\w+) (?:moved to|went to|journeyed to|travelled to|went back to) the {ROOM}\.", fact):
            place[m[1]] = m[2]
            for obj, who in holder.items():
                if who == m[1]:
                    seen(obj)
        elif m := re.fullmatch(r"(\w+) (?:got|picked up|grabbed|took) the (\w+) there\.", fact):
            holder[m[2]] = m[1]
            lying.pop(m[2], None)
            seen(m[2])
        elif m := re.fullmatch(r"(\w+) (?:dropped|discarded|put down|left) the (\w+) there\.", fact):
            assert holder.pop(m[2]) == m[1]
            lying[m[2]] = place[m[1]]
            seen(m[2])
        else:
            raise AssertionError(f"not a bAbI fact: {fact!r}")
    if m := re.fullmatch(r"Where is (\w+)\?", question):
        return place[m[1]]
    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        return place[holder[m[1]]] if m[1] in holder else lying[m[1]]
    m = re.fullmatch(rf"Where was the (\w+) before the {ROOM}\?", question)
    assert rooms[m[1]][-1] == m[2]
    return rooms[m[1]][-2]


@pytest.mark.parametrize("task", babilong.TASKS)
def test_every_story_answers_its_question(task):
    import random

    for seed in range(200):
        story = make_story(task, random.Random(seed))
        low, high = babilong.FACTS[task]
        assert low <= len(story.facts) <= high + 1  # a last move or pick-up may end one fact over
        assert story.answer == solve(story.facts, story.question), (seed, story)
        assert all(0 <= i < len(story.facts) for i in story.supporting)
        assert len(story.supporting) <= {"qa1": 1, "qa2": 2, "qa3": 3}[task]


def test_the_prompt_is_babilongs_word_for_word():
    tok = build_tokenizer("byte", None)
    sample = build_sample("qa1", 2000, 0, 0, tok, BACKGROUND)
    assert sample.prompt.startswith(
        "I will give you context with the facts about positions of different persons hidden in some random text and "
        "a question. You need to answer the question based only on the information from the facts. If a person was in "
        "different locations, use the latest location to answer the question.\n<example>\nCharlie went to the "
        "hallway. Judith come back to the kitchen. Charlie travelled to balcony. Where is Charlie?\nAnswer: The most "
        "recent location of Charlie is balcony.\n</example>\n\n<example>\n")
    assert ("Always return your answer in the following format: The most recent location of ’person’ is "
            "’location’. Do not write anything else after that. \n<context>\n") in sample.prompt
    assert sample.prompt.endswith(f"\n</context>\nQuestion: {sample.question}\nAnswer:")
    qa3 = build_sample("qa3", 2000, 0, 0, tok, BACKGROUND).prompt
    assert "John journeyed to the bedroom.Mary grabbed the apple." in qa3  # BABILong's typos kept
    assert "Before the $location_1& the $item$ was in the $location_2$." in qa3
    qa2 = build_sample("qa2", 2000, 0, 0, tok, BACKGROUND).prompt
    assert "and a question.You need to answer" in qa2


@pytest.mark.parametrize("task", babilong.TASKS)
def test_facts_are_spread_in_order_over_the_background_within_the_length(task):
    tok = build_tokenizer("byte", None)
    for length in (1500, 3000):
        sample = build_sample(task, length, 3, 0, tok, BACKGROUND)
        context = sample.prompt.split("<context>\n")[-1].split("\n</context>")[0]
        used = len(tok.encode(context)) + 1  # every piece counted with the space before it
        longest = max(len(tok.encode(" " + s)) for s in BACKGROUND)
        assert length - longest < used <= length
        at = -1
        for fact in sample.story.facts:  # each fact verbatim, in the story's order
            at = context.index(fact, at + 1)
        assert sample.fact_positions == sorted(sample.fact_positions)
        assert context.count("This is background sentence") >= 10  # background between them, not facts alone
    again = build_sample(task, 1500, 3, 0, tok, BACKGROUND)
    assert again.prompt == build_sample(task, 1500, 3, 0, tok, BACKGROUND).prompt
    assert again.prompt != build_sample(task, 1500, 4, 0, tok, BACKGROUND).prompt
    with pytest.raises(ValueError, match="needs .* tokens for its facts"):
        build_sample(task, 20, 0, 0, tok, BACKGROUND)


@pytest.mark.parametrize("output, target, question, correct", [
    ("The most recent location of Mary is kitchen.", "kitchen", "Where is Mary?", True),
    (" the most recent location of mary is KITCHEN. Then the garden.", "kitchen", "Where is Mary?", True),
    ("Mary is in the kitchen or the garden.", "kitchen", "Where is Mary?", False),  # two rooms: not one answer
    ("The most recent location of Mary is garden.", "kitchen", "Where is Mary?", False),
    ("Before the kitchen the apple was in the bathroom.", "bathroom", "Where was the apple before the kitchen?", True),
    ("<example> kitchen", "kitchen", "Where is Mary?", False),  # an imitated example is cut away
    ("", "kitchen", "Where is Mary?", False),
])
def test_compare_answers_as_babilong_scores(output, target, question, correct):
    assert compare_answers(target, output, question) is correct


def test_evaluate_babilong_scores_each_task_and_length(monkeypatch):
    tok = build_tokenizer("byte", None)
    answers = {}  # by prompt: every sample is built before the first is answered

    def fake_generate(model, prompt, n, eos_id=None, **kwargs):  # right for qa1 and qa3, wrong for qa2; then EOS
        text = tok.decode(prompt[0].tolist())
        question = text.rsplit("Question: ", 1)[1]
        answer = answers[text]
        reply = f" It is in the {answer}" if "is the" not in question else " It is in the nowhere"
        ids = [*tok.encode(reply), eos_id, *tok.encode(" and the office.")]  # what follows EOS is not read
        return torch.cat([prompt, torch.as_tensor(ids, dtype=torch.long)[None]], dim=1)

    real_build = babilong.build_sample

    def build(*args, **kwargs):
        sample = real_build(*args, **kwargs)
        answers[sample.prompt] = sample.answer
        return sample

    monkeypatch.setattr(babilong, "build_sample", build)
    monkeypatch.setattr(ruler, "generate", fake_generate)
    rows = evaluate_babilong(torch.nn.Identity(), tok, list(babilong.TASKS), [2000, 3000], 3, 0, BACKGROUND)
    assert [(r["task"], r["length"], r["samples"]) for r in rows] == [
        (t, n, 3) for t in babilong.TASKS for n in (2000, 3000)]
    assert {r["task"]: r["score"] for r in rows} == {"qa1": 100.0, "qa2": 0.0, "qa3": 100.0}


# ------------------------------------------------------------------------------------------------ main.py eval


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run = fit(tmp_path_factory.mktemp("babilong"), "bl", "trainer.max_steps=2")
    return str(run / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_cli_writes_rows_averages_plot_and_events(ckpt, tmp_path, capsys):
    from lit_hsa.cli import main

    with saved_plots() as plots:
        assert main(["eval", "--suite", "babilong", "--ckpt", ckpt, "--device", "cpu", "--out", str(tmp_path),
                     "--lengths", "1500,2500", "--samples", "2"]) == 0
    result = json.loads((tmp_path / "babilong.json").read_text())
    rows = result["rows"]
    assert [(r["task"], r["length"], r["samples"]) for r in rows] == [
        (t, n, 2) for t in ("qa1", "qa2", "qa3") for n in (1500, 2500)]
    for r in rows:  # the score is the share of the outputs that BABILong's compare_answers accepts
        accepted = [compare_answers(o["answer"], o["output"], q) for o, q in zip(r["outputs"], r["questions"])]
        assert r["score"] == 100 * sum(accepted) / 2
    per_length = {a["length"]: a["score"] for a in result["average_per_length"]}
    assert per_length == {n: round(sum(r["score"] for r in rows if r["length"] == n) / 3, 2) for n in (1500, 2500)}
    assert result["average"] == round((per_length[1500] + per_length[2500]) / 2, 2)
    lines = plots["babilong_vs_length.png"][""]  # a line per task, then the average
    tasks = ("qa1", "qa2", "qa3")
    assert lines[:3] == [([1500.0, 2500.0], [r["score"] for r in rows if r["task"] == t]) for t in tasks]
    assert lines[3] == ([1500.0, 2500.0], [per_length[1500], per_length[2500]])
    assert scalars(tmp_path / "tb", "babilong/qa2/2500") == {0: pytest.approx(rows[3]["score"])}
    assert "| qa1 |" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--tasks", "qa4"], "--tasks: 'qa4' is not one of qa1, qa2, qa3"),
    (["--depths", "0.5"], "--depths does not apply to --suite babilong"),
    (["--essay-dir", "."], "--essay-dir does not apply to --suite babilong"),
    (["--tasks", "qa3", "--lengths", "300"], "--lengths: length 300: BABILong task 'qa3' needs"),
])
def test_cli_bad_input_is_one_line(ckpt, tmp_path, capsys, args, message):
    from lit_hsa.cli import main

    out = tmp_path / "out"
    assert main(["eval", "--suite", "babilong", "--ckpt", ckpt, "--device", "cpu", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()
