"""Task families with answers a checker verifies: arithmetic, word-list transforms and counting (the fact look-ups
are in facts.py, the same interface over the fictional fact table).

A family draws items at a difficulty 1..3, names each by a canonical key (the unit of the train / held-out
split, common.py) and renders it as a `Task`: the user's prompt plus `meta`, everything its checker needs
(the target and a correct reference answer). Phrasing is chosen per record and is not part of the item, so
the held-out items are unseen, not merely re-worded.

    family       difficulty 1              difficulty 2                difficulty 3
    arithmetic   2-digit +/- 1, no carry   2-digit +/- 1-digit,        2-digit +/- 2-digit with a
                 or borrow (45 + 1)        no carry or borrow (45 + 3) carry or borrow (45 + 37)
    lists        last word of 2-4 words    reverse 3-4 words           sort 5-6 words alphabetically
    counting     lists of 2-3 words        lists of 5-7 words          lists of 10-14 words

Each family spans an easy and a hard end, so that a model learns its difficulty 1 first and its difficulty 3
last: a family's accuracy then sits between the two, with room above it for RLHF. Without a carry the result's
tens are copied (45 + 3: 4, then 5 + 3); at difficulty 1 its units are the next or the previous digit; with a
carry the tens depend on the units too.

Lists are of words, not letters (SentencePiece keeps each word whole; a tiny transformer copies words well
but cannot spell). Counting asks either how many words a list has or how often one word occurs in it.
Results are never negative (a - b with a >= b), so a checker reads plain digits.

Checkers are strict on the result and lenient on the form: case, a final period, a prefix such as "The
answer is", and restating the question first are all fine; a wrong number or a swapped list is not.
`credit` is the partial credit the oracle builds on (oracle.py): 1.0 exactly when `check` passes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lmforge.align.world.common import LIST_WORDS, join_list, last_number, words

DIFFICULTIES = (1, 2, 3)


@dataclass(frozen=True)
class Task:
    """One task: the user's `prompt` and its `meta` (kind "task", family, difficulty, item key, target and a
    correct `reference` answer, plus the family's own fields)."""

    prompt: str
    meta: dict

    @property
    def reference(self) -> str:
        return self.meta["reference"]


def task_meta(family: str, difficulty: int, key: str, target, reference: str, **fields) -> dict:
    return {"kind": "task", "family": family, "difficulty": difficulty, "item": key, **fields, "target": target,
            "reference": reference}


# ---- arithmetic ---------------------------------------------------------------------------------------------
class Arithmetic:
    """Addition and subtraction of 2-digit numbers; difficulty by the second operand and a carry. Item: (a, op, b)."""

    name = "arithmetic"
    PROMPTS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?",
               "Calculate {a} {op} {b}.", "What do you get from {a} {op} {b}?")

    def draw(self, difficulty: int, rng: random.Random) -> tuple[int, str, int]:
        """Operands drawn until the item is of `difficulty`: a carry (or borrow) in the units exactly at
        difficulty 3, and a sum under 100 (every operand and result has at most two digits)."""
        op = rng.choice("+-")  # before the operands: as many sums as differences
        while True:
            a, b = rng.randint(10, 99), {1: 1, 2: rng.randint(2, 9), 3: rng.randint(10, 99)}[difficulty]
            if op == "-" and a < b:
                a, b = b, a
            carry = a % 10 + b % 10 > 9 if op == "+" else a % 10 < b % 10
            if carry == (difficulty == 3) and (op == "-" or a + b < 100):
                return a, op, b

    def key(self, item) -> str:
        a, op, b = item
        return f"arithmetic|{a}{op}{b}"

    def render(self, item, difficulty: int, rng: random.Random) -> Task:
        a, op, b = item
        c = a + b if op == "+" else a - b
        return Task(rng.choice(self.PROMPTS).format(a=a, op=op, b=b),
                    task_meta(self.name, difficulty, self.key(item), c, f"{a} {op} {b} = {c}.", a=a, op=op, b=b))

    def statement(self, item, rng: random.Random) -> str:
        """A corpus sentence stating the item's result."""
        a, op, b = item
        c = a + b if op == "+" else a - b
        return rng.choice((f"{a} {op} {b} = {c}.", f"{a} {'plus' if op == '+' else 'minus'} {b} is {c}."))


