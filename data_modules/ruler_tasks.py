"""RULER's synthetic tasks (NVIDIA/RULER ``scripts/data/synthetic`` at c3f5e3b) rebuilt offline for any tokenizer:
the samples ``main.py eval --suite ruler`` scores (``lit_hsa/eval/ruler_suite.py``) and, with
``data.synthetic_format: ruler``, training windows in the same format.

The 11 tasks of ``scripts/synthetic.yaml`` — niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue,
niah_multiquery, vt, cwe, fwe — are generated as RULER's scripts generate them, with the ``base`` model template:
the same templates and answer prefixes word for word (``constants.py``; NIAH's singular rewrite when one value is
asked for), the same needle sentence, keys and values (7-digit numbers; adjective-noun words from wonderwords 2.2.0's
lists, vendored in ``ruler_words/``; uuids ``uuid.UUID(int=rng.getrandbits(128), version=4)``), the same noise,
essay and distractor-needle haystacks and insertion rules (noise and needle haystacks: at random unit indices, one
unit per line; essay: at sentence boundaries, at depths drawn from RULER's 40 ``DEPTHS``), VT's chains and its
one-shot example (re-randomised per sample), CWE's numbered list with its one-shot example, FWE's Zipf-distributed
coded words, the same order of random draws within a sample, and the same length budget, counted in the evaluated
model's tokenizer: prompt (answer prefix included) + ``tokens_to_generate`` <= length, the haystack size found by
RULER's binary search (FWE: its linear search) and shrunk per sample by RULER's increment until the sample fits.

Randomness: RULER seeds Python's (and numpy's) global generator once per task script, so a sample depends on every
draw before it, the search's probes included. Here every sample has its own ``random.Random`` seeded from (seed,
task, length, sample index), so a sample is the same whatever else is evaluated; the haystack search has its own
(seed, task, length) generator and VT's one-shot example a (seed) one. RULER's fresh ``random.Random(random_seed)``
shuffles (NIAH's needle order, CWE's word lists, FWE's vocabulary and text) use ``random.Random(seed)`` as there:
with ``seed=42`` (RULER's default) they are RULER's permutations. VT's values, drawn by numpy's legacy
``np.random.randint(10000, 99999)`` in RULER, come from the sample's generator over the same range (10000..99998).

Deviations (all forced by being offline and dependency-free):

- (a) no NLTK: essay sentences are split by ``split_sentences``, after ``.``, ``!`` or ``?`` followed by whitespace
  (Punkt also handles abbreviations, initials and quotes, so sentence counts, and the needle positions a depth
  gives, differ somewhat).
- (b) the essay haystack is not Paul Graham's essays (not redistributable, needs network) but text the caller gives:
  by default the project's embedded corpus, the Python standard library's source files in sorted order up to
  ``ESSAY_CHARS`` whitespace-collapsed characters (about the size of RULER's ``PaulGrahamEssays.json``), or the
  files of a directory (``main.py eval --essay-dir``); files are concatenated as RULER's download script does (no
  separator) and whitespace-collapsed as RULER does: ``re.sub(r'\\s+', " ", text).split(" ")``.
- (c) CWE's fallback word list ``english_words.json`` (an 8.5 MB Git-LFS file, used when a length needs more than
  the 8,169 wonderwords nouns + adjectives + verbs, around 128K tokens) is unavailable: such a length is a
  ``ValueError``.
- VT's one-shot example must fit in 500 tokens with its smallest haystack (5 noise lines); where it cannot (a
  byte-level tokenizer), RULER retries forever, and here the 5-line example is used as it is. A VT name collision
  (probability ~1e-6, ~6e-4 for the example's 3-letter names; RULER's slicing then fails, and the sample is drawn
  again or the script stops) redraws the names. A length too short for a task's smallest haystack (where RULER
  loops forever) is a ``RulerLengthError`` (a ``ValueError``). FWE supports ``alpha`` 2 only (RULER's value;
  ``scipy.special.zeta(2.0) == pi**2 / 6`` to the last bit, so no scipy).
"""
from __future__ import annotations

