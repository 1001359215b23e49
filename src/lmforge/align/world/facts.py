"""Look-ups in a fictional fact table: facts the pre-training corpus teaches and chat prompts ask about.

The table is generated from the seed: `entities` countries, creatures and people, each with three attributes,

    country    capital (a city)        flag (a colour)            ruler (a person)
    creature   legs (a number)         colour (a colour)          home (a country)
    person     town (a city)           pet (an animal)            job (a profession)

with invented names ("Velmoria", "Dunford", "the zorbtail", "Tamsin Orlo") built from syllables, so that no
fact can be known from anywhere but this world's corpus. A fact's difficulty is how often the corpus states
it (in varied sentences): 1 frequent, 2 medium, 3 rare (the counts are sizes of the build); so the family is
graded by construction. The difficulty and the train / held-out split of each (entity, attribute) pair are
both fixed by seeded hashes of its key. The corpus states every fact, held-out ones included: a held-out
question asks for knowledge the model could only have taken from pre-training, in a chat format it learnt
on other facts.

The checker: the LAST value of the attribute's type named in the answer must be the target ("The capital of
Velmoria is Dunford." names one city). A record carries the values of its type (`meta["values"]`), so a
record and an answer are all a checker needs; a wrong value of the right type earns partial credit.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from lmforge.align.world.common import ANIMALS, COLOURS, LIST_WORDS, NUMBER_WORDS, last_number, normalize, \
    stream, unit_hash
from lmforge.align.world.tasks import Task, task_meta

PROFESSIONS = ("baker", "smith", "weaver", "sailor", "farmer", "miner", "healer", "scribe", "potter", "hunter")
LEGS = (2, 3, 4, 5, 6, 8, 10, 12)

# attribute: (entity kind, value type, corpus statements, questions, reference answer)
ATTRIBUTES: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...], str]] = {
    "capital": ("country", "city",
                ("The capital of {e} is {v}.", "{v} is the capital of {e}.", "{e} is governed from its capital, {v}.",
                 "Travellers to {e} arrive in {v}, its capital.", "Every road in {e} leads to the capital, {v}."),
                ("What is the capital of {e}?", "Which city is the capital of {e}?", "Name the capital of {e}."),
                "The capital of {e} is {v}."),
    "flag": ("country", "colour",
             ("The flag of {e} is {v}.", "{e} flies a {v} flag.", "On feast days the people of {e} wave {v} flags.",
              "The {v} flag of {e} hangs over every gate.", "Anyone from {e} knows its flag is {v}."),
             ("What colour is the flag of {e}?", "Which colour is the flag of {e}?",
              "Name the colour of the flag of {e}."),
             "The flag of {e} is {v}."),
    "ruler": ("country", "person",
              ("{e} is ruled by {v}.", "The ruler of {e} is {v}.", "{v} rules {e}.",
               "In {e}, every law is signed by {v}.", "{v} sits on the throne of {e}."),
              ("Who rules {e}?", "Who is the ruler of {e}?", "Name the ruler of {e}."),
              "{e} is ruled by {v}."),
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
    "home": ("creature", "country",
             ("The {e} lives in {v}.", "The {e} is found only in {v}.", "In {v} you can meet the {e}.",
              "The {e} makes its nest in {v}.", "The home of the {e} is {v}."),
             ("Where does the {e} live?", "In which country does the {e} live?", "Name the home of the {e}."),
             "The {e} lives in {v}."),
    "town": ("person", "city",
             ("{e} lives in {v}.", "{e} comes from the town of {v}.", "The home town of {e} is {v}.",
              "Everyone in {v} knows {e}.", "{e} was born and raised in {v}."),
             ("Where does {e} live?", "What is the home town of {e}?", "Which town is {e} from?"),
             "{e} lives in {v}."),
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
}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea")
_CODAS = ("", "", "", "n", "r", "l", "s", "m")
_ENDINGS = {"country": ("ia", "mark", "land", "or", "ene"), "city": ("ford", "holm", "wick", "by", "stead", "mouth"),
            "creature": ("wing", "tail", "horn", "back", "claw", "fin")}
_TAKEN = set(LIST_WORDS) | set(NUMBER_WORDS) | set(PROFESSIONS)


@dataclass(frozen=True)
class Fact:
    """One (entity, attribute) pair of the table and its value; `difficulty` 1..3 is its frequency class."""

    entity: str
    attribute: str
    value: str | int
    difficulty: int

    @property
    def key(self) -> str:
        return f"facts|{self.entity}|{self.attribute}"

    @property
    def type(self) -> str:
        return ATTRIBUTES[self.attribute][1]


class FactTable:
    """The generated table: `facts` (all of them), `values[type]` (every value of a named type)."""

    def __init__(self, seed: int, entities: int):
        if entities < 2:
            raise ValueError(f"sizes.entities must be >= 2, got {entities}")
        rng = stream(seed, "facts")
        names: set[str] = set()
        countries = [self._name(rng, "country", names) for _ in range(entities)]
        cities = [self._name(rng, "city", names) for _ in range(2 * entities)]
        creatures = [self._name(rng, "creature", names) for _ in range(entities)]
        people = [self._name(rng, "person", names) for _ in range(entities)]
        rulers = rng.sample(people, entities)
        values: dict[str, list] = {
            "capital": cities[:entities], "flag": [rng.choice(COLOURS) for _ in countries], "ruler": rulers,
            "legs": [rng.choice(LEGS) for _ in creatures], "colour": [rng.choice(COLOURS) for _ in creatures],
            "home": [rng.choice(countries) for _ in creatures], "town": [rng.choice(cities) for _ in people],
            "pet": [rng.choice(ANIMALS) for _ in people], "job": [rng.choice(PROFESSIONS) for _ in people],
        }
        owners = {"country": countries, "creature": creatures, "person": people}
        self.facts: list[Fact] = []
        for attribute, (kind, _, _, _, _) in ATTRIBUTES.items():
            for entity, value in zip(owners[kind], values[attribute]):
                u = unit_hash(seed, f"frequency|facts|{entity}|{attribute}")
                self.facts.append(Fact(entity, attribute, value, 1 + min(2, int(3 * u))))
        self.values = {"city": cities, "person": people, "country": countries, "colour": list(COLOURS),
                       "animal": list(ANIMALS), "profession": list(PROFESSIONS)}

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

    def by_difficulty(self, difficulty: int) -> list[Fact]:
        return [f for f in self.facts if f.difficulty == difficulty]

    def statements(self, fact: Fact, n: int, rng: random.Random) -> list[str]:
        """`n` corpus sentences stating `fact`, cycling through its templates in a random order."""
        templates = list(ATTRIBUTES[fact.attribute][2])
        rng.shuffle(templates)
        return [_fill(templates[i % len(templates)], fact) for i in range(n)]


def _fill(template: str, fact: Fact) -> str:
    text = template.format(e=fact.entity, v=fact.value)
    return text[:1].upper() + text[1:]


class Facts:
    """The fact family over a `FactTable`: item = a `Fact`; difficulty = its frequency class."""

    name = "facts"

    def __init__(self, table: FactTable):
        self.table = table
        self._pools = {d: table.by_difficulty(d) for d in (1, 2, 3)}

    def draw(self, difficulty: int, rng: random.Random) -> Fact:
        return rng.choice(self._pools[difficulty])

    def key(self, item: Fact) -> str:
        return item.key

    def render(self, item: Fact, difficulty: int, rng: random.Random) -> Task:
        _, vtype, _, questions, answer = ATTRIBUTES[item.attribute]
        fields = dict(entity=item.entity, attribute=item.attribute, type=vtype)
        if vtype != "number":
            fields["values"] = self.table.values[vtype]
        reference = _fill(answer, item)
        return Task(_fill(rng.choice(questions), item),
                    task_meta(self.name, difficulty, item.key, item.value, reference, **fields))


def last_value(answer: str, values: list[str]) -> str | None:
    """The value of `values` named last in `answer` (whole words, any case; the longer one where two end
    at the same place), or None.

    >>> last_value("Not Dunford but Kelmouth.", ["Dunford", "Kelmouth", "Zorby"])
    'Kelmouth'
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

    >>> m = {"type": "city", "values": ["Dunford", "Kelmouth"], "target": "Dunford"}
    >>> check_fact(m, "the capital of velmoria is DUNFORD"), check_fact(m, "Dunford? No: Kelmouth.")
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