def check_number(meta: dict, answer: str) -> bool:
    """The answer's LAST integer equals the target.

    >>> m = {"target": 68}
    >>> check_number(m, "23 + 45 = 68."), check_number(m, "The answer is 68"), check_number(m, "68 - 1 = 67")
    (True, True, False)
    """
    return last_number(answer) == meta["target"]


def credit_number(meta: dict, answer: str) -> float:
    """1 if right; a wrong integer p gets 0.5 * max(0, 1 - |p - t| / (t + 1)), so closer is better but every
    wrong result stays at least 0.5 below a right one; no integer at all gets 0.

    >>> [round(credit_number({"target": 68}, s), 3) for s in ("68", "67", "34", "x")]
    [1.0, 0.493, 0.254, 0.0]
    """
    p, t = last_number(answer), meta["target"]
    if p is None:
        return 0.0
    if p == t:
        return 1.0
    return 0.5 * max(0.0, 1 - abs(p - t) / (t + 1))


def list_key(ws) -> str:
    """The split key of a word list: its set of words, shared by the list and counting families and by every
    order of the same words. A held-out list is never seen in train, under any transform or question, nor
    as the answer to reversing or sorting another list.

    >>> list_key(("red", "fox", "cup")), list_key(("cup", "red", "fox"))
    ('list|cup,fox,red', 'list|cup,fox,red')
    """
    return "list|" + ",".join(sorted(ws))


# ---- word lists ---------------------------------------------------------------------------------------------
class Lists:
    """Word-list transforms; difficulty by what is asked and the list length. Item: (transform, words)."""

    name = "lists"
    PROMPTS = {
        "last": ("What is the last word in the list: {l}?", "Which word comes last in: {l}?",
                 "Name the last word of this list: {l}."),
        "reverse": ("Reverse the list: {l}.", "Say this list backwards: {l}.",
                    "Write the words in reverse order: {l}.", "What is the list {l} in reverse order?"),
        "sort": ("Sort the list alphabetically: {l}.", "Put these words in alphabetical order: {l}.",
                 "What is the list {l} in alphabetical order?"),
    }

    def draw(self, difficulty: int, rng: random.Random) -> tuple[str, tuple[str, ...]]:
        transform, n = {1: ("last", rng.randint(2, 4)), 2: ("reverse", rng.randint(3, 4)),
                        3: ("sort", rng.randint(5, 6))}[difficulty]
        return transform, tuple(rng.sample(LIST_WORDS, n))

    def key(self, item) -> str:
        return list_key(item[1])

    def render(self, item, difficulty: int, rng: random.Random) -> Task:
        transform, ws = item
        target = {"last": [ws[-1]], "reverse": list(reversed(ws)), "sort": sorted(ws)}[transform]
        reference = f"The last word is {ws[-1]}." if transform == "last" else join_list(target) + "."
        prompt = rng.choice(self.PROMPTS[transform]).format(l=join_list(ws))
        return Task(prompt, task_meta(self.name, difficulty, self.key(item), target, reference, transform=transform,
                                      words=list(ws)))

    def statement(self, item, rng: random.Random) -> str:
        transform, ws = item
        if transform == "last":
            return f"The last word of {join_list(ws)} is {ws[-1]}."
        if transform == "sort":
            return f"The list {join_list(ws)} sorted is {join_list(sorted(ws))}."
        return f"The list {join_list(ws)} reversed is {join_list(reversed(ws))}."


def list_guess(meta: dict, answer: str) -> list[str]:
    """The list the answer gives: its list-vocabulary words in order, without a restated input list in front.

    >>> m = {"words": ["fox", "cup", "red"], "target": ["red", "cup", "fox"]}
    >>> list_guess(m, "Red, cup, fox."), list_guess(m, "The reverse of fox, cup, red is red, cup, fox.")
    (['red', 'cup', 'fox'], ['red', 'cup', 'fox'])
    """
    found = [w for w in words(answer) if w in LIST_WORDS]
    source = meta["words"]
    if len(found) > len(source) and found[: len(source)] == source:
        found = found[len(source):]
    return found


