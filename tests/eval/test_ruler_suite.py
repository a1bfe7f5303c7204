"""RULER's synthetic tasks (data_modules/ruler_tasks.py, scored by lit_hsa/eval/ruler_suite.py) checked against
RULER's own definitions: the strings below are copied from NVIDIA/RULER (scripts/data/synthetic/constants.py,
synthetic.yaml, niah.py at c3f5e3b), and each sample is taken apart by hand here (counts, positions, formats), not
through the module's other paths."""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch

from data_modules import ruler_tasks as rt
from data_modules.tokenizers import ByteTokenizer
from lit_hsa.eval import ruler
from lit_hsa.eval import ruler_suite as rs
from tests.helpers import ROOT, fit, saved_plots, scalars

TOK = ByteTokenizer()

# scripts/data/synthetic/constants.py, verbatim
NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                 "{type_needle_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
                "list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
# niah.py's singular rewrite of template + answer prefix (one value asked for)
NIAH_SINGULAR = ("A special magic {type_needle_v} is hidden within the following text. Make sure to memorize it. I "
                 "will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat is the special magic "
                 "{type_needle_v} for {query} mentioned in the provided text? The special magic {type_needle_v} for "
                 "{query} mentioned in the provided text is")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [0, 3, 5, 8, 10, 13, 15, 18, 21, 23, 26, 28, 31, 33, 36, 38, 41, 44, 46, 49, 51, 54, 56, 59, 62, 64, 67, 69,
          72, 74, 77, 79, 82, 85, 87, 90, 92, 95, 97, 100]