import math
import random
import re
import string
import uuid
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .sources import DataError
from .synthetic import TaskSample

WORDS_DIR = Path(__file__).parent / "ruler_words"
ESSAY_CHARS = 3_100_000  # RULER's PaulGrahamEssays.json holds about 3.1M characters of (prose) text

# scripts/data/synthetic/constants.py, verbatim (the prompt is template + answer_prefix)
CONSTANTS = {
    "niah": dict(
        tokens_to_generate=128,
        template="Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
        "{type_needle_v} for {query} mentioned in the provided text?",
        answer_prefix=" The special magic {type_needle_v} for {query} mentioned in the provided text are"),
    "variable_tracking": dict(
        tokens_to_generate=30,
        template="Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        answer_prefix=" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
        "are assigned the value {query}, they are: "),
    "common_words_extraction": dict(
        tokens_to_generate=120,
        template="Below is a numbered list of words. In these words, some appear more often than others. Memorize "
        "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        answer_prefix=" Answer: The top 10 words that appear most often in the list are:"),
    "freq_words_extraction": dict(
        tokens_to_generate=50,
        template="Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots "
        "'....'. What are the three most frequently appeared words in the above coded text?",
        answer_prefix=" Answer: According to the coded text above, the three most frequently appeared words are:"),
}


@dataclass(frozen=True)
class RulerTask:
    generator: str  # RULER's script: niah | variable_tracking | common_words_extraction | freq_words_extraction
    args: dict  # the task's ``args`` in scripts/synthetic.yaml (script defaults are the generators' keywords)
    template: str
    answer_prefix: str
    tokens_to_generate: int


def _task(generator: str, **args) -> RulerTask:
    c = CONSTANTS[generator]
    return RulerTask(generator, args, c["template"], c["answer_prefix"], c["tokens_to_generate"])


def _niah(type_haystack: str, type_needle_k: str, type_needle_v: str, k: int = 1, v: int = 1, q: int = 1):
    return _task("niah", type_haystack=type_haystack, type_needle_k=type_needle_k, type_needle_v=type_needle_v,
                 num_needle_k=k, num_needle_v=v, num_needle_q=q)


RULER_TASKS: dict[str, RulerTask] = {  # scripts/synthetic.yaml
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", k=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", v=4),
    "niah_multiquery": _niah("essay", "words", "numbers", q=4),
    "vt": _task("variable_tracking", type_haystack="noise", num_chains=1, num_hops=4),
    "cwe": _task("common_words_extraction", freq_cw=30, freq_ucw=3, num_cw=10),
    "fwe": _task("freq_words_extraction", alpha=2.0),
}

class RulerLengthError(ValueError):
    """A length that cannot hold a task: shorter than its smallest haystack, or (CWE) longer than its words allow."""


NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACK_UNITS = {"noise": "noise lines", "needle": "distractor needles", "essay": "essay words", "words": "words"}
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]  # percent; int() as RULER's astype


# ------------------------------------------------------------------------------------------------ word lists


def read_word_list(name: str) -> list[str]:
    """wonderwords' ``_get_words_from_text_file``: every line of ``ruler_words/<name>``, right-stripped."""
    with open(WORDS_DIR / name, encoding="utf-8") as f:
        return [line.rstrip() for line in f.readlines()]


class AdjNounWords(Sequence):
    """``sorted(set(f"{adj}-{noun}" for adj in adjs for noun in nouns))`` (niah.py's key words: 6,175,260 of them
    with wonderwords 2.2.0) as a sequence, without building its strings: the keys of different adjectives compare
    as ``adj + "-"`` does, so each adjective owns one run of ``len(nouns)`` keys in noun order, unless ``adj + "-"``
    starts another adjective's (``well-`` / ``well-off-``): those few runs interleave and are built and sorted."""

    def __init__(self, adjs: list[str], nouns: list[str]):
        self.nouns = sorted(set(nouns))
        groups: list[list[str]] = []
        for adj in sorted(set(adjs), key=lambda a: a + "-"):  # a prefix's extensions follow it directly
            if groups and (adj + "-").startswith(groups[-1][0] + "-"):
                groups[-1].append(adj)
            else:
                groups.append([adj])
        self.starts, self.blocks, size = [], [], 0
        for group in groups:
            block = group[0] if len(group) == 1 else sorted({f"{a}-{n}" for a in group for n in self.nouns})
            self.starts.append(size)
            self.blocks.append(block)
            size += len(self.nouns) if len(group) == 1 else len(block)
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < self.size:
            raise IndexError(i)
        b = bisect_right(self.starts, i) - 1
        block, j = self.blocks[b], i - self.starts[b]
        return f"{block}-{self.nouns[j]}" if isinstance(block, str) else block[j]