def check_list(meta: dict, answer: str) -> bool:
    """The answer's list (`list_guess`) is exactly the target: same words, same order, nothing extra.

    >>> m = {"words": ["fox", "cup", "red"], "target": ["red", "cup", "fox"]}
    >>> check_list(m, "RED, CUP, FOX"), check_list(m, "cup, red, fox."), check_list(m, "red, cup, fox, fox.")
    (True, False, False)
    """
    return list_guess(meta, answer) == meta["target"]


def credit_list(meta: dict, answer: str) -> float:
    """1 if right; else 0.8 * (positions right) / max(target length, answer length): each position more in
    place earns more, an extra word costs a share.

    >>> m = {"words": ["a", "b"], "target": ["fox", "cup", "red", "owl", "hat"]}
    >>> [round(credit_list(m, s), 3) for s in ("fox cup red owl hat", "fox cup red hat owl", "cup fox", "")]
    [1.0, 0.48, 0.0, 0.0]
    """
    if check_list(meta, answer):
        return 1.0
    guess, target = list_guess(meta, answer), meta["target"]
    right = sum(g == t for g, t in zip(guess, target))
    return 0.8 * right / max(len(target), len(guess))


# ---- counting -----------------------------------------------------------------------------------------------
class Counting:
    """How many words a list has, or how often a word occurs in it; difficulty by list length.
    Item: (what, word or "", words)."""

    name = "counting"
    PROMPTS = {
        "words": ("How many words are in the list: {l}?", "Count the words in this list: {l}.",
                  "How many words does this list have: {l}?"),
        "occurrences": ("How many times does {w} appear in the list: {l}?", "Count how often {w} appears in: {l}.",
                        "How often is {w} in this list: {l}?"),
    }

    def draw(self, difficulty: int, rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
        n = rng.randint(*{1: (2, 3), 2: (5, 7), 3: (10, 14)}[difficulty])
        if rng.random() < 0.5:
            return "words", "", tuple(rng.sample(LIST_WORDS, n))
        pool = rng.sample(LIST_WORDS, 3)  # few distinct words, so that a word repeats
        ws = tuple(rng.choice(pool) for _ in range(n))
        return "occurrences", rng.choice(ws), ws

    def key(self, item) -> str:
        return list_key(item[2])

    def render(self, item, difficulty: int, rng: random.Random) -> Task:
        what, word, ws = item
        if what == "words":
            n = len(ws)
            reference = f"There are {n} words."
        else:
            n = ws.count(word)
            reference = f"The word {word} appears {n} {'time' if n == 1 else 'times'}."
        prompt = rng.choice(self.PROMPTS[what]).format(w=word, l=join_list(ws))
        fields = dict(count=what, words=list(ws)) | ({"word": word} if word else {})
        return Task(prompt, task_meta(self.name, difficulty, self.key(item), n, reference, **fields))

    def statement(self, item, rng: random.Random) -> str:
        what, word, ws = item
        if what == "words":
            return f"The list {join_list(ws)} has {len(ws)} words."
        n = ws.count(word)
        return f"In the list {join_list(ws)}, the word {word} appears {n} {'time' if n == 1 else 'times'}."


# ---- dispatch -----------------------------------------------------------------------------------------------
def _checkers():
    from lmforge.align.world.facts import check_fact, credit_fact

    return {"arithmetic": (check_number, credit_number), "counting": (check_number, credit_number),
            "lists": (check_list, credit_list), "facts": (check_fact, credit_fact)}


def check_task(meta: dict, answer: str) -> bool:
    """Whether `answer` solves the task of `meta` (any family)."""
    return _checkers()[meta["family"]][0](meta, answer)


def credit_task(meta: dict, answer: str) -> float:
    """The family's partial credit in [0, 1] for `answer` (1 exactly when `check_task` passes)."""
    return _checkers()[meta["family"]][1](meta, answer)


FAMILY_NAMES = ("arithmetic", "lists", "facts", "counting")