# scripts/synthetic.yaml
YAML = {
    "niah_single_1": ("niah", dict(type_haystack="noise", type_needle_k="words", type_needle_v="numbers",
                                   num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_single_2": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                   num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_single_3": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="uuids",
                                   num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_multikey_1": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=4, num_needle_v=1, num_needle_q=1)),
    "niah_multikey_2": ("niah", dict(type_haystack="needle", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_multikey_3": ("niah", dict(type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids",
                                     num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_multivalue": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=1, num_needle_v=4, num_needle_q=1)),
    "niah_multiquery": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=1, num_needle_v=1, num_needle_q=4)),
    "vt": ("variable_tracking", dict(type_haystack="noise", num_chains=1, num_hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0)),
}
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"  # uuid.UUID(int=..., version=4)
# A haystack whose sentences are easy to count: every sentence starts with "Sentence".
NUMBERED_ESSAY = rt.essay_words_from_text(" ".join(f"Sentence {i} is about item {i}." for i in range(4000)))


def sample(task: str, length: int, index: int = 0, seed: int = 42, essay=None) -> rt.RulerSample:
    return rt.build_ruler_sample(task, length, index, seed, TOK, essay)


def n_tokens(s: rt.RulerSample) -> int:
    return len(TOK.encode(s.input + s.answer_prefix))


def context_lines(s: rt.RulerSample) -> list[str]:
    """A NIAH prompt is header line, context, question line."""
    return s.input.split("\n")[1:-1]


def is_adj_noun(key: str) -> bool:
    adjs, nouns = set(rt.read_word_list("adjectivelist.txt")), set(rt.read_word_list("nounlist.txt"))
    return any(key[:i] in adjs and key[i + 1 :] in nouns for i, c in enumerate(key) if c == "-")


# ------------------------------------------------------------------------------------------------ definitions


def test_templates_prefixes_and_task_args_are_rulers_verbatim():
    expected = {"niah": (NIAH_TEMPLATE, NIAH_PREFIX, 128), "variable_tracking": (VT_TEMPLATE, VT_PREFIX, 30),
                "common_words_extraction": (CWE_TEMPLATE, CWE_PREFIX, 120),
                "freq_words_extraction": (FWE_TEMPLATE, FWE_PREFIX, 50)}
    assert list(rt.RULER_TASKS) == list(YAML)
    for name, task in rt.RULER_TASKS.items():
        generator, args = YAML[name]
        assert (task.generator, task.args) == (generator, args), name
        assert (task.template, task.answer_prefix, task.tokens_to_generate) == expected[generator], name
    assert rt.singular(NIAH_TEMPLATE + NIAH_PREFIX) == NIAH_SINGULAR
    assert rt.DEPTHS == DEPTHS
    assert rt.NOISE == NOISE and rt.NEEDLE == "One of the special magic {type_needle_v} for {key} is: {value}."


def test_vendored_word_lists_are_wonderwords_2_2_0_and_ship_as_package_data():
    sizes = {"nounlist.txt": (6786, 54781, "0778f518"), "adjectivelist.txt": (912, 7403, "66814d46"),
             "verblist.txt": (1042, 6967, "9fbf5e4e")}
    for name, (lines, size, sha) in sizes.items():
        data = (rt.WORDS_DIR / name).read_bytes()
        assert (data.count(b"\n"), len(data), hashlib.sha256(data).hexdigest()[:8]) == (lines, size, sha), name
    # the numbers of unique keys / words RULER's niah.py and common_words_extraction.py build from them
    assert len(rt.niah_words()) == 6_175_260 and len(rt.cwe_words(42)) == 8_169
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'\[tool\.setuptools\.package-data\]\n"data_modules" = \["ruler_words/\*\.txt"\]', pyproject)


def test_adj_noun_keys_index_as_rulers_sorted_set():
    """``rng.choice(niah_words())`` is RULER's ``random.choice(words)`` only if item i is the i-th of
    ``sorted(set(adj-noun))``: checked against that list for every adjective (hyphenated prefixes like well- /
    well-off- included) with a tenth of the nouns plus every noun holding a space or hyphen."""
    adjs, nouns = rt.read_word_list("adjectivelist.txt"), rt.read_word_list("nounlist.txt")
    some = nouns[::10] + [n for n in nouns if " " in n or "-" in n]
    expected = sorted(set(f"{a}-{n}" for a in adjs for n in some))
    words = rt.AdjNounWords(adjs, some)
    assert len(words) == len(expected) and list(words) == expected
    assert any(len(b) > len(some) for b in words.blocks if not isinstance(b, str))  # interleaved runs were tested


def test_split_sentences():
    assert rt.split_sentences(" A b. C d!  E f?\nG h ") == ["A b.", "C d!", "E f?", "G h"]
    assert rt.split_sentences("os.path.join(a) is x.y. Next") == ["os.path.join(a) is x.y.", "Next"]
    assert rt.split_sentences("Ends with a dot.") == ["Ends with a dot."] and rt.split_sentences("  ") == []
    assert rt.essay_words_from_text("a  b\n\tc ") == ["a", "b", "c", ""]  # RULER's re.sub + split(" ")


# ------------------------------------------------------------------------------------------------ NIAH


def test_niah_single_1_is_noise_lines_and_one_needle():
    s = sample("niah_single_1", 2048)
    lines = context_lines(s)
    needles = [line for line in lines if line != NOISE]
    assert len(needles) == 1 and len(lines) == s.haystack + 1 and s.haystack > 5
    key, value = re.fullmatch(r"One of the special magic numbers for (.+) is: (\d{7})\.", needles[0]).groups()
    assert is_adj_noun(key) and s.outputs == [value]
    assert s.input == NIAH_SINGULAR.format(type_needle_v="number", context="\n".join(lines), query=key).removesuffix(
        s.answer_prefix)
    assert s.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
    assert s.input.endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text?")
    assert s.depth is None and s.tokens_to_generate == 128


@pytest.mark.parametrize("task, key_pattern, value_pattern", [("niah_multikey_2", None, r"\d{7}"),
                                                              ("niah_multikey_3", UUID, UUID)])
def test_niah_multikey_2_3_haystacks_are_distractor_needles(task, key_pattern, value_pattern):
    s = sample(task, 4096)
    kind = "numbers" if value_pattern == r"\d{7}" else "uuids"
    lines = context_lines(s)
    assert len(lines) == s.haystack + 1 and s.haystack > 20
    pairs = [re.fullmatch(rf"One of the special magic {kind} for (.+) is: ({value_pattern})\.", line).groups()
             for line in lines]
    for key, _ in pairs:
        assert re.fullmatch(key_pattern, key) if key_pattern else is_adj_noun(key)
    query = re.search(r"What is the special magic (?:number|uuid) for (.+) mentioned", s.input).group(1)
    assert [v for k, v in pairs if k == query] == s.outputs and len(s.outputs) == 1
    assert len({k for k, _ in pairs}) > len(pairs) // 2  # fresh random distractors, not one repeated


def test_niah_multivalue_hides_four_values_of_one_key():
    s = sample("niah_multivalue", 8192, essay=NUMBERED_ESSAY)
    found = re.findall(r"One of the special magic numbers for (.+?) is: (\d{7})\.", s.input)
    assert len(found) == 4 and len({k for k, _ in found}) == 1
    assert sorted(v for _, v in found) == sorted(s.outputs) and len(set(s.outputs)) == 4
    assert s.input.startswith("Some special magic numbers are hidden within the following text.")
    assert s.input.endswith(f"\nWhat are all the special magic numbers for {found[0][0]} mentioned in the provided "
                            "text?")
    assert s.answer_prefix == f" The special magic numbers for {found[0][0]} mentioned in the provided text are"


def test_niah_multiquery_asks_four_keys_in_query_order():
    s = sample("niah_multiquery", 8192, essay=NUMBERED_ESSAY)
    found = dict(re.findall(r"One of the special magic numbers for (.+?) is: (\d{7})\.", s.input))
    assert len(found) == 4
    query = re.fullmatch(r" The special magic numbers for (.+) mentioned in the provided text are",
                         s.answer_prefix).group(1)
    a, b, c, d = re.fullmatch(r"(.+?), (.+?), (.+?), and (.+)", query).groups()
    assert sorted([a, b, c, d]) == sorted(found) and s.outputs == [found[k] for k in (a, b, c, d)]
    assert f"What are all the special magic numbers for {query} mentioned in the provided text?" in s.input


@pytest.mark.parametrize("task", ["niah_single_2", "niah_single_3", "niah_multikey_1"])
def test_essay_needles_sit_between_sentences_at_the_drawn_depths(task):
    for index in range(3):
        s = sample(task, 8192, index, essay=NUMBERED_ESSAY)
        (context,) = context_lines(s)
        needle = r"One of the special magic (?:numbers|uuids) for .+? is: [0-9a-f-]+\."
        pieces = re.split(needle, context)
        n_sents = sum(p.split().count("Sentence") for p in pieces)
        assert len(pieces) == len(s.depth) + 1 and all(d in DEPTHS for d in s.depth)
        assert s.haystack == sum(len(p.split()) for p in pieces)  # the first `haystack` words of the essay
        before = 0
        for depth, piece in zip(s.depth, pieces):
            before += piece.split().count("Sentence")
            assert before == int(n_sents * (depth / 100)), (index, depth)
            assert piece == "" or piece.endswith(" ") and (piece.strip() == "" or piece.rstrip().endswith("."))
        assert context.startswith(" ") == (int(n_sents * (s.depth[0] / 100)) == 0)


def test_a_short_essay_is_cycled():
    """RULER repeats the essay's words as often as the haystack needs (niah.py: ``haystack * repeats``)."""
    essay = NUMBERED_ESSAY[:120]
    s = sample("niah_single_2", 8192, essay=essay)
    (context,) = context_lines(s)
    words = re.sub(r"One of the special magic numbers for .+? is: \d{7}\.", "", context).split()
    assert s.haystack > 3 * len(essay) and words == (essay * 100)[: s.haystack]


def test_essay_defaults_to_the_embedded_corpus_and_reads_a_directory(tmp_path):
    words = rt.default_essay_words()
    assert len(" ".join(words)) >= rt.ESSAY_CHARS - 100_000 and rt.default_essay_words() is words
    (tmp_path / "b.txt").write_text("Second file.  Its\nwords.\n")
    (tmp_path / "a.txt").write_text("First file ")
    assert rt.essay_words_from_dir(tmp_path) == ["First", "file", "Second", "file.", "Its", "words.", ""]
    with pytest.raises(ValueError, match="is not a directory"):
        rt.essay_words_from_dir(tmp_path / "a.txt")


# ------------------------------------------------------------------------------------------------ VT, CWE, FWE


def test_vt_chain_is_the_answer_and_the_one_shot_example_precedes_it():
    s = sample("vt", 4096)
    header = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    assert s.input.startswith(header) and s.input.count(header) == 2
    cut = s.input.index(header, 1)
    icl, task = s.input[:cut], s.input[cut:]
    names = re.search(r", they are:  ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3})\n\n$", icl).groups()
    value = re.search(r"5 variables are assigned the value (\d{5}), they are:", icl).group(1)
    icl_lines = icl.split("\n")
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(4)]
    assert [line for line in icl_lines if line.startswith("VAR")] == chain
    assert f"Question: Find all variables that are assigned the value {value} in the text above." in icl

    lines = task.split("\n")[2:-1]
    statements = [line for line in lines if line != NOISE]
    out = s.outputs
    assert len(out) == 5 and all(re.fullmatch(r"[A-Z]{5}", v) for v in out)
    real_value = re.fullmatch(rf"VAR {out[0]} = (\d{{5}})", statements[0]).group(1)
    assert statements == [statements[0]] + [f"VAR {out[j + 1]} = VAR {out[j]} " for j in range(4)]
    assert len(lines) == s.haystack + 5
    assert task.endswith(f"\nQuestion: Find all variables that are assigned the value {real_value} in the text above.")
    assert s.answer_prefix == (" Answer: According to the chain(s) of variable assignment in the text above, 5 "
                               f"variables are assigned the value {real_value}, they are: ")
    other = sample("vt", 4096, 1)  # the same example, renamed per sample
    other_icl = other.input[: other.input.index(header, 1)]
    mask = lambda text: re.sub(r"\b[A-Z]{3}\b|\b\d{5}\b", "#", text)  # noqa: E731
    assert other_icl != icl and mask(other_icl) == mask(icl)