@lru_cache(maxsize=1)
def niah_words() -> AdjNounWords:
    return AdjNounWords(read_word_list("adjectivelist.txt"), read_word_list("nounlist.txt"))


@lru_cache(maxsize=4)
def cwe_words(seed: int) -> list[str]:
    """common_words_extraction.py's ``words``: the unique nouns + adjectives + verbs (8,169), sorted, then shuffled
    by ``random.Random(seed)``."""
    words = sorted(set(read_word_list("nounlist.txt") + read_word_list("adjectivelist.txt")
                       + read_word_list("verblist.txt")))
    random.Random(seed).shuffle(words)
    return words


# ------------------------------------------------------------------------------------------------ essay haystack


def essay_words_from_text(text: str) -> list[str]:
    """RULER's essay haystack: whitespace runs collapsed to one space, split on spaces (``num_haystack`` counts
    these words)."""
    return re.sub(r"\s+", " ", text).split(" ")


def read_files(files: list[Path], limit: int | None = None) -> str:
    """The files' text (UTF-8, bad bytes replaced) concatenated without separator, as RULER's download script joins
    the essays; stops after the file that brings the whitespace-collapsed text to ``limit`` characters."""
    texts, size = [], 0
    for f in files:
        texts.append(f.read_text(encoding="utf-8", errors="replace"))
        size += len(re.sub(r"\s+", " ", texts[-1]))
        if limit is not None and size >= limit:
            break
    return "".join(texts)


@lru_cache(maxsize=1)
def default_essay_words() -> list[str]:
    """The embedded corpus as essay: the standard library's source files (sorted) up to ``ESSAY_CHARS`` characters
    once whitespace-collapsed."""
    from data_modules.sources import stdlib_files

    return essay_words_from_text(read_files(stdlib_files(), ESSAY_CHARS))


def essay_words_from_dir(path: str | Path) -> list[str]:
    """Every file under ``path`` (recursively, sorted by path) as one essay; ``ValueError`` if there is no text."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"'{path}' is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    text = read_files(files)
    if not text.strip():
        raise ValueError(f"'{path}' holds no text" + ("" if files else " (no files)"))
    return essay_words_from_text(text)


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (in place of NLTK's ``sent_tokenize``): split after ``.``, ``!`` or ``?`` followed by
    whitespace; the separating whitespace is dropped, so on whitespace-collapsed text ``" ".join`` undoes it."""
    return [s for s in SENTENCE_END.split(text.strip()) if s]


# ------------------------------------------------------------------------------------------------ generators
# Each returns (prompt with the answer prefix, outputs, needle depths or None), as RULER's generate_input_output.


