import re

import numpy as np
import pytest

from data_modules.synthetic import (
    ANSWER_SEPARATOR,
    COPY_SEPARATOR,
    TASKS,
    TRAINING_TASKS,
    TaskSample,
    make_random_task,
    make_task,
    score,
)
from data_modules.tokenizers import ByteTokenizer

TEXT = (
    "It was a bright cold day in April, and the clocks were striking thirteen.\n"
    "The hallway smelt of boiled cabbage and old rag mats. At one end of it a coloured poster, too large\n"
    "for indoor display, had been tacked to the wall. It depicted simply an enormous face, more than a metre wide:\n"
    "the face of a man of about forty-five, with a heavy black moustache and ruggedly handsome features.\n"
    "Outside, even through the shut window-pane, the world looked cold. Down in the street little eddies of wind\n"
    "were whirling dust and torn paper into spirals, and though the sun was shining and the sky a harsh blue,\n"
    "there seemed to be no colour in anything, except the posters that were plastered everywhere.\n"
)
NIAH_TASKS = tuple(t for t in TASKS if t != "self_copy")


class PairTokenizer:
    """Fake non-byte tokenizer: two characters per token, ids far outside the byte range (ASCII/Latin-1 text)."""

    eos_id, pad_id = 1, 2
    _single = 3 + 256 * 256  # ids of a lone last character
    vocab_size = _single + 256

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("latin-1"), dtype=np.uint8).astype(np.int32)
        n = len(codes) // 2 * 2
        pairs = 3 + codes[:n:2] * 256 + codes[1:n:2]
        return np.concatenate([pairs, self._single + codes[n:]]).astype(np.int32)

    def decode(self, ids) -> str:
        out = []
        for i in np.asarray(ids).tolist():
            if i >= self._single:
                out.append(chr(i - self._single))
            elif i >= 3:
                out.append(chr((i - 3) // 256) + chr((i - 3) % 256))
        return "".join(out)


class ModTokenizer:
    """The brief's fake tokenizer: one character → ``ord(c) % 97 + 3`` (lossy, so checked on ids only)."""

    eos_id, pad_id, vocab_size = 1, 2, 100

    def encode(self, text: str) -> np.ndarray:
        return np.array([ord(c) % 97 + 3 for c in text], dtype=np.int32)

    def decode(self, ids) -> str:
        return "".join(chr(int(i) - 3 + 32) for i in ids if int(i) >= 3)


TOKENIZERS = [ByteTokenizer(), PairTokenizer()]


def _sample(task, tok, length=4096, seed=0, **kw) -> TaskSample:
    return make_task(task, tok.encode(TEXT), length, tok, np.random.default_rng(seed), **kw)


def _answer_text(s: TaskSample) -> str:
    return s.answers[0] if s.task == "self_copy" else ANSWER_SEPARATOR.join(s.answers)


@pytest.mark.parametrize("tok", TOKENIZERS, ids=["byte", "pair"])
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("append_eos", [False, True])
def test_length_mask_and_prompt_len(task, tok, append_eos):
    for length in (1537, 4096):  # odd and even: self_copy must still fill exactly
        s = _sample(task, tok, length=length, append_eos=append_eos)
        assert s.task == task and s.length == length
        assert s.tokens.shape == (length,) and s.tokens.dtype == np.int32
        assert s.answer_mask.shape == (length,) and s.answer_mask.dtype == np.bool_
        # the mask is exactly the tail starting at prompt_len, and it decodes to the answer strings
        np.testing.assert_array_equal(s.answer_mask, np.arange(length) >= s.prompt_len)
        answer_ids = s.tokens[s.answer_mask]
        if append_eos:
            assert answer_ids[-1] == tok.eos_id
            answer_ids = answer_ids[:-1]
        assert tok.decode(answer_ids) == _answer_text(s)
        np.testing.assert_array_equal(answer_ids, tok.encode(_answer_text(s)))
        assert tok.eos_id not in s.tokens[: s.prompt_len]  # the haystack text has none, so nothing else adds one


NEEDLE = re.compile(r"\n(?:The special magic number|One of the special magic numbers) for (\S+) is: (\d+)\.\n")
QUESTION_KEYS = re.compile(r"\nWhat (?:is|are|are all) the special magic numbers? for (.+)\? Answer: $")
ASSIGN = re.compile(r"\nVAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\n")


@pytest.mark.parametrize("tok", TOKENIZERS, ids=["byte", "pair"])
@pytest.mark.parametrize("task", NIAH_TASKS)
def test_prompt_holds_needles_and_question_that_determine_the_answer(task, tok):
    s = _sample(task, tok, length=6000, seed=3)
    prompt = tok.decode(s.tokens[: s.prompt_len])
    if task == "vt":
        statements = ASSIGN.findall(prompt)
        assert len(statements) == 2 * (3 + 1)  # 2 chains: one value assignment + 3 hops each
        value = re.search(r"\nWhich variables are assigned the value (\d+)\? Answer: $", prompt).group(1)
        holding = []  # follow the assignments in text order, as a reader would
        for name, rhs in statements:
            if rhs == value or (rhs.startswith("VAR ") and rhs[4:] in holding):
                holding.append(name)
        assert holding == s.answers and len(holding) == 4
        return
    needles = NEEDLE.findall(prompt)
    asked = QUESTION_KEYS.search(prompt).group(1)
    asked_keys = asked.replace(" and ", ", ").split(", ")
    if task == "niah_single":
        assert len(needles) == 1 and asked_keys == [needles[0][0]] and s.answers == [needles[0][1]]
    elif task == "niah_multikey":
        assert len(needles) == 4 and len({k for k, _ in needles}) == 4
        assert s.answers == [dict(needles)[asked_keys[0]]]
    elif task == "niah_multivalue":
        assert len(needles) == 4 and {k for k, _ in needles} == set(asked_keys)
        assert s.answers == [v for _, v in needles]  # answered in order of appearance
    else:  # multiquery: 6 pairs, 2 asked, answered in the question's order
        assert len(needles) == 6 and len(asked_keys) == 2
        assert s.answers == [dict(needles)[k] for k in asked_keys]
    assert len(set(v for _, v in needles)) == len(needles)
    assert all(len(v) == 8 for _, v in needles)


def _needle_start(prompt: str, s: TaskSample) -> int:
    """Character index of the needle holding the first answer (every needle starts with a newline)."""
    return prompt.rfind("\n", 0, prompt.find(s.answers[0]))


@pytest.mark.parametrize("tok", TOKENIZERS, ids=["byte", "pair"])
@pytest.mark.parametrize("task", NIAH_TASKS)
@pytest.mark.parametrize("snap", [0, 32])
def test_needle_lands_at_requested_depth(task, tok, snap):
    for depth in (0.0, 0.25, 0.5, 0.9, 1.0):
        s = _sample(task, tok, length=8192, seed=7, depth=depth, snap=snap)
        assert s.depth == depth
        prompt = tok.decode(s.tokens[: s.prompt_len])
        haystack_end = prompt.rfind("\n")  # the question is the last line of the prompt
        needles = re.findall(r"\n(?:The special|One of the|VAR ).*\n", prompt[:haystack_end])
        needle_chars = sum(len(n) for n in needles)
        rel = _needle_start(prompt, s) / (haystack_end - needle_chars)
        # other needles in front of it, and the snap (in tokens of up to 2 characters), bound the offset
        tol = (needle_chars + 2 * snap + 2) / (haystack_end - needle_chars)
        assert abs(rel - depth) <= tol, (depth, rel, tol)
        if task == "niah_single" and snap == 0:
            assert abs(rel - depth) <= 2 / (haystack_end - needle_chars)


def test_snap_puts_needles_on_line_starts():
    tok = ByteTokenizer()
    lines = tok.encode("".join(f"line {i} of a short poem\n" for i in range(40)))  # every point is < 32 from a newline
    for seed in range(5):
        s = make_task("niah_multiquery", lines, 8192, tok, np.random.default_rng(seed))
        prompt = tok.decode(s.tokens[: s.prompt_len])
        starts = [m.start() for m in re.finditer(r"\nThe special magic number", prompt)]
        assert len(starts) == 6 and all(i == 0 or prompt[i - 1] == "\n" for i in starts)


def test_random_depth_is_drawn_and_reported():
    tok = ByteTokenizer()
    depths = {_sample("niah_single", tok, seed=seed).depth for seed in range(6)}
    assert len(depths) == 6 and all(0.0 <= d <= 1.0 for d in depths)
    assert _sample("self_copy", tok).depth is None


def test_vt_chains_are_stated_in_order_even_at_the_end():
    tok = ByteTokenizer()
    s = _sample("vt", tok, depth=1.0, num_chains=3, num_hops=4)
    prompt = tok.decode(s.tokens[: s.prompt_len])
    names = [n for n, _ in ASSIGN.findall(prompt)]
    assert len(names) == 3 * 5 and len(s.answers) == 5
    assert [n for n in names if n in s.answers] == s.answers


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_and_seed_dependent(task):
    tok = ByteTokenizer()
    a, b, c = _sample(task, tok, seed=11), _sample(task, tok, seed=11), _sample(task, tok, seed=12)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.answers == b.answers and a.prompt_len == b.prompt_len and a.depth == b.depth
    if task == "self_copy":  # no randomness: the copy is fully determined by the haystack
        np.testing.assert_array_equal(a.tokens, c.tokens)
    else:
        assert a.answers != c.answers and not np.array_equal(a.tokens, c.tokens)


@pytest.mark.parametrize("task", TASKS)
def test_score(task):
    tok = ByteTokenizer()
    s = _sample(task, tok, length=2048, seed=5)
    assert score(s, _answer_text(s)) == 1.0
    assert score(s, "Sure. " + _answer_text(s).upper() + " That is all.") == 1.0  # case-insensitive match
    assert score(s, "I do not know.") == 0.0
    if len(s.answers) > 1:
        assert score(s, s.answers[0]) == pytest.approx(1 / len(s.answers))
    if task != "self_copy":
        wrong = ANSWER_SEPARATOR.join(str(int(a) + 1) if a.isdigit() else a[::-1] for a in s.answers)
        assert score(s, wrong) < 1.0


def test_key_types_and_options():
    tok = ByteTokenizer()
    s = _sample("niah_multiquery", tok, key_type="uuid", num_pairs=9, num_queries=4, value_digits=6)
    prompt = tok.decode(s.tokens[: s.prompt_len])
    assert len(re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12} is", prompt)) == 9
    assert len(s.answers) == 4 and all(len(a) == 6 and a.isdigit() for a in s.answers)
    s = _sample("niah_multivalue", tok, num_values=2)
    assert len(s.answers) == 2
    s = _sample("self_copy", tok, length=102, separator="|")  # odd room 101: 1 lead token + 50 ‖ "|" ‖ 50
    assert s.prompt_len == 52 and tok.decode(s.tokens[52:]) == s.answers[0] == TEXT[1:51]
    np.testing.assert_array_equal(s.tokens[1:51], s.tokens[52:])


def test_haystack_is_cycled_and_cropped():
    tok = ByteTokenizer()
    short = tok.encode("abc\n")
    s = make_task("niah_single", short, 500, tok, np.random.default_rng(0), depth=1.0)
    prompt = tok.decode(s.tokens[: s.prompt_len])
    assert prompt.startswith("abc\nabc\nabc\n")
    long = tok.encode(TEXT * 50)
    s = make_task("niah_single", long, 1000, tok, np.random.default_rng(0), depth=1.0)
    assert tok.decode(s.tokens[:200]) == TEXT[:200]


def test_make_random_task_mixes_training_tasks():
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    window = tok.encode(TEXT * 10)[:2049]
    seen = set()
    for _ in range(30):
        s = make_random_task(window, len(window), tok, rng, append_eos=True)
        assert s.length == 2049 and s.tokens[-1] == tok.eos_id
        seen.add(s.task)
    assert seen == set(TRAINING_TASKS)


def test_mod_tokenizer_ids_only():
    tok = ModTokenizer()
    for task in TASKS:
        s = _sample(task, tok, length=3000, seed=1, append_eos=True)
        assert len(s.tokens) == 3000
        assert s.tokens.min() >= 1 and s.tokens.max() < tok.vocab_size
        answer_ids = s.tokens[s.answer_mask][:-1]
        if task == "self_copy":  # decode is lossy here: compare the copy with the text it copies
            first = s.tokens[: s.prompt_len - len(tok.encode(COPY_SEPARATOR))]
            np.testing.assert_array_equal(answer_ids, first[len(first) - len(answer_ids):])
        else:
            np.testing.assert_array_equal(answer_ids, tok.encode(_answer_text(s)))
        if task.startswith("niah"):
            needle = tok.encode("special magic number")
            windows = np.lib.stride_tricks.sliding_window_view(s.tokens[: s.prompt_len], len(needle))
            hits = int((windows == needle).all(axis=1).sum())
            assert hits == {"niah_single": 2, "niah_multikey": 5, "niah_multivalue": 5, "niah_multiquery": 7}[task]


def test_million_token_sample():
    tok = ByteTokenizer()
    haystack = tok.encode(TEXT * 200)
    s = make_task("niah_single", haystack, 1 << 20, tok, np.random.default_rng(0), depth=0.5, append_eos=True)
    assert len(s.tokens) == 1 << 20 and s.tokens.dtype == np.int32
    assert int(s.answer_mask.sum()) == len(s.answers[0]) + 1
    needle = tok.encode(f"is: {s.answers[0]}.")
    middle = tok.decode(s.tokens[(1 << 19) - 200:(1 << 19) + 200])
    assert tok.decode(needle) in middle


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(task="ruler_qa"), "task: unknown task 'ruler_qa'.*niah_single.*self_copy"),
        (dict(length=40), r"length: 40 tokens cannot hold task 'niah_single'"),
        (dict(length=0), "length: must be a positive integer"),
        (dict(depth=-0.1), r"depth: must be in \[0, 1\]"),
        (dict(depth=1.5), r"depth: must be in \[0, 1\]"),
        (dict(task="self_copy", depth=0.5), "depth: self_copy has no needle"),
        (dict(task="self_copy", length=20), "length: 20 tokens cannot hold task 'self_copy'"),
        (dict(num_pairs=3), "num_pairs: not an option of task 'niah_single'"),
        (dict(task="niah_multiquery", num_queries=7), "num_queries: 7 queries need at least as many pairs"),
        (dict(task="niah_multikey", num_keys=0), "num_keys: must be an integer >= 1"),
        (dict(key_type="guid"), "key_type: must be 'word' or 'uuid'"),
        (dict(haystack=np.zeros(0, dtype=np.int32)), "haystack: empty"),
        (dict(haystack=np.zeros((2, 8), dtype=np.int32)), "haystack: must be a 1-D integer"),
        (dict(rng=np.random.RandomState(0)), "rng: must be a numpy.random.Generator"),
    ],
)
def test_bad_arguments(kwargs, match):
    tok = ByteTokenizer()
    args = dict(task="niah_single", haystack=tok.encode(TEXT), length=512, tokenizer=tok,
                rng=np.random.default_rng(0))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make_task(**args)
