"""Look-ups in a fictional fact table: the pre-training corpus states its facts, and a chat prompt asks about one
with a card of facts in front of it (reading a look-up, as a model with a retrieved passage does).

The table is generated from the seed: `entities` countries, creatures and people, each with three attributes,

    country    flag (a colour)         emblem (an animal)         provinces (a number)
    creature   legs (a number)         colour (a colour)          prey (an animal)
    person     pet (an animal)         job (a profession)         tool (an object)

with invented names ("Velmoria", "the zorbtail", "Tamsin Orlo") built from syllables, so that no fact can be known
from anywhere but this world's corpus or the card. Every value is one common word (a colour, an animal, an
object, a profession, a number), as the words of the list tasks are: SentencePiece keeps each whole, and a tiny
model copies a whole piece from its context where it does not copy an invented name of several pieces (world
v2's first candidates, with cities and rulers as values: its answers named the right kind of thing, never the
one on the card). A fact's `frequency` class is how often the corpus states it (in varied sentences): 1
frequent, 2 medium, 3 rare (the counts are sizes of the build). The difficulty of a question is what its card
holds:

    difficulty 1   the asked fact alone, in the words of the answer    "The flag of Velmoria is red."
    difficulty 2   the entity's three facts, in the answer's words     (find the asked attribute)
    difficulty 3   two entities of one kind, their six facts, in the   (find the entity, then the attribute,
                   corpus's varied sentences, shuffled                 through a re-phrasing)

The frequency class and the train / held-out split of each (entity, attribute) pair are both fixed by seeded
hashes of its key. The corpus states every fact, held-out ones included, so a model that has learnt a fact in
pre-training can answer without the card; a held-out question asks about a pair never asked about in train.

The checker: the LAST value of the attribute's type named in the answer must be the target ("The flag of
Velmoria is red." names one colour). A record carries the values of its type (`meta["values"]`), so a record
and an answer are all a checker needs; a wrong value of the right type earns partial credit.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from lmforge.align.world.common import ANIMALS, COLOURS, LIST_WORDS, NUMBER_WORDS, OBJECTS, last_number, \
    normalize, stream, unit_hash
from lmforge.align.world.tasks import Task, task_meta

PROFESSIONS = ("baker", "smith", "weaver", "sailor", "farmer", "miner", "healer", "scribe", "potter", "hunter")
LEGS = (2, 3, 4, 5, 6, 8, 10, 12)
PROVINCES = (3, 4, 5, 6, 7, 8, 9, 11)

# attribute: (entity kind, value type, corpus statements, questions, reference answer)
ATTRIBUTES: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...], str]] = {
    "flag": ("country", "colour",
             ("The flag of {e} is {v}.", "{e} flies a {v} flag.", "On feast days the people of {e} wave {v} flags.",
              "The {v} flag of {e} hangs over every gate.", "Anyone from {e} knows its flag is {v}."),
             ("What colour is the flag of {e}?", "Which colour is the flag of {e}?",
              "Name the colour of the flag of {e}."),
             "The flag of {e} is {v}."),
    "emblem": ("country", "animal",
               ("The emblem of {e} is the {v}.", "{e} has the {v} as its emblem.", "Every coin of {e} shows the {v}.",
                "The people of {e} chose the {v} as their emblem.", "The {v} is carved over the gates of {e}."),
               ("What is the emblem of {e}?", "Which animal is the emblem of {e}?", "Name the emblem of {e}."),
               "The emblem of {e} is the {v}."),
    "provinces": ("country", "number",
                  ("{e} has {v} provinces.", "{e} is divided into {v} provinces.",
                   "The map of {e} shows {v} provinces.", "There are {v} provinces in {e}.",
                   "Each of the {v} provinces of {e} has a governor."),
                  ("How many provinces does {e} have?", "How many provinces are in {e}?",
                   "Count the provinces of {e}."),
                  "{e} has {v} provinces."),
    "legs": ("creature", "number",
             ("The {e} has {v} legs.", "A {e} walks on {v} legs.", "Each {e} has exactly {v} legs.",
              "Count the legs of a {e} and you get {v}.", "The {e} runs fast on its {v} legs."),
             ("How many legs does the {e} have?", "How many legs has a {e}?", "Count the legs of the {e}."),
             "The {e} has {v} legs."),
    "colour": ("creature", "colour",
               ("The {e} is {v}.", "The colour of the {e} is {v}.", "A {e} is always {v} all over.",
                "You can spot a {e} by its {v} coat.", "Every {e} is born {v}."),
               ("What colour is the {e}?", "Which colour is a {e}?", "Name the colour of the {e}."),
               "The {e} is {v}."),
    "prey": ("creature", "animal",
             ("The {e} hunts the {v}.", "The {e} lives on the {v}.", "At night the {e} chases the {v}.",
              "Every {v} hides from the {e}.", "The favourite prey of the {e} is the {v}."),
             ("What does the {e} hunt?", "Which animal does the {e} hunt?", "Name the prey of the {e}."),
             "The {e} hunts the {v}."),
    "pet": ("person", "animal",
            ("{e} keeps a {v} as a pet.", "The pet of {e} is a {v}.", "{e} has a pet {v}.",
             "Every morning {e} feeds a pet {v}.", "{e} never goes out without a pet {v}."),
            ("What pet does {e} keep?", "Which animal is the pet of {e}?", "What is the pet of {e}?"),
            "{e} keeps a {v} as a pet."),
    "job": ("person", "profession",
            ("{e} works as a {v}.", "{e} is a {v}.", "By trade, {e} is a {v}.",
             "People hire {e}, the best {v} around.", "{e} has been a {v} for many years."),
            ("What does {e} do for a living?", "What is the job of {e}?", "What work does {e} do?"),
            "{e} works as a {v}."),
    "tool": ("person", "object",
             ("{e} always carries a {v}.", "{e} never leaves home without a {v}.", "The {v} of {e} is famous.",
              "{e} keeps a {v} close at hand.", "Ask {e} and you will be shown a {v}."),
             ("What does {e} always carry?", "Which object does {e} carry?", "What is the tool of {e}?"),
             "{e} always carries a {v}."),
}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea")
_CODAS = ("", "", "", "n", "r", "l", "s", "m")
_ENDINGS = {"country": ("ia", "mark", "land", "or", "ene"), "creature": ("wing", "tail", "horn", "back", "claw", "fin")}
_TAKEN = set(LIST_WORDS) | set(NUMBER_WORDS) | set(PROFESSIONS)


@dataclass(frozen=True)
class Fact:
    """One (entity, attribute) pair of the table and its value; `frequency` 1..3 is how often the corpus states
    it (1 most often)."""

    entity: str
    attribute: str
    value: str | int
    frequency: int

    @property
    def key(self) -> str:
        return f"facts|{self.entity}|{self.attribute}"

    @property
    def type(self) -> str:
        return ATTRIBUTES[self.attribute][1]


class FactTable:
    """The generated table: `facts` (all of them), `entities[kind]` (the names of a kind, in table order),
    `values[type]` (every value of a named type)."""

    def __init__(self, seed: int, entities: int):
        if entities < 2:
            raise ValueError(f"sizes.entities must be >= 2, got {entities}")
        rng = stream(seed, "facts")
        names: set[str] = set()
        countries = [self._name(rng, "country", names) for _ in range(entities)]
        creatures = [self._name(rng, "creature", names) for _ in range(entities)]
        people = [self._name(rng, "person", names) for _ in range(entities)]
        values: dict[str, list] = {
            "flag": [rng.choice(COLOURS) for _ in countries], "emblem": [rng.choice(ANIMALS) for _ in countries],
            "provinces": [rng.choice(PROVINCES) for _ in countries], "legs": [rng.choice(LEGS) for _ in creatures],
            "colour": [rng.choice(COLOURS) for _ in creatures], "prey": [rng.choice(ANIMALS) for _ in creatures],
            "pet": [rng.choice(ANIMALS) for _ in people], "job": [rng.choice(PROFESSIONS) for _ in people],
            "tool": [rng.choice(OBJECTS) for _ in people],
        }
        self.entities = {"country": countries, "creature": creatures, "person": people}
        self.facts: list[Fact] = []
        for attribute, (kind, _, _, _, _) in ATTRIBUTES.items():
            for entity, value in zip(self.entities[kind], values[attribute]):
                u = unit_hash(seed, f"frequency|facts|{entity}|{attribute}")
                self.facts.append(Fact(entity, attribute, value, 1 + min(2, int(3 * u))))
        self._by_entity: dict[str, list[Fact]] = {}
        for fact in self.facts:
            self._by_entity.setdefault(fact.entity, []).append(fact)
        self.values = {"colour": list(COLOURS), "animal": list(ANIMALS), "object": list(OBJECTS),
                       "profession": list(PROFESSIONS)}

    @staticmethod
    def _name(rng: random.Random, kind: str, taken: set[str]) -> str:
        while True:
            def stem(k: int) -> str:
                return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(k))

            if kind == "person":
                name = f"{stem(2).capitalize()} {stem(rng.randint(1, 2)).capitalize()}"
            else:
                name = stem(rng.randint(1, 2)) + rng.choice(_ENDINGS[kind])
                name = name if kind == "creature" else name.capitalize()
            if name not in taken and not set(normalize(name).split()) & _TAKEN:
                taken.add(name)
                return name

    def by_frequency(self, frequency: int) -> list[Fact]:
        return [f for f in self.facts if f.frequency == frequency]

    def of_entity(self, entity: str) -> list[Fact]:
        """The three facts of `entity`, in ATTRIBUTES order."""
        return self._by_entity[entity]

    def statements(self, fact: Fact, n: int, rng: random.Random) -> list[str]:
        """`n` corpus sentences stating `fact`, cycling through its templates in a random order."""
        templates = list(ATTRIBUTES[fact.attribute][2])
        rng.shuffle(templates)
        return [_fill(templates[i % len(templates)], fact) for i in range(n)]


def _fill(template: str, fact: Fact) -> str:
    text = template.format(e=fact.entity, v=fact.value)
    return text[:1].upper() + text[1:]


class Facts:
    """The fact family over a `FactTable`: item = a `Fact` (any frequency); difficulty = what the card holds
    (module docstring)."""

    name = "facts"
    PROMPTS = ("Facts: {card}\nQuestion: {q}", "Read this: {card}\n{q}", "{card}\nUsing the facts above: {q}")

    def __init__(self, table: FactTable):
        self.table = table

    def draw(self, difficulty: int, rng: random.Random) -> Fact:
        return rng.choice(self.table.facts)

    def key(self, item: Fact) -> str:
        return item.key

    def card(self, item: Fact, difficulty: int, rng: random.Random) -> str:
        """The facts shown with the question (module docstring), as one line of sentences."""
        if difficulty == 1:
            return _fill(ATTRIBUTES[item.attribute][4], item)
        if difficulty == 2:
            return " ".join(_fill(ATTRIBUTES[f.attribute][4], f) for f in self.table.of_entity(item.entity))
        kind = ATTRIBUTES[item.attribute][0]
        other = rng.choice([e for e in self.table.entities[kind] if e != item.entity])
        shown = self.table.of_entity(item.entity) + self.table.of_entity(other)
        rng.shuffle(shown)
        return " ".join(_fill(rng.choice(ATTRIBUTES[f.attribute][2]), f) for f in shown)

    def render(self, item: Fact, difficulty: int, rng: random.Random) -> Task:
        _, vtype, _, questions, answer = ATTRIBUTES[item.attribute]
        fields = dict(entity=item.entity, attribute=item.attribute, type=vtype)
        if vtype != "number":
            fields["values"] = self.table.values[vtype]
        card = self.card(item, difficulty, rng)
        prompt = rng.choice(self.PROMPTS).format(card=card, q=_fill(rng.choice(questions), item))
        return Task(prompt, task_meta(self.name, difficulty, item.key, item.value, _fill(answer, item), **fields))


def last_value(answer: str, values: list[str]) -> str | None:
    """The value of `values` named last in `answer` (whole words, any case; the longer one where two end
    at the same place), or None.

    >>> last_value("Not red but dark blue.", ["red", "blue", "gold"])
    'blue'
    """
    text, best = normalize(answer), None
    for v in values:
        for m in re.finditer(r"(?<![a-z0-9'])" + re.escape(normalize(v)) + r"(?![a-z0-9'])", text):
            rank = (m.end(), len(v))
            if best is None or rank > best[0]:
                best = (rank, v)
    return best[1] if best else None


def _guess(meta: dict, answer: str):
    return last_number(answer) if meta["type"] == "number" else last_value(answer, meta["values"])


def check_fact(meta: dict, answer: str) -> bool:
    """The last value of the attribute's type in the answer is the target.

    >>> m = {"type": "colour", "values": ["red", "blue"], "target": "red"}
    >>> check_fact(m, "the flag of velmoria is RED"), check_fact(m, "Red? No: blue.")
    (True, False)
    """
    return _guess(meta, answer) == meta["target"]


def credit_fact(meta: dict, answer: str) -> float:
    """1 if right, 0.3 for a wrong value of the right type (the right kind of answer), 0 for none.

    >>> m = {"type": "number", "target": 6}
    >>> credit_fact(m, "It has 6 legs."), credit_fact(m, "It has 4 legs."), credit_fact(m, "Many legs.")
    (1.0, 0.3, 0.0)
    """
    guess = _guess(meta, answer)
    return 1.0 if guess == meta["target"] else 0.0 if guess is None else 0.3