def random_value(rng: random.Random, kind: str) -> str:
    """niah.py's ``generate_random``: numbers | words | uuids."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return rng.choice(niah_words())
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type '{kind}'")


def singular(template: str) -> str:
    """niah.py's rewrite of the template when one value is asked for (``type_needle_v`` loses its "s" too)."""
    return template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def niah(rng: random.Random, seed: int, num_haystack: int, template: str, essay_words: list[str] | None,
         type_haystack: str, type_needle_k: str, type_needle_v: str, num_needle_k: int = 1, num_needle_v: int = 1,
         num_needle_q: int = 1) -> tuple[str, list[str], list[int] | None]:
    """niah.py's generate_input_output: ``num_haystack`` noise sentences / distractor needles (one per line) or
    essay words. Depths (essay only): the drawn percents, sorted, the i-th needle in text order at the i-th."""
    num_needle_k = max(num_needle_k, num_needle_q)
    keys, values, needles = [], [], []
    for _ in range(num_needle_k):
        keys.append(random_value(rng, type_needle_k))
        value = []
        for _ in range(num_needle_v):
            value.append(random_value(rng, type_needle_v))
            needles.append(NEEDLE.format(type_needle_v=type_needle_v, key=keys[-1], value=value[-1]))
        values.append(value)
    random.Random(seed).shuffle(needles)

    depths = None
    if type_haystack == "essay":
        if essay_words is None:
            raise ValueError("an essay haystack needs essay words")
        repeats = (num_haystack + len(essay_words) - 1) // len(essay_words)  # cycled where the essay is too short
        text = " ".join((essay_words * repeats)[:num_haystack] if repeats > 1 else essay_words[:num_haystack])
        sents = split_sentences(text)
        depths = sorted(rng.sample(DEPTHS, len(needles)))  # RULER sorts the positions: the same order
        positions = [0] + [int(len(sents) * (d / 100)) for d in depths] + [len(sents)]
        parts = []
        for i in range(1, len(positions)):
            parts.append(" ".join(sents[positions[i - 1] : positions[i]]))
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
        context = " ".join(parts)
    else:
        if type_haystack == "noise":
            sentences = [NOISE] * num_haystack
        elif type_haystack == "needle":
            sentences = [NEEDLE.format(type_needle_v=type_needle_v, key=random_value(rng, type_needle_k),
                                       value=random_value(rng, type_needle_v)) for _ in range(num_haystack)]
        else:
            raise ValueError(f"unknown haystack '{type_haystack}'")
        # descending indices of the original haystack: the needles' text order is the reverse of the list's
        for index, element in zip(sorted(rng.sample(range(num_haystack), len(needles)), reverse=True), needles):
            sentences.insert(index, element)
        context = "\n".join(sentences)

    indices = rng.sample(range(num_needle_k), num_needle_q)
    queries = [keys[i] for i in indices]
    answers = [a for i in indices for a in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    if num_needle_q * num_needle_v == 1:
        template, type_needle_v = singular(template), type_needle_v[:-1]
    return template.format(type_needle_v=type_needle_v, context=context, query=query), answers, depths


def generate_chains(rng: random.Random, num_chains: int, num_hops: int, is_icl: bool = False):
    """variable_tracking.py's chains → (names per chain, statements per chain): 5-letter names (3 in the one-shot
    example, whose value is the literal 12345), ``VAR X = 12345`` then ``VAR Y = VAR X `` per hop."""
    k = 5 if not is_icl else 3
    num_hops = num_hops if not is_icl else min(10, num_hops)
    n = (num_hops + 1) * num_chains
    while True:  # RULER appends on a collision, and its slicing then fails: that sample is drawn again
        vars_all = ["".join(rng.choices(string.ascii_uppercase, k=k)).upper() for _ in range(n)]
        if len(set(vars_all)) == n:
            break
    vars_ret, chains_ret = [], []
    for i in range(0, len(vars_all), num_hops + 1):
        this_vars = vars_all[i : i + num_hops + 1]
        vars_ret.append(this_vars)
        value = 12345 if is_icl else rng.randrange(10000, 99999)  # RULER: np.random.randint(10000, 99999)
        this_chain = [f"VAR {this_vars[0]} = {value}"]
        for j in range(num_hops):
            this_chain.append(f"VAR {this_vars[j + 1]} = VAR {this_vars[j]} ")
        chains_ret.append(this_chain)
    return vars_ret, chains_ret


def variable_tracking(rng: random.Random, num_noises: int, template: str, type_haystack: str = "noise",
                      num_chains: int = 1, num_hops: int = 4, is_icl: bool = False) -> tuple[str, list[str], None]:
    """variable_tracking.py's generate_input_output over the noise haystack (the yaml's; RULER's essay variant is not
    built): each chain's statements at sorted random line positions, in chain order."""
    if type_haystack != "noise":
        raise ValueError(f"vt: only the noise haystack is built, not '{type_haystack}'")
    vars_, chains = generate_chains(rng, num_chains, num_hops, is_icl)
    value = chains[0][0].split("=")[-1].strip()
    sentences = [NOISE] * num_noises
    for chain in chains:
        positions = sorted(rng.sample(range(len(sentences)), len(chain)))
        for insert_pi, j in zip(positions, range(len(chain))):
            sentences.insert(insert_pi + j, chain[j])
    context = "\n".join(sentences).replace(". \n", ".\n")
    return template.format(context=context, query=value, num_v=num_hops + 1), vars_[0], None


def randomize_icl(rng: random.Random, icl_example: str, num_hops: int) -> str:
    """variable_tracking.py's per-sample renaming of the one-shot example: each answer name (the last num_hops + 1
    words) replaced everywhere by fresh letters, the value 12345 by a fresh number."""
    for item in icl_example.strip().split()[-num_hops - 1 :]:
        icl_example = icl_example.replace(item, "".join(rng.choices(string.ascii_uppercase, k=len(item))).upper())
    return icl_example.replace("12345", str(rng.randrange(10000, 99999)))


def cwe_example(rng: random.Random, seed: int, words: list[str], num_words: int, common_repeats: int = 30,
                uncommon_repeats: int = 3, common_nums: int = 10) -> tuple[str, list[str]]:
    """common_words_extraction.py's get_example: ``num_words`` distinct words, the first ``common_nums`` repeated
    ``common_repeats`` times, the rest ``uncommon_repeats`` times, shuffled, as ``1. w 2. w ...``."""
    if num_words > len(words):  # RULER samples from english_words.json here (deviation (c))
        raise ValueError(f"needs {num_words} distinct words, more than the {len(words)} of wonderwords")
    word_list_full = rng.sample(words, num_words)
    common, uncommon = word_list_full[:common_nums], word_list_full[common_nums:]
    word_list = common * int(common_repeats) + uncommon * int(uncommon_repeats)
    random.Random(seed).shuffle(word_list)
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(word_list)), common