def numbered(text: str) -> list[str]:
    """``1. w 2. w ...`` → [w, w, ...], checking the numbering runs 1, 2, 3, ..."""
    parts = re.split(r"(?:^| )(\d+)\. ", text)
    assert parts[0] == "" and [int(n) for n in parts[1::2]] == list(range(1, len(parts) // 2 + 1))
    return parts[2::2]


@pytest.mark.parametrize("length, repeats, example_repeats", [(8192, (30, 3), (10, 3)), (2048, (6, 1), (3, 1))])
def test_cwe_counts_common_and_uncommon_words(length, repeats, example_repeats):
    s = sample("cwe", length)
    header = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
              "ones that appear most often.\n")
    question = "\nQuestion: What are the 10 most common words in the above list?"
    example, task = s.input.split(header)[1:]
    ex_list, ex_answer = example.split(question + CWE_PREFIX + " ")
    assert task.endswith(question) and s.answer_prefix == CWE_PREFIX
    for words, answer, (common, rare) in [(numbered(task.removesuffix(question)), s.outputs, repeats),
                                          (numbered(ex_list), numbered(ex_answer.removesuffix("\n")), example_repeats)]:
        counts = Counter(words)
        assert len(answer) == 10 and {w for w, c in counts.items() if c == common} == set(answer)
        assert all(c == rare for w, c in counts.items() if w not in answer)
    assert len(Counter(numbered(task.removesuffix(question)))) == s.haystack


def test_fwe_answer_is_the_three_most_frequent_coded_words():
    for length in (1024, 4096):
        s = sample("fwe", length)
        context = s.input.split("Find the three most frequently appeared coded words. ")[1].split("\nQuestion:")[0]
        counts = Counter(context.split(" "))
        assert counts.most_common(1)[0][0] == "..."
        del counts["..."]
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in counts)
        top = counts.most_common(4)
        assert [w for w, _ in top[:3]] == s.outputs and top[0][1] > top[1][1] > top[2][1] > top[3][1]
        assert s.answer_prefix == FWE_PREFIX and s.input.endswith("in the above coded text?")


