"""RULER-style synthetic retrieval tasks over real haystack text (spec §5–§6).

One generator serves two users:

* **training**: a small fraction of packed windows is turned into a task built over the window's own text
  (spec §5: the authors pick uniformly from single NIAH, multi-query NIAH and variable tracking), with
  ``answer_mask`` available for answer-only loss;
* **evaluation**: the same tasks at lengths from 1K to millions of tokens, needle depth swept over 0–100 %;
  the evaluator feeds ``tokens[:prompt_len]``, generates, and calls :func:`score`.

Layout of every NIAH / VT sample (``length`` tokens exactly)::

    [ haystack text with needles inserted ][ question ][ answer (+ EOS) ]
                                                       ^ prompt_len

``self_copy`` is ``[ x ][ separator ][ x ]`` with the second copy as the answer.

All text pieces are built with ``tokenizer.encode`` and joined as token arrays, so any tokenizer with
``encode(str) -> ids``, ``decode(ids) -> str`` and ``eos_id`` works; nothing assumes byte-level ids. The haystack is
filled with one ``np.resize`` and the sample with one ``np.concatenate``: the cost is O(length) numpy work plus a
few Python operations per needle, so million-token samples take milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sources import DataError

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "self_copy")
# The authors' small-scale recipe mixes these three into pre-training (spec §5).
TRAINING_TASKS = ("niah_single", "niah_multiquery", "vt")

# One fixed template per task. Needles start and end with a newline so they read as lines of their own.
NIAH_NEEDLE = "\nThe special magic number for {key} is: {value}.\n"
NIAH_QUESTION = "\nWhat is the special magic number for {key}? Answer: "
MULTIVALUE_NEEDLE = "\nOne of the special magic numbers for {key} is: {value}.\n"
MULTIVALUE_QUESTION = "\nWhat are all the special magic numbers for {key}? Answer: "
MULTIQUERY_QUESTION = "\nWhat are the special magic numbers for {keys}? Answer: "
VT_ASSIGN_VALUE = "\nVAR {name} = {value}\n"
VT_ASSIGN_VAR = "\nVAR {name} = VAR {source}\n"
VT_QUESTION = "\nWhich variables are assigned the value {value}? Answer: "
COPY_SEPARATOR = "\n\nRepeat the text above:\n"
ANSWER_SEPARATOR = ", "  # several answers are written "a, b, c"

_COMMON_OPTIONS = {"append_eos": False, "key_type": "word", "snap": 32}
_TASK_OPTIONS: dict[str, dict] = {
    "niah_single": {**_COMMON_OPTIONS, "value_digits": 8},
    "niah_multikey": {**_COMMON_OPTIONS, "value_digits": 8, "num_keys": 4},
    "niah_multivalue": {**_COMMON_OPTIONS, "value_digits": 8, "num_values": 4},
    "niah_multiquery": {**_COMMON_OPTIONS, "value_digits": 8, "num_pairs": 6, "num_queries": 2},
    "vt": {"append_eos": False, "snap": 32, "value_digits": 5, "num_chains": 2, "num_hops": 3},
    "self_copy": {"append_eos": False, "separator": COPY_SEPARATOR},
}

# Keys are "adjective-noun" pairs (64 × 64 = 4096 distinct keys): readable, and each is several tokens long for any
# tokenizer, like RULER's word keys.
_ADJECTIVES = (
    "amber", "ancient", "bitter", "bold", "brave", "bright", "broken", "calm", "clever", "cold", "crimson", "curious",
    "dark", "distant", "dry", "eager", "early", "empty", "fading", "fierce", "gentle", "golden", "grand", "green",
    "hidden", "hollow", "humble", "icy", "idle", "jolly", "keen", "late", "lazy", "little", "lonely", "loud", "lucky",
    "misty", "modern", "narrow", "noble", "odd", "pale", "patient", "proud", "purple", "quick", "quiet", "rapid",
    "rough", "rusty", "silent", "silver", "sleepy", "smooth", "solid", "steady", "sunny", "swift", "tidy", "vast",
    "wild", "windy", "young",
)
_NOUNS = (
    "anchor", "apple", "arrow", "badger", "basket", "beacon", "bridge", "candle", "canyon", "castle", "cedar", "comet",
    "copper", "crane", "desert", "dolphin", "falcon", "feather", "forest", "fountain", "garden", "glacier", "harbor",
    "hammer", "island", "jacket", "kettle", "ladder", "lantern", "meadow", "mirror", "mountain", "needle", "orchard",
    "otter", "palace", "pebble", "pepper", "pillow", "planet", "puzzle", "quarry", "rabbit", "river", "saddle",
    "sparrow", "spider", "statue", "stone", "thunder", "ticket", "tiger", "tower", "tunnel", "valley", "violin",
    "wagon", "walnut", "window", "winter", "wizard", "yacht", "zebra", "zipper",
)


@dataclass
class TaskSample:
    """One synthetic sample.

    ``tokens``: int32 ``[length]``; ``answer_mask``: bool ``[length]``, True exactly on the answer tokens (including
    the EOS when ``append_eos``), all of them at ``tokens[prompt_len:]``. For a next-token loss on ``labels =
    tokens[1:]`` the answer-only loss mask is ``answer_mask[1:]``. ``answers``: the expected strings, in the order
    the answer writes them. ``depth``: relative position of the needle that ``depth`` places (0.0 = start of the
    haystack, 1.0 = its end, just before the question); None for ``self_copy``.
    """

    tokens: np.ndarray
    answer_mask: np.ndarray
    prompt_len: int
    answers: list[str]
    task: str
    depth: float | None
    length: int


@dataclass
class _Plan:
    """What a task inserts: needle token arrays with their relative positions, the question and the answer."""

    needles: list[np.ndarray]
    depths: list[float]  # one per needle, in [0, 1]; needles of one fact come in text order (non-decreasing)
    question: np.ndarray
    answers: list[str]
    depth: float


def make_task(task: str, haystack: np.ndarray, length: int, tokenizer, rng: np.random.Generator,
              depth: float | None = None, **options) -> TaskSample:
    """Build one ``task`` sample of exactly ``length`` tokens over ``haystack``.

    ``haystack``: 1-D integer token ids of real text, any length; it is cropped, or cycled when too short, to fill
    the room the needles, question and answer leave. ``depth`` in [0, 1] places the needle of the asked fact (its
    first needle, for multi-value / the first queried key / the first statement of the asked VT chain); None draws
    it from ``rng``. Other needles go to random positions; with ``snap > 0`` every needle moves to just after a
    newline token of the haystack when one is within ``snap`` tokens, so needles rarely split words.

    Options (defaults): all tasks ``append_eos=False``; NIAH tasks ``key_type="word"`` (or ``"uuid"``),
    ``value_digits=8``, ``snap=32``; ``niah_multikey``: ``num_keys=4`` (the asked key plus distractors);
    ``niah_multivalue``: ``num_values=4``; ``niah_multiquery``: ``num_pairs=6``, ``num_queries=2``;
    ``vt``: ``num_chains=2``, ``num_hops=3`` (statements ``VAR A = value`` then 3 × ``VAR B = VAR A``),
    ``value_digits=5``, ``snap=32``; ``self_copy``: ``separator``.

    Deterministic given ``rng``'s state. Raises ``ValueError`` naming the bad argument.
    """
    if task not in TASKS:
        raise ValueError(f"task: unknown task '{task}' (available: {', '.join(TASKS)})")
    opts = _resolve_options(task, options)
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"length: must be a positive integer, got {length!r}")
    length = int(length)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng: must be a numpy.random.Generator, got {type(rng).__name__}")
    if depth is not None:
        if task == "self_copy":
            raise ValueError("depth: self_copy has no needle, pass depth=None")
        if not 0.0 <= float(depth) <= 1.0:
            raise ValueError(f"depth: must be in [0, 1], got {depth}")
        depth = float(depth)
    haystack = np.asarray(haystack)
    if haystack.ndim != 1 or not np.issubdtype(haystack.dtype, np.integer):
        raise ValueError(f"haystack: must be a 1-D integer token array, got shape {haystack.shape} "
                         f"dtype {haystack.dtype}")
    eos = np.array([tokenizer.eos_id] if opts["append_eos"] else [], dtype=np.int32)

    if task == "self_copy":
        return _self_copy(haystack, length, tokenizer, eos, opts["separator"])

    plan = _PLANNERS[task](tokenizer, rng, depth, opts)
    answer = np.concatenate([_encode(tokenizer, ANSWER_SEPARATOR.join(plan.answers)), eos])
    fixed = sum(len(n) for n in plan.needles) + len(plan.question) + len(answer)
    room = length - fixed
    if room < 0:
        raise ValueError(f"length: {length} tokens cannot hold task '{task}': its needles, question and answer "
                         f"take {fixed} tokens")
    if room > 0 and len(haystack) == 0:
        raise ValueError("haystack: empty, but the task needs haystack tokens to fill the length")
    filler = np.resize(haystack.astype(np.int32, copy=False), room)

    positions = _needle_positions(plan.depths, filler, tokenizer, opts["snap"])
    order = np.argsort(positions, kind="stable")
    pieces, prev = [], 0
    for i in order:
        pieces += [filler[prev:positions[i]], plan.needles[i]]
        prev = positions[i]
    pieces += [filler[prev:], plan.question, answer]
    tokens = np.concatenate(pieces).astype(np.int32, copy=False)
    assert len(tokens) == length  # room was computed from these exact pieces

    prompt_len = length - len(answer)
    answer_mask = np.zeros(length, dtype=bool)
    answer_mask[prompt_len:] = True
    return TaskSample(tokens, answer_mask, prompt_len, plan.answers, task, plan.depth, length)


def make_random_task(haystack: np.ndarray, length: int, tokenizer, rng: np.random.Generator,
                     tasks: tuple[str, ...] = TRAINING_TASKS, **options) -> TaskSample:
    """Training mix-in: a task drawn uniformly from ``tasks`` at a random depth, over ``haystack`` (typically the
    packed window's own tokens, ``length = len(window)``). ``options`` must be accepted by every task in ``tasks``.
    """
    if not tasks:
        raise ValueError("tasks: empty, name at least one of " + ", ".join(TASKS))
    task = tasks[int(rng.integers(len(tasks)))]
    return make_task(task, haystack, length, tokenizer, rng, None, **options)


def check_tasks_fit(tasks, length: int, tokenizer) -> None:
    """Raise ``DataError`` naming the first task whose needles, question and answer do not fit in ``length`` tokens
    (checked once up front instead of failing inside a dataloader worker mid-run)."""
    filler = np.asarray(tokenizer.encode("text "), dtype=np.int32)
    for task in tasks:
        try:
            make_task(task, filler, length, tokenizer, np.random.default_rng(0))
        except ValueError as e:
            raise DataError(f"data.synthetic_tasks: {e}; raise data.seq_len or drop the task") from None


def score(task_sample: TaskSample, generated_text: str) -> float:
    """RULER's string-match metric: the fraction of ``task_sample.answers`` found (case-insensitive) in
    ``generated_text``, in [0, 1]."""
    text = generated_text.lower()
    return sum(answer.lower() in text for answer in task_sample.answers) / len(task_sample.answers)


# ---------------------------------------------------------------------------------------------------------------------
# Task planners: draw keys, values and depths from rng and encode the needles and question.


def _niah_single(tokenizer, rng, depth, opts) -> _Plan:
    key = _keys(rng, 1, opts["key_type"])[0]
    value = _values(rng, 1, opts["value_digits"])[0]
    d = _depth(rng, depth)
    return _Plan([_encode(tokenizer, NIAH_NEEDLE.format(key=key, value=value))], [d],
                 _encode(tokenizer, NIAH_QUESTION.format(key=key)), [value], d)


def _niah_multikey(tokenizer, rng, depth, opts) -> _Plan:
    n = opts["num_keys"]
    keys = _keys(rng, n, opts["key_type"])
    values = _values(rng, n, opts["value_digits"])
    d = _depth(rng, depth)
    # Key 0 is asked; the others are distractors anywhere in the haystack.
    depths = [d] + list(rng.random(n - 1))
    needles = [_encode(tokenizer, NIAH_NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values)]
    return _Plan(needles, depths, _encode(tokenizer, NIAH_QUESTION.format(key=keys[0])), [values[0]], d)


def _niah_multivalue(tokenizer, rng, depth, opts) -> _Plan:
    n = opts["num_values"]
    key = _keys(rng, 1, opts["key_type"])[0]
    values = _values(rng, n, opts["value_digits"])
    depths = _ordered_depths(rng, depth, n)
    needles = [_encode(tokenizer, MULTIVALUE_NEEDLE.format(key=key, value=v)) for v in values]
    # Values are answered in the order they appear in the text (the depths are sorted).
    return _Plan(needles, depths, _encode(tokenizer, MULTIVALUE_QUESTION.format(key=key)), values, depths[0])


def _niah_multiquery(tokenizer, rng, depth, opts) -> _Plan:
    n, q = opts["num_pairs"], opts["num_queries"]
    keys = _keys(rng, n, opts["key_type"])
    values = _values(rng, n, opts["value_digits"])
    asked = [int(i) for i in rng.choice(n, size=q, replace=False)]
    depths = list(rng.random(n))
    d = _depth(rng, depth)
    depths[asked[0]] = d
    needles = [_encode(tokenizer, NIAH_NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values)]
    names = [keys[i] for i in asked]
    joined = names[0] if q == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return _Plan(needles, depths, _encode(tokenizer, MULTIQUERY_QUESTION.format(keys=joined)),
                 [values[i] for i in asked], d)


def _vt(tokenizer, rng, depth, opts) -> _Plan:
    chains, hops = opts["num_chains"], opts["num_hops"]
    names = _var_names(rng, chains * (hops + 1))
    values = _values(rng, chains, opts["value_digits"])
    needles, depths = [], []
    for c in range(chains):
        chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
        needles.append(_encode(tokenizer, VT_ASSIGN_VALUE.format(name=chain[0], value=values[c])))
        needles += [_encode(tokenizer, VT_ASSIGN_VAR.format(name=b, source=a)) for a, b in zip(chain, chain[1:])]
        # A chain is stated in order (each variable is defined before it is copied); chain 0 is asked.
        depths += _ordered_depths(rng, depth if c == 0 else None, hops + 1)
    first = names[:hops + 1]
    return _Plan(needles, depths, _encode(tokenizer, VT_QUESTION.format(value=values[0])), first, depths[0])


_PLANNERS = {"niah_single": _niah_single, "niah_multikey": _niah_multikey, "niah_multivalue": _niah_multivalue,
             "niah_multiquery": _niah_multiquery, "vt": _vt}


def _self_copy(haystack: np.ndarray, length: int, tokenizer, eos: np.ndarray, separator: str) -> TaskSample:
    """``[lead] x ‖ separator ‖ x [EOS]``: ``lead`` is one extra haystack token when the room is odd, so the two
    copies have equal length and the total is exactly ``length``."""
    sep = _encode(tokenizer, separator)
    room = length - len(sep) - len(eos)
    if room < 2:
        raise ValueError(f"length: {length} tokens cannot hold task 'self_copy': the separator and EOS take "
                         f"{len(sep) + len(eos)} tokens and each copy needs at least one")
    if len(haystack) == 0:
        raise ValueError("haystack: empty, self_copy needs text to copy")
    n, lead = room // 2, room % 2
    first = np.resize(haystack.astype(np.int32, copy=False), n + lead)
    copy = first[lead:]
    tokens = np.concatenate([first, sep, copy, eos]).astype(np.int32, copy=False)
    prompt_len = n + lead + len(sep)
    answer_mask = np.zeros(length, dtype=bool)
    answer_mask[prompt_len:] = True
    return TaskSample(tokens, answer_mask, prompt_len, [tokenizer.decode(copy)], "self_copy", None, length)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers.


def _resolve_options(task: str, options: dict) -> dict:
    allowed = _TASK_OPTIONS[task]
    for name in options:
        if name not in allowed:
            raise ValueError(f"{name}: not an option of task '{task}' (options: {', '.join(sorted(allowed))})")
    opts = {**allowed, **options}
    for name, value in opts.items():
        if name == "append_eos":
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{name}: must be True or False, got {value!r}")
        elif name == "key_type":
            if value not in ("word", "uuid"):
                raise ValueError(f"key_type: must be 'word' or 'uuid', got {value!r}")
        elif name == "separator":
            if not isinstance(value, str):
                raise ValueError(f"separator: must be a string, got {value!r}")
        else:
            low = 0 if name == "snap" else 1
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")
            opts[name] = int(value)
    if opts.get("value_digits", 1) > 18:  # values are drawn as int64
        raise ValueError(f"value_digits: at most 18, got {opts['value_digits']}")
    if task == "niah_multiquery" and opts["num_queries"] > opts["num_pairs"]:
        raise ValueError(f"num_queries: {opts['num_queries']} queries need at least as many pairs "
                         f"(num_pairs={opts['num_pairs']})")
    n_keys = {"niah_multikey": "num_keys", "niah_multiquery": "num_pairs"}.get(task)
    if n_keys and opts["key_type"] == "word" and opts[n_keys] > len(_ADJECTIVES) * len(_NOUNS):
        raise ValueError(f"{n_keys}: at most {len(_ADJECTIVES) * len(_NOUNS)} distinct word keys, "
                         f"use key_type='uuid' for more")
    return opts


def _encode(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int32).reshape(-1)


def _depth(rng: np.random.Generator, depth: float | None) -> float:
    return float(rng.random()) if depth is None else depth


def _ordered_depths(rng: np.random.Generator, depth: float | None, n: int) -> list[float]:
    """``n`` non-decreasing depths; the first is ``depth`` when given and the rest follow it."""
    if depth is None:
        return [float(x) for x in np.sort(rng.random(n))]
    return [depth] + [float(x) for x in np.sort(rng.uniform(depth, 1.0, n - 1))]


def _keys(rng: np.random.Generator, n: int, key_type: str) -> list[str]:
    """``n`` distinct keys: "adjective-noun" words, or uuid-like 8-4-4-4-12 hex strings."""
    if key_type == "word":
        picks = rng.choice(len(_ADJECTIVES) * len(_NOUNS), size=n, replace=False)
        return [f"{_ADJECTIVES[i // len(_NOUNS)]}-{_NOUNS[i % len(_NOUNS)]}" for i in picks]
    keys: list[str] = []
    while len(keys) < n:  # 128 random bits: a repeat is practically impossible, but keys must be distinct
        h = "".join("0123456789abcdef"[d] for d in rng.integers(0, 16, 32))
        key = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        if key not in keys:
            keys.append(key)
    return keys


def _values(rng: np.random.Generator, n: int, digits: int) -> list[str]:
    """``n`` distinct ``digits``-digit decimal strings (no leading zero)."""
    low = 10 ** (digits - 1) if digits > 1 else 1
    picks = rng.choice(10 ** digits - low, size=n, replace=False) + low
    return [str(int(v)) for v in picks]


def _var_names(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct 5-letter upper-case variable names, as in RULER's variable tracking."""
    picks = rng.choice(26 ** 5, size=n, replace=False)
    return ["".join(chr(65 + (int(p) // 26 ** k) % 26) for k in range(5)) for p in picks]


def _needle_positions(depths: list[float], filler: np.ndarray, tokenizer, snap: int) -> np.ndarray:
    """Insertion offsets into ``filler`` (int64 ``[n_needles]``) for relative ``depths``.

    Each offset moves to just after the nearest newline token within ``snap`` tokens (when the tokenizer encodes
    "\\n" as one token). Offsets 0 and ``len(filler)`` stay put: they are already clean boundaries. Snapping can
    move two nearby needles past each other, so offsets are made monotone in depth order afterwards, which keeps
    ordered needles (a VT chain, multi-value) in their order.
    """
    room = len(filler)
    positions = np.rint(np.asarray(depths, dtype=np.float64) * room).astype(np.int64)
    newline = _encode(tokenizer, "\n")
    if snap > 0 and len(newline) == 1 and room > 0:
        for i, p in enumerate(positions):
            if p == 0 or p == room:
                continue
            lo = max(0, int(p) - snap)
            after = np.flatnonzero(filler[lo:int(p) + snap] == newline[0]) + lo + 1
            if len(after):
                positions[i] = after[np.argmin(np.abs(after - p))]
    order = np.argsort(np.asarray(depths), kind="stable")
    positions[order] = np.maximum.accumulate(positions[order])
    return positions