def common_words_extraction(rng: random.Random, seed: int, num_words: int, template: str, length: int,
                            freq_cw: int = 30, freq_ucw: int = 3, num_cw: int = 10,
                            num_fewshot: int = 1) -> tuple[str, list[str], None]:
    """common_words_extraction.py's generate_input_output: one-shot example(s) (template, answer prefix and the
    answer), a newline, then the task; below 4096 tokens with smaller repeats."""
    words = cwe_words(seed)
    few_shots = []
    if length < 4096:
        for _ in range(num_fewshot):
            few_shots.append(cwe_example(rng, seed, words, 20, 3, 1, num_cw))
        context, answer = cwe_example(rng, seed, words, num_words, 6, 1, num_cw)
    else:
        for _ in range(num_fewshot):
            few_shots.append(cwe_example(rng, seed, words, 40, 10, 3, num_cw))
        context, answer = cwe_example(rng, seed, words, num_words, freq_cw, freq_ucw, num_cw)
    shots = [template.format(num_cw=num_cw, context=c, query="") + " "
             + " ".join(f"{i + 1}. {word}" for i, word in enumerate(a)) for c, a in few_shots]
    return "\n".join(shots) + "\n" + template.format(num_cw=num_cw, context=context, query=""), answer, None


def fwe_vocab(rng: random.Random, seed: int, vocab_size: int, coded_wordlen: int = 6) -> list[str]:
    """freq_words_extraction.py's vocabulary: distinct random lowercase words, sorted, shuffled by
    ``random.Random(seed)``; rank 1 becomes the noise word ``...``."""
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)) for _ in range(vocab_size)]
    while len(set(vocab)) < vocab_size:
        vocab.append("".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)))
    vocab = sorted(set(vocab))
    random.Random(seed).shuffle(vocab)
    vocab[0] = "..."
    return vocab


