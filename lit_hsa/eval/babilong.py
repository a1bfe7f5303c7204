"""bAbI reasoning in a haystack, BABILong's protocol (arXiv 2406.10149; github booydar/babilong): stories of bAbI
tasks qa1–qa3 generated here, their facts spread over long background text, asked in BABILong's prompt, scored by
BABILong's ``compare_answers``.

- **Stories** (bAbI's world, generated rather than read from the bAbI files, which are not shipped): four people move
  between six rooms; in qa2 and qa3 they also pick up and drop three objects, which travel with whoever holds them.
  ``qa1`` (one supporting fact) asks "Where is Mary?" (the room she moved to last), ``qa2`` (two) "Where is the
  football?" (the room of whoever holds it, or where it was dropped), ``qa3`` (three) "Where was the football before
  the kitchen?" (the room it was in before it last came into the kitchen). Sentences use bAbI's verbs; the answer is a
  room (BABILong's ``TASK_LABELS``).
- **Haystack**: BABILong spreads the facts between the sentences of PG-19 books; here the background is text the
  caller gives (by default the held-out split of the training data), cut into sentences, and the facts go between
  sentences at random positions (sorted, so the story keeps its order), filling ``length`` tokens of the model's
  tokenizer: the context length, as BABILong counts it (instruction, examples and question come on top).
- **Prompt**: BABILong's ``DEFAULT_TEMPLATE`` with its qa1–qa3 instruction, examples and post-prompt, word for word
  (typos included), then ``\\nAnswer:``, so a base model continues the answer as the examples show it.
- **Score**: ``compare_answers`` as BABILong's ``metrics.py`` has it: the output lower-cased, cut at its first '.' and
  at '<context>' / '<example>'; correct iff the target is the only room named that the question does not name.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
import torch

from data_modules.ruler_tasks import split_sentences
from lit_hsa.eval.ruler import greedy_answer

TASKS = ("qa1", "qa2", "qa3")
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")  # BABILong TASK_LABELS for qa1–qa3
PEOPLE = ("Mary", "John", "Daniel", "Sandra")
OBJECTS = ("apple", "football", "milk")
MOVE = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
GET = ("got", "picked up", "grabbed", "took")
DROP = ("dropped", "discarded", "put down", "left")
FACTS = {"qa1": (2, 10), "qa2": (4, 20), "qa3": (8, 40)}  # story length range (facts), bAbI-like
MAX_NEW_TOKENS = 24  # an answer sentence ("The most recent location of Sandra is bathroom.")

TEMPLATE = "{instruction}\n{examples}\n{post_prompt}\n<context>\n{context}\n</context>\nQuestion: {question}"
PROMPTS = {  # BABILong's babilong/prompts.py DEFAULT_PROMPTS, qa1–qa3, verbatim
    "qa1": {
        "instruction":
            "I will give you context with the facts about positions of different persons hidden in some random text "
            "and a question. You need to answer the question based only on the information from the facts. "
            "If a person was in different locations, use the latest location to answer the question.",
        "examples":
            "<example>\n"
            "Charlie went to the hallway. Judith come back to the kitchen. Charlie travelled to balcony. "
            "Where is Charlie?\n"
            "Answer: The most recent location of Charlie is balcony.\n"
            "</example>\n\n"
            "<example>\n"
            "Alan moved to the garage. Charlie went to the beach. Alan went to the shop. Rouse "
            "travelled to balcony. Where is Alan?\n"
            "Answer: The most recent location of Alan is shop.\n"
            "</example>",
        "post_prompt":
            "Always return your answer in the following format: "
            "The most recent location of ’person’ is ’location’. Do not write anything else after that. ",
    },
    "qa2": {
        "instruction":
            "I give you context with the facts about locations and actions of different persons "
            "hidden in some random text and a question."
            "You need to answer the question based only on the information from the facts.\n"
            "If a person got an item in the first location and travelled to the second location "
            "the item is also in the second location. "
            "If a person dropped an item in the first location and moved to the second location "
            "the item remains in the first location.",
        "examples":
            "<example>\n"
            "Charlie went to the kitchen. Charlie got a bottle. Charlie moved to the balcony. "
            "Where is the bottle?\n"
            "Answer: The bottle is in the balcony.\n"
            "</example>\n"
            "<example>\n"
            "Alan moved to the garage. Alan got a screw driver. Alan moved to the kitchen. Where "
            "is the screw driver?\n"
            "Answer: The screw driver is in the kitchen.\n"
            "</example>",
        "post_prompt":
            "Always return your answer in the following format: The ’item’ is in ’location’. "
            "Do not write anything else after that.",
    },
    "qa3": {
        "instruction":
            "I give you context with the facts about locations and actions of different persons "
            "hidden in some random text and a question. "
            "You need to answer the question based only on the information from the facts.\n"
            "If a person got an item in the first location and travelled to the second location "
            "the item is also in the second location. "
            "If a person dropped an item in the first location and moved to the second location "
            "the item remains in the first location",
        "examples":
            "<example>\n"
            "John journeyed to the bedroom.Mary grabbed the apple. Mary went back to the bathroom. "
            "Daniel journeyed to the bedroom. Daniel moved to the garden. Mary travelled to the kitchen. "
            "Where was the apple before the kitchen?\n"
            "Answer: Before the kitchen the apple was in the bathroom.\n"
            "</example>\n"
            "<example>\n"
            "John went back to the bedroom. John went back to the garden. John went back to the kitchen. "
            "Sandra took the football. Sandra travelled to the garden. Sandra journeyed to the bedroom. "
            "Where was the football before the bedroom?\n"
            "Answer: Before the kitchen the football was in the garden.\n"
            "</example>",
        "post_prompt":
            "Always return your answer in the following format: "
            "Before the $location_1& the $item$ was in the $location_2$. Do not write anything else after that.",
    },
}


class BabilongLengthError(ValueError):
    """A context length too short to hold a story's facts."""


