"""A synthetic world of short facts about invented people, for training and measuring memory.

Every fact is one five-word sentence, "Kai lives in Split .", and every question asks for its last
content word: "Where does Kai live ?" -> "Split". Five words each, so a note of facts chunked at a
multiple of five tokens by a word-level tokenizer never cuts a fact in two (the tiny model's chunks
are 20 tokens: four facts).

Which (name, relation, value) triples are *held out* is fixed by a hash, so the training script
never sees the pairs the evaluation asks about, while every word is still in the vocabulary.

No torch here: the retention harness and the tests import this on any machine.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

NAMES = (
    "Kai Ana Ivo Mia Leo Zoe Eli Ada Noa Ida Tom Eva Max Lia Ben Uma Ray Ona Gus Tia "
    "Rex Fay Ike Amy Lev Nia Oto Bea Dov Ela Hal Ira Jon Kat Lou Mae Ned Opa Pia Quin "
    "Rud Sia Ted Una Vic Wes Xia Yul Zed Abe Bo Cy Dee Emi Fen Gia Hux Ilo Jaz Kim "
    "Lyn Mo Nel Ozzy Pam Rio Sal Tam Ugo Val Wim Yan Zia Alf Bram Cleo Dax Edda Finn Gwen "
    "Hugo Iris Joss Kira Lars Mila Nils Oona Pax Rhea Sven Tove Ulla Vera Wynn Yara Zane Arlo Bex Cato"
).split()
CITIES = (
    "Split Lisbon Oslo Quito Lima Porto Riga Tunis Perth Kyoto Turin Ghent Bergen Cusco Malmo "
    "Tartu Lyon Bilbao Graz Leeds Utrecht Brno Varna Galway Faro Padua Tampere Aarhus Ohrid Kotor "
    "Nantes Kassel Zadar Sibiu Pula Bari Cork Lund Pecs Mostar"
).split()
COMPANIES = (
    "Zenfield Orbix Calder Novatek Brightwell Quarry Halcyon Vortexa Lumina Pinecrest Redwing Solvay "
    "Trivane Umbra Vellum Wexford Xylo Yardley Zephyr Acorn Beacon Cobalt Driftwood Ember Fathom "
    "Granite Harbor Ironleaf Juniper Kestrel Lattice Meridian Nimbus Opal Prism Quill Ridge Sable Tundra Willow"
).split()
THINGS = (
    "kayak piano parrot tractor telescope violin canoe hammock lantern tortoise camera bicycle "
    "drone sailboat scooter typewriter accordion aquarium hamster llama motorbike pony rowboat "
    "tandem trumpet unicycle van wagon yacht zither banjo cactus donkey easel ferret "
    "goat harp iguana jukebox"
).split()
GAMES = (
    "cello chess tennis guitar drums flute golf bridge rugby squash hockey oboe poker polo "
    "cricket darts fencing go handball judo karate lacrosse mahjong netball "
    "backgammon bowling curling dominoes snooker"
).split()


@dataclass(frozen=True)
class Relation:
    name: str
    verb: str  # "lives in": the two words between subject and value
    ask: str  # "Where does {name} live ?"
    values: tuple[str, ...]


RELATIONS = (
    Relation("lives_in", "lives in", "Where does {name} live ?", tuple(CITIES)),
    Relation("works_at", "works at", "Where does {name} work ?", tuple(COMPANIES)),
    Relation("owns", "owns a", "What does {name} own ?", tuple(THINGS)),
    Relation("plays", "plays the", "What does {name} play ?", tuple(GAMES)),
)
FACT_WORDS = 5  # words (= word-level tokens) per fact sentence
HELD_OUT_PERCENT = 10


@dataclass(frozen=True)
class Fact:
    name: str
    relation: Relation
    value: str

    @property
    def sentence(self) -> str:
        return f"{self.name} {self.relation.verb} {self.value} ."

    @property
    def question(self) -> str:
        return self.relation.ask.format(name=self.name)

    @property
    def held_out(self) -> bool:
        return is_held_out(self.name, self.relation.name, self.value)


def is_held_out(name: str, relation: str, value: str) -> bool:
    digest = hashlib.sha256(f"{name}|{relation}|{value}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT


def vocabulary() -> list[str]:
    """Every word a fact, a question or the base question prompt ("Question: ... Answer:") uses."""
    words: list[str] = ["Question", ":", "Answer", "?", ".", "Where", "What", "does"]
    for relation in RELATIONS:
        words += relation.verb.split() + relation.ask.format(name="").split()
    words += NAMES
    for relation in RELATIONS:
        words += relation.values
    seen: dict[str, None] = {}
    for word in words:
        seen.setdefault(word, None)
    return list(seen)


def chance(relation: Relation) -> float:
    """Accuracy of guessing a value of the right kind uniformly."""
    return 1.0 / len(relation.values)


class FactWorld:
    """Draws chunks of facts from a seeded generator.

    `split="train"` never yields a held-out triple; `split="test"` yields only held-out triples for
    the facts asked about. Names within one draw are distinct, so no two facts in memory conflict.
    """

    def __init__(self, seed: int, split: str = "train"):
        if split not in ("train", "test", "any"):
            raise ValueError(f"split must be train, test or any, not {split!r}")
        self.rng = random.Random(seed)
        self.split = split

    def fact(self, name: str, split: str | None = None, relation: Relation | None = None) -> Fact:
        split = split or self.split
        fixed = relation
        for _ in range(1000):
            relation = fixed or self.rng.choice(RELATIONS)
            value = self.rng.choice(relation.values)
            held = is_held_out(name, relation.name, value)
            if split == "any" or held == (split == "test"):
                return Fact(name, relation, value)
        raise RuntimeError(f"no {split} fact found for {name}")  # unreachable with 10 % held out

    def names(self, count: int, exclude: set[str] = frozenset()) -> list[str]:
        pool = [n for n in NAMES if n not in exclude]
        return self.rng.sample(pool, count)

    def chunk(self, names: list[str], split: str | None = None, relation: Relation | None = None) -> list[Fact]:
        """Facts about `names`, each with a random relation (or all with `relation`)."""
        return [self.fact(name, split, relation) for name in names]


def note_text(facts: list[Fact]) -> str:
    """A note as a user would write it: one fact per line."""
    return "\n".join(f.sentence for f in facts) + "\n"


def exact_hit(target: str, prediction: str) -> bool:
    """The knowledge-retention metric of the official evaluation: the target is a case-sensitive
    substring of the prediction (reference-semantics §9.1)."""
    return target.strip() in prediction