def fwe_text(seed: int, vocab: list[str], num_words: int, template: str, alpha: float = 2.0) -> tuple[str, list[str]]:
    """freq_words_extraction.py's gen_text: the word of rank k ``int(num_words · k^-alpha / zeta(alpha))`` times,
    shuffled by ``random.Random(seed)``; the answer is ranks 2-4."""
    if alpha != 2.0:
        raise ValueError(f"fwe: only alpha 2.0 (RULER's) is supported, got {alpha}")
    k = np.arange(1, len(vocab) + 1)
    sampled_cnt = num_words * (k**-alpha) / (math.pi**2 / 6)
    sampled_words = [x for w, zi in zip(vocab, sampled_cnt.astype(int)) for x in [w] * zi]
    random.Random(seed).shuffle(sampled_words)
    return template.format(context=" ".join(sampled_words), query=""), vocab[1:4]


# ------------------------------------------------------------------------------------------------ samples


@dataclass
class RulerSample:
    task: str
    length: int
    index: int
    input: str  # the prompt without the answer prefix (RULER's ``input``)
    answer_prefix: str  # the model continues ``input + answer_prefix``
    outputs: list[str]  # the reference answers
    tokens_to_generate: int
    depth: list[int] | None = None  # essay NIAH: the needles' percent depths (from DEPTHS), in text order
    haystack: int = 0  # noise / needle lines, essay words, CWE distinct words or FWE's nominal word count