@dataclass
class Story:
    """A bAbI story: ``facts`` in order, the ``question``, its ``answer`` (a room) and the indices of the facts the
    answer rests on (``supporting``)."""

    facts: list[str]
    question: str
    answer: str
    supporting: list[int]


@dataclass
class BabilongSample:
    task: str
    length: int  # context tokens (facts + background)
    prompt: str
    answer: str
    question: str
    story: Story
    fact_positions: list[int]  # sentence slots of the background the facts were put in front of


class World:
    """bAbI's world, step by step: where each person is, who holds each object, where each dropped object lies, and
    the story so far."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.place: dict[str, str] = {}
        self.holder: dict[str, str] = {}  # object -> person
        self.lying: dict[str, str] = {}  # object -> room (dropped there)
        self.facts: list[str] = []
        self.history: dict[str, list[tuple[str, int]]] = {o: [] for o in OBJECTS}  # object -> [(room, fact)]
        self.last_move: dict[str, int] = {}  # person -> index of the fact that moved them last
        self.object_fact: dict[str, int] = {}  # object -> index of the last get / drop fact

    def where(self, obj: str) -> str | None:
        return self.place.get(self.holder[obj]) if obj in self.holder else self.lying.get(obj)

    def move(self) -> None:
        person = self.rng.choice(PEOPLE)
        room = self.rng.choice([r for r in LOCATIONS if r != self.place.get(person)])
        self.facts.append(f"{person} {self.rng.choice(MOVE)} the {room}.")
        self.place[person] = room
        self.last_move[person] = len(self.facts) - 1
        for obj, who in self.holder.items():
            if who == person:
                self.note(obj)

    def handle(self) -> bool:
        """Someone who stands in a room picks up an object lying there (or one never seen) or drops one they hold;
        False when nobody can."""
        options = [(p, o, "get") for p in self.place for o in OBJECTS
                   if o not in self.holder and self.lying.get(o, self.place[p]) == self.place[p]]
        options += [(p, o, "drop") for o, p in self.holder.items()]
        if not options:
            return False
        person, obj, action = self.rng.choice(options)
        if action == "get":
            self.facts.append(f"{person} {self.rng.choice(GET)} the {obj} there.")
            self.holder[obj] = person
            self.lying.pop(obj, None)
        else:
            self.facts.append(f"{person} {self.rng.choice(DROP)} the {obj} there.")
            del self.holder[obj]
            self.lying[obj] = self.place[person]
        self.object_fact[obj] = len(self.facts) - 1
        self.note(obj)
        return True

    def note(self, obj: str) -> None:
        room = self.where(obj)
        if room is not None and (not self.history[obj] or self.history[obj][-1][0] != room):
            self.history[obj].append((room, len(self.facts) - 1))


def make_story(task: str, rng: random.Random) -> Story:
    """One story of ``task`` with a question whose answer the facts determine."""
    low, high = FACTS[task]
    for _ in range(1000):
        world = World(rng)
        n = rng.randint(low, high)
        while len(world.facts) < n:
            if task == "qa1" or rng.random() < 0.6 or not world.handle():
                world.move()
        story = ask(task, world)
        if story is not None:
            return story
    raise RuntimeError(f"no answerable {task} story in 1000 tries")  # not reached with the ranges above


def ask(task: str, world: World) -> Story | None:
    rng = world.rng
    if task == "qa1":
        person = rng.choice(sorted(world.place))
        return Story(world.facts, f"Where is {person}?", world.place[person], [world.last_move[person]])
    if task == "qa2":
        known = [o for o in OBJECTS if world.where(o) is not None]
        if not known:
            return None
        obj = rng.choice(known)
        support = [world.object_fact[obj]]
        if obj in world.holder:
            support.append(world.last_move[world.holder[obj]])
        return Story(world.facts, f"Where is the {obj}?", world.where(obj), sorted(set(support)))
    moved = [o for o in OBJECTS if len(world.history[o]) >= 2]
    if not moved:
        return None
    obj = rng.choice(moved)
    (before, f1), (last, f2) = world.history[obj][-2:]
    return Story(world.facts, f"Where was the {obj} before the {last}?", before,
                 sorted({f1, f2, world.object_fact[obj]}))


def sentences(text: str) -> list[str]:
    """Background text → sentences (RULER suite's splitter), whitespace collapsed."""
    return split_sentences(re.sub(r"\s+", " ", text))


def build_sample(task: str, length: int, index: int, seed: int, tokenizer, background: list[str]) -> BabilongSample:
    """Sample ``index`` of (task, length): a story, its facts spread over background sentences (taken from a random
    start in ``background``, cyclically) until the context holds ``length`` tokens of ``tokenizer``."""
    if task not in PROMPTS:
        raise ValueError(f"unknown BABILong task '{task}' (tasks: {', '.join(TASKS)})")
    rng = random.Random(f"{seed}/{task}/{length}/{index}")
    story = make_story(task, rng)
    n_tokens = lambda s: len(tokenizer.encode(s))  # noqa: E731
    fact_tokens = sum(n_tokens(" " + f) for f in story.facts)
    if fact_tokens > length:
        raise BabilongLengthError(f"length {length}: BABILong task '{task}' needs {fact_tokens} tokens for its facts "
                                  "alone")
    noise, used, i = [], fact_tokens, rng.randrange(len(background))
    while True:
        piece = background[i % len(background)]
        cost = n_tokens(" " + piece)
        if used + cost > length:
            break
        noise.append(piece)
        used += cost
        i += 1
    positions = sorted(rng.randrange(len(noise) + 1) for _ in story.facts)
    slots: list[list[str]] = [[] for _ in range(len(noise) + 1)]
    for fact, pos in zip(story.facts, positions):
        slots[pos].append(fact)
    for k, piece in enumerate(noise):
        slots[k].append(piece)
    context = " ".join(s for slot in slots for s in slot)
    prompt = TEMPLATE.format(context=context, question=story.question, **PROMPTS[task]).strip() + "\nAnswer:"
    return BabilongSample(task, length, prompt, story.answer, story.question, story, positions)


def preprocess_output(output: str) -> str:
    """BABILong's metrics.py, as it is (the 'Question' cut comes after lower-casing, so it never cuts)."""
    output = output.lower()
    output = output.split(".")[0]
    output = output.split("<context>")[0]
    output = output.split("<example>")[0]
    output = output.split("Question")[0]
    return output


def compare_answers(target: str, output: str, question: str, task_labels=LOCATIONS) -> bool:
    """BABILong's metrics.py: the target is the only label in the output, labels named in the question aside."""
    output = preprocess_output(output)
    target = target.lower()
    labels = {label.lower() for label in task_labels}
    in_question = {label for label in labels if label in question.lower()}
    in_output = {label for label in labels if label in output} - in_question
    return target in in_output and len(in_output) == 1


def evaluate_babilong(model, tokenizer, tasks: list[str], lengths: list[int], samples: int, seed: int,
                      background: list[str], segment_size: int = 4096, device="cpu") -> list[dict]:
    """Score per (task, length): the percentage of ``samples`` greedy answers (up to EOS) that ``compare_answers``
    accepts. Every sample is built before any decoding, so a length too short for a story (``BabilongLengthError``)
    fails at once."""
    built = {(task, length): [build_sample(task, length, i, seed, tokenizer, background) for i in range(samples)]
             for task in tasks for length in lengths}
    model.eval()
    rows = []
    for (task, length), group in built.items():
        correct, outputs, questions = 0, [], []
        for sample in group:
            prompt = torch.as_tensor(np.asarray(tokenizer.encode(sample.prompt), dtype=np.int64))
            text = greedy_answer(model, tokenizer, prompt, MAX_NEW_TOKENS, segment_size, device, stop_at_eos=True)
            correct += compare_answers(sample.answer, text, sample.question)
            outputs.append({"answer": sample.answer, "output": text[:200]})
            questions.append(sample.question)
        # score in percent, as BABILong reports (and as RULER's rows: one summary and plot serve both)
        rows.append({"task": task, "length": length, "samples": samples, "score": round(100 * correct / samples, 2),
                     "outputs": outputs, "questions": questions})
    return rows