# ------------------------------------------------------------------------------------------------ length budget


def check_budget(sampler: rt.RulerSampler, task: str, length: int, others: int = 3, larger: bool = True) -> None:
    """Samples 0 and 1 fit (prompt with answer prefix + tokens to generate <= length), and (``larger``) the sample's
    own draws one increment larger overflow, as do ``others`` other draws (where the increment outweighs the spread
    of key / word lengths: not CWE's)."""
    spec, inc, tok = rt.RULER_TASKS[task], sampler.incremental(task, length), sampler.tokenizer
    for index in range(2):
        s = sampler.sample(task, length, index)
        assert len(tok.encode(s.input + s.answer_prefix)) + s.tokens_to_generate <= length
        own = [sampler.rng(task, length, index)] if larger else []
        for rng in own + [random.Random(i) for i in range(others)]:
            if task == "fwe":
                vocab = rt.fwe_vocab(rng, 42, (length - 50) // 50)
                text = rt.fwe_text(42, vocab, s.haystack + inc, spec.template + spec.answer_prefix)[0]
                assert len(tok.encode(text)) + 50 >= length  # RULER's search stops at >= the budget
                continue
            text = sampler.generate(task, rng, s.haystack + inc, length)[0]
            if task == "vt":
                text = rt.randomize_icl(rng, sampler.vt_example(), 4) + "\n" + text
            assert len(tok.encode(text)) + spec.tokens_to_generate > length, index


@pytest.mark.parametrize("task, length", [("niah_single_1", 1024), ("niah_single_1", 2048), ("niah_single_1", 8192),
                                          ("niah_multikey_2", 1024), ("niah_multikey_3", 2048), ("vt", 2048),
                                          ("vt", 8192), ("cwe", 2048), ("cwe", 8192), ("fwe", 1024), ("fwe", 2048),
                                          ("niah_single_2", 8192), ("niah_multiquery", 12288)])
def test_prompt_fits_and_one_more_increment_would_not(task, length):
    check_budget(rt.RulerSampler(TOK, 42, NUMBERED_ESSAY), task, length, others=0 if task == "cwe" else 3)


def test_budget_is_counted_in_a_subword_tokenizer(tmp_path):
    """The same with a BPE tokenizer (trained here on a few standard library files), every task at 8192 tokens. FWE
    is only checked to fit: its coded words are redrawn per sample (as in RULER) and the most frequent repeat hundreds
    of times, so in subword tokens a sample's text can be shorter than the search's by more than an increment."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from data_modules.sources import stdlib_files
    from data_modules.tokenizers import build_tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train([str(p) for p in stdlib_files()[:60]], trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(tmp_path / "tokenizer.json"))
    sampler = rt.RulerSampler(build_tokenizer(str(tmp_path / "tokenizer.json")), 42)
    for task in rt.RULER_TASKS:
        check_budget(sampler, task, 8192, others=0, larger=task != "fwe")


def test_lengths_that_cannot_hold_a_task_are_refused():
    with pytest.raises(rt.RulerLengthError, match="length 2048 is too short for RULER task 'niah_single_2': with its "
                       r"smallest haystack \(500 essay words\)"):
        sample("niah_single_2", 2048)
    with pytest.raises(rt.RulerLengthError, match="needs more than the 8169 distinct wonderwords words"):
        sample("cwe", 512 * 1024)


def test_samples_are_deterministic_and_independent():
    a = sample("niah_single_1", 2048, 3)
    assert sample("niah_single_1", 2048, 3) == a
    sampler = rt.RulerSampler(TOK, 42)
    for task in ("vt", "fwe", "niah_single_1"):  # whatever was built before, sample 3 is the same
        sampler.sample(task, 2048, 0)
    assert sampler.sample("niah_single_1", 2048, 3) == a
    b, c = sample("niah_single_1", 2048, 4), sample("niah_single_1", 2048, 3, seed=7)
    assert b.input != a.input and b.outputs != a.outputs and c.input != a.input and c.outputs != a.outputs


# ------------------------------------------------------------------------------------------------ scoring


def test_postprocess_and_string_match_all_are_rulers():
    assert rs.postprocess_pred("  7654321\x00 and\t1234567.\n ") == "7654321\n and\n1234567."
    refs = [["1234567"], ["ABCDE", "FGHIJ", "KLMNO", "PQRST"], ["apple", "pear"]]
    preds = ["the number is 1234567.", "abcde, fghij", "nothing"]
    assert rs.string_match_all(preds, refs) == round((1 + 2 / 4 + 0) / 3 * 100, 2) == 50.0
    assert rs.string_match_all(["APPLE and Pear"], [["apple", "pear"]]) == 100.0
    assert rs.string_match_all(["x", "123456"], [["1234567"], ["1234567"]]) == 0.0
    assert rs.string_match_all(["a", "b", "c"], [["a"], ["a"], ["a"]]) == 33.33


def test_evaluate_scores_the_continuation_after_the_answer_prefix(monkeypatch):
    """An oracle model that writes the first half of the answers, then EOS, then the rest: 50 for 4-answer tasks
    (what follows EOS is not read), 100 for one-answer ones; predictions are kept to 200 characters."""
    built, real_sample = [], rt.RulerSampler.sample

    def spy_sample(self, *args):
        built.append(real_sample(self, *args))
        return built[-1]

    def oracle(model, prompt, n, eos_id=None, segment_size=None):
        s = built[-1]
        assert n == s.tokens_to_generate and prompt[0].tolist() == TOK.encode(s.input + s.answer_prefix).tolist()
        half = (len(s.outputs) + 1) // 2
        text = TOK.encode(" " + " ".join(s.outputs[:half]) + "." * 300).tolist() + [eos_id]
        text += TOK.encode(" ".join(s.outputs[half:])).tolist()
        return torch.cat([prompt, torch.as_tensor(text)[None]], dim=1)

    monkeypatch.setattr(rt.RulerSampler, "sample", spy_sample)
    monkeypatch.setattr(ruler, "generate", oracle)
    rows = rs.evaluate_ruler(torch.nn.Identity(), TOK, ["niah_single_1", "niah_multivalue", "vt"], [8192], 2,
                             essay_words=NUMBERED_ESSAY)
    assert [(r["task"], r["length"], r["samples"], r["score"]) for r in rows] == [
        ("niah_single_1", 8192, 2, 100.0), ("niah_multivalue", 8192, 2, 50.0), ("vt", 8192, 2, 60.0)]
    assert all(len(p) == 200 for r in rows for p in r["predictions"])
    assert rs.ruler_averages(rows) == {"per_length": {8192: 70.0}, "overall": 70.0}


# ------------------------------------------------------------------------------------------------ main.py eval


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run = fit(tmp_path_factory.mktemp("ruler"), "rs", "trainer.max_steps=2")
    return str(run / "checkpoints" / "last.ckpt")


def run_cli(ckpt, out, *args) -> dict:
    from lit_hsa.cli import main

    assert main(["eval", "--suite", "ruler", "--ckpt", ckpt, "--device", "cpu", "--out", str(out), *args]) == 0
    return json.loads((out / "ruler.json").read_text())


@pytest.mark.slow
def test_cli_writes_rows_averages_plot_and_events(ckpt, tmp_path, capsys):
    tasks = ["niah_single_1", "niah_multikey_2", "vt", "cwe", "fwe"]
    with saved_plots() as plots:
        result = run_cli(ckpt, tmp_path, "--tasks", ",".join(tasks), "--lengths", "2k,3k", "--samples", "2")
    assert [(r["task"], r["length"]) for r in result["rows"]] == [(t, n) for t in tasks for n in (2048, 3072)]
    assert all(r["samples"] == 2 and len(r["predictions"]) == 2 and 0 <= r["score"] <= 100 for r in result["rows"])
    per_length = {a["length"]: a["score"] for a in result["average_per_length"]}
    for n in (2048, 3072):
        assert per_length[n] == round(np.mean([r["score"] for r in result["rows"] if r["length"] == n]), 2)
    assert result["average"] == round(np.mean(list(per_length.values())), 2)
    lines = plots["ruler_vs_length.png"][""]  # a line per task, then the average
    assert lines == [([2048.0, 3072.0], [r["score"] for r in result["rows"] if r["task"] == t]) for t in tasks] + [
        ([2048.0, 3072.0], [per_length[2048], per_length[3072]])]
    assert scalars(tmp_path / "tb", "ruler/vt/3072") == {0: pytest.approx(result["rows"][5]["score"])}
    assert scalars(tmp_path / "tb", "ruler/average/2048") == {0: pytest.approx(per_length[2048])}
    table = capsys.readouterr().out
    assert "| task | 2048 | 3072 |" in table and "| average |" in table


@pytest.mark.slow
def test_cli_runs_every_task_by_default(ckpt, tmp_path):
    result = run_cli(ckpt, tmp_path, "--lengths", "8k", "--samples", "1")
    assert [r["task"] for r in result["rows"]] == list(YAML) and len(result["average_per_length"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--suite", "ruler", "--tasks", "niah_single_9"], "--tasks: 'niah_single_9' is not one of niah_single_1,"),
    (["--suite", "ruler", "--depths", "0.5"], "--depths does not apply to --suite ruler"),
    (["--suite", "ruler", "--ppl-length", "1k"], "--ppl-length does not apply to --suite ruler"),
    (["--suite", "ruler", "--tasks", "niah_single_2", "--lengths", "2k"],
     "--lengths: length 2048 is too short for RULER task 'niah_single_2'"),
    (["--suite", "ruler", "--lengths", "4q"], "--lengths: bad length '4q'"),
    (["--suite", "ruler", "--essay-dir", "/no/such/dir"], "--essay-dir: '/no/such/dir' is not a directory"),
    (["--essay-dir", "."], "--essay-dir applies to --suite ruler"),
])
def test_cli_bad_input_is_one_line(ckpt, tmp_path, capsys, args, message):
    from lit_hsa.cli import main

    assert main(["eval", "--ckpt", ckpt, "--device", "cpu", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()