class RulerSampler:
    """Builds RULER samples for one tokenizer and seed: the haystack size per (task, length) is searched once (as
    RULER does per task script run), VT's one-shot example is built once."""

    def __init__(self, tokenizer, seed: int = 42, essay_words: list[str] | None = None):
        self.tokenizer, self.seed, self._essay = tokenizer, seed, essay_words
        self._sizes: dict[tuple[str, int], int] = {}
        self._icl: str | None = None

    def n_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    @property
    def essay_words(self) -> list[str]:
        if self._essay is None:
            self._essay = default_essay_words()
        return self._essay

    def generate(self, task: str, rng: random.Random, size: int, length: int):
        """RULER's generate_input_output of ``task`` (not FWE) with a haystack of ``size``; VT without its example."""
        spec = RULER_TASKS[task]
        template = spec.template + spec.answer_prefix
        if spec.generator == "niah":
            essay = self.essay_words if spec.args["type_haystack"] == "essay" else None
            return niah(rng, self.seed, size, template, essay, **spec.args)
        if spec.generator == "variable_tracking":
            return variable_tracking(rng, size, template, **spec.args)
        return common_words_extraction(rng, self.seed, size, template, length, **spec.args)

    @staticmethod
    def incremental(task: str, length: int) -> int:
        """RULER's haystack step (the search's lower bound, the per-sample shrink step)."""
        spec = RULER_TASKS[task]
        if spec.generator == "common_words_extraction":
            return 10
        if spec.generator == "freq_words_extraction":
            return (length - spec.tokens_to_generate) // 32
        essay = spec.args["type_haystack"] == "essay"
        if essay:
            return 500
        if length < 4096:
            return 5
        return 25 if spec.generator == "niah" else 10

    def vt_example(self) -> str:
        """variable_tracking.py's one-shot example (``input`` with its answer prefix, a space, the names, a newline):
        3-letter names, value 12345, the most noise lines (steps of 5) that keep it within 500 tokens."""
        if self._icl is None:
            spec = RULER_TASKS["vt"]
            rng = random.Random(f"{self.seed}/vt/icl")
            make = lambda n: variable_tracking(rng, n, spec.template + spec.answer_prefix, **spec.args,  # noqa: E731
                                               is_icl=True)[0]
            size = self._search(make, 5, int((500 / (self.n_tokens(make(5)) / 5)) * 3), 500, 0) or 5
            while True:
                text, outputs, _ = variable_tracking(rng, size, spec.template + spec.answer_prefix, **spec.args,
                                                     is_icl=True)
                if self.n_tokens(text) <= 500 or size <= 5:  # RULER retries forever at 5 (deviation)
                    break
                size -= 5
            self._icl = text + " " + " ".join(outputs) + "\n"
        return self._icl

    def _search(self, make, incremental: int, estimate: int, budget: int, extra: int, cap: int | None = None):
        """RULER's binary search: the largest size in [incremental, max(estimate, 2 · incremental)] (and <= cap)
        whose probe ``make(size)`` takes ``<= budget - extra`` tokens; None when none does."""
        lo, hi = incremental, max(estimate, incremental * 2)
        hi = hi if cap is None else min(hi, cap)
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            if self.n_tokens(make(mid)) + extra <= budget:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        return best

    def haystack_size(self, task: str, length: int) -> int:
        """The haystack size RULER's search finds for (task, length); ``ValueError`` if the smallest is too long."""
        if (task, length) in self._sizes:
            return self._sizes[(task, length)]
        spec = RULER_TASKS[task]
        rng = self.rng(task, length, "search")
        ttg, inc = spec.tokens_to_generate, self.incremental(task, length)
        if spec.generator == "freq_words_extraction":
            size = self._fwe(rng, length, -1)[2]
        else:
            make = lambda n: self.generate(task, rng, n, length)[0]  # noqa: E731
            extra = ttg + (self.n_tokens(self.vt_example()) if spec.generator == "variable_tracking" else 0)
            if spec.generator == "common_words_extraction":  # RULER's estimates of the search's upper bound
                cap = len(cwe_words(self.seed))
                estimate = int(length // (self.n_tokens(make(4096)) / 4096)) * 2
            else:
                cap = None
                estimate = int((length / (self.n_tokens(make(inc)) / inc)) * 3)
            size = self._search(make, inc, estimate, length, extra, cap)
            if size is None:
                unit = HAYSTACK_UNITS[spec.args.get("type_haystack", "words")]
                raise RulerLengthError(f"length {length} is too short for RULER task '{task}': with its smallest "
                                       f"haystack ({inc} {unit}) the prompt and the {ttg} tokens to generate take "
                                       f"{self.n_tokens(make(inc)) + extra} tokens")
            if cap is not None and size == cap:
                raise RulerLengthError(f"length {length} is too long for RULER task '{task}' offline: it needs more "
                                       f"than the {cap} distinct wonderwords words (RULER then draws from "
                                       "english_words.json)")
        self._sizes[(task, length)] = size
        return size

    def _fwe(self, rng: random.Random, length: int, num_words: int) -> tuple[str, list[str], int]:
        """freq_words_extraction.py's generate_input_output within ``length - tokens_to_generate`` tokens:
        ``num_words`` -1 grows from ``max_len // 6`` by ``max_len // 32`` until the budget is reached and steps back
        once; a given ``num_words`` shrinks by that step until the prompt fits."""
        spec = RULER_TASKS["fwe"]
        template, alpha = spec.template + spec.answer_prefix, spec.args["alpha"]
        max_len = length - spec.tokens_to_generate
        incremental = max_len // 32
        if incremental < 1:
            raise RulerLengthError(f"length {length} is too short for RULER task 'fwe'")
        vocab = fwe_vocab(rng, self.seed, max_len // 50)
        if num_words > 0:
            text, answer = fwe_text(self.seed, vocab, num_words, template, alpha)
            while self.n_tokens(text) > max_len:
                if num_words <= 0:  # no coded words left and still too long: RULER loops forever
                    raise RulerLengthError(f"length {length} is too short for RULER task 'fwe': its prompt takes "
                                     f"{self.n_tokens(text)} tokens, more than {max_len}")
                num_words -= incremental
                text, answer = fwe_text(self.seed, vocab, num_words, template, alpha)
        else:
            num_words = max_len // 6
            text, answer = fwe_text(self.seed, vocab, num_words, template, alpha)
            while self.n_tokens(text) < max_len:
                num_words += incremental
                text, answer = fwe_text(self.seed, vocab, num_words, template, alpha)
            num_words -= incremental
        text, answer = fwe_text(self.seed, vocab, num_words, template, alpha)
        return text, answer, num_words

    def rng(self, task: str, length: int, index: int | str) -> random.Random:
        """The generator of sample ``index`` (or of the haystack search, index "search")."""
        return random.Random(f"{self.seed}/{task}/{length}/{index}")

    def sample(self, task: str, length: int, index: int) -> RulerSample:
        """Sample ``index`` of (task, length): deterministic given the seed, whatever else is built."""
        spec, rng = RULER_TASKS[task], self.rng(task, length, index)
        size, depth = self.haystack_size(task, length), None
        if spec.generator == "freq_words_extraction":
            text, outputs, size = self._fwe(rng, length, size)
        else:
            inc = self.incremental(task, length)
            while True:
                text, outputs, depth = self.generate(task, rng, size, length)
                if spec.generator == "variable_tracking":
                    text = randomize_icl(rng, self.vt_example(), spec.args["num_hops"]) + "\n" + text
                if self.n_tokens(text) + spec.tokens_to_generate <= length:
                    break
                if size <= inc:
                    raise RulerLengthError(f"length {length} is too short for RULER task '{task}' (sample {index})")
                size -= inc
        cut = text.rfind(spec.answer_prefix[:10])  # RULER splits the prompt at the answer prefix's first 10 chars
        return RulerSample(task, length, index, text[:cut], text[cut:], outputs, spec.tokens_to_generate, depth, size)


def build_ruler_sample(task: str, length: int, index: int, seed: int, tokenizer,
                       essay_words: list[str] | None = None) -> RulerSample:
    """Sample ``index`` of RULER task ``task`` within ``length`` tokens of ``tokenizer``. ``essay_words``: the
    essay haystack's words (``essay_words_from_text``; None: the embedded corpus)."""
    return RulerSampler(tokenizer, seed, essay_words).sample(task, length, index)


# ------------------------------------------------------------------------------------------------ training windows


class RulerTrainingTasks:
    """Training windows in RULER's format (``data.synthetic_format: ruler``), for the packed stream's synthetic share:
    a window becomes sample ``index`` of a RULER task at the window's length (``RulerSampler``: its haystack, its
    template and answer prefix), then the answer as RULER scores it (the references joined by ", " after a space)
    and EOS, then the window's own text to the end (the next document of a packed stream). The answer tokens and the
    EOS are the ``answer_mask``."""

    def __init__(self, tokenizer, seed: int):
        self.tokenizer = tokenizer
        self.sampler = RulerSampler(tokenizer, seed)

    def __call__(self, window: np.ndarray, rng: np.random.Generator, tasks: tuple[str, ...]) -> TaskSample:
        """A task drawn uniformly from ``tasks``, a sample index from ``rng``: deterministic given its state."""
        task = tasks[int(rng.integers(len(tasks)))]
        return self.sample(task, window, int(rng.integers(2**31)))

    def sample(self, task: str, window: np.ndarray, index: int) -> TaskSample:
        """Sample ``index`` of ``task`` as a training window of ``len(window)`` tokens (ValueError: it cannot fit)."""
        length = len(window)
        sample = self.sampler.sample(task, length, index)
        prompt = self._encode(sample.input + sample.answer_prefix)
        answer = np.concatenate([self._encode(" " + ", ".join(sample.outputs)),
                                 np.array([self.tokenizer.eos_id], dtype=np.int32)])
        rest = length - len(prompt) - len(answer)
        if rest < 0:
            raise ValueError(f"RULER task '{task}' at {length} tokens: its answer ({len(answer)} tokens with EOS) "
                             f"does not fit after its prompt ({len(prompt)} tokens)")
        tokens = np.concatenate([prompt, answer, window[:rest].astype(np.int32)])
        mask = np.zeros(length, dtype=bool)
        mask[len(prompt):len(prompt) + len(answer)] = True
        return TaskSample(tokens, mask, len(prompt), list(sample.outputs), task, None, length)

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text), dtype=np.int32)


def check_ruler_tasks_fit(tasks, length: int, tokenizer, seed: int) -> None:
    """Raise ``DataError`` naming the first RULER task that cannot make a training window of ``length`` tokens (once
    up front, not in a dataloader worker mid-run)."""
    maker, filler = RulerTrainingTasks(tokenizer, seed), np.zeros(length, dtype=np.int32)
    for task in tasks:
        try:
            maker.sample(task, filler, 0)
        except ValueError as e:
            raise DataError(f"data.synthetic_tasks: {e}; raise data.seq_len or drop the task") from None
