"""What every part of the world shares: the version, seeded random streams, the train / held-out split, the word
lists, and the small text parsers the checkers are built from.

Determinism. Every random choice comes from `stream(seed, name)`, a `random.Random` seeded with a string:
Python hashes a string seed with SHA-512, so the same (seed, name) gives the same sequence in every process
and on every machine (unlike `hash()`, which is salted per process). Each purpose has its own named stream,
so drawing more items for one file never shifts the items of another.

The split. An item (an operand pair, a word list, an (entity, attribute) pair, a (category, template, slot)
combination) is held out when `unit_hash(seed, key) < heldout_fraction`, where `key` is the item's canonical
text, e.g. "arithmetic|23+45". The split is a property of the item, decided before any file is written, so
train and held-out data are disjoint by construction: no held-out item can be drawn for a train file.
"""

from __future__ import annotations

import hashlib
import random
import re

VERSION = "v2"  # written as "world": "v2" into every record and file; a change to the world is a new version
SPLITS = ("train", "heldout")

# The word vocabulary of the list and counting tasks: single, common words (SentencePiece keeps each one
# whole, and a tiny transformer copies whole pieces well but cannot spell).
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange", "pink", "grey", "brown", "gold")
ANIMALS = ("fox", "owl", "cat", "dog", "horse", "goat", "frog", "bear", "wolf", "hare", "crow", "duck", "mouse",
           "seal", "deer", "lion")
OBJECTS = ("cup", "lamp", "comb", "book", "bell", "fork", "hat", "boat", "drum", "rope", "kite", "ring", "box", "jar",
           "pen", "bowl")
LIST_WORDS = COLOURS + ANIMALS + OBJECTS

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")


def stream(seed: int, name: str) -> random.Random:
    """The random stream `name` of world `seed` (see the module docstring)."""
    return random.Random(f"world-{VERSION}|{seed}|{name}")


def unit_hash(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by (seed, key): the first 8 bytes of BLAKE2b, divided by 2**64."""
    digest = hashlib.blake2b(f"{VERSION}|{seed}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_of(seed: int, key: str, heldout_fraction: float) -> str:
    """"heldout" or "train" for the item with canonical text `key`."""
    return "heldout" if unit_hash(seed, "split|" + key) < heldout_fraction else "train"


def normalize(text: str) -> str:
    """Lower case, typographic apostrophes made plain: checkers are lenient on case.

    >>> normalize("I CAN’T")
    "i can't"
    """
    return text.lower().replace("\u2019", "'")


_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """The words of `text`, lower-cased, punctuation dropped.

    >>> words("Red, CUP; fox.")
    ['red', 'cup', 'fox']
    """
    return _WORD.findall(normalize(text))


def numbers(text: str) -> list[int]:
    """The non-negative integers of `text` in order, as digits or as number words up to twenty.

    >>> numbers("23 + 45 = 68.")
    [23, 45, 68]
    >>> numbers("The word fox appears Three times")
    [3]
    """
    out = []
    for w in words(text):
        if w.isdigit():
            out.append(int(w))
        elif w in NUMBER_WORDS:
            out.append(NUMBER_WORDS.index(w))
    return out


def last_number(text: str) -> int | None:
    """The last integer of `text` (None if it has none): restating the question before the result is fine.

    >>> last_number("23 + 45 = 68.")
    68
    """
    found = numbers(text)
    return found[-1] if found else None


def join_list(items) -> str:
    """Words of a list as the world writes them: "fox, cup, red"."""
    return ", ".join(items)


def sentence(text: str) -> str:
    """`text` with its first letter upper-cased ("the fox" -> "The fox")."""
    return text[:1].upper() + text[1:]


def draw_split(n: int, split: str, seed: int, heldout_fraction: float, rng: random.Random,
               draw, keys, render, text, unique: bool = True) -> list:
    """Up to `n` renderings of items of `split`, no two with the same text (any, if not `unique`).

    `draw(rng)` gives a random item, `keys(item)` the keys it consists of (all must lie in `split`: a
    multi-turn item holds the items of all its turns), `render(item, rng)` a rendering (it picks the
    phrasing) and `text(rendering)` the text that must be unique within the result. A split with fewer
    distinct texts than `n` gives fewer: the draws stop after 50 * n + 1000 tries (build.py counts what
    each file got).
    """
    out, seen = [], set()
    for _ in range(50 * n + 1000):
        if len(out) == n:
            break
        item = draw(rng)
        if any(split_of(seed, k, heldout_fraction) != split for k in keys(item)):
            continue
        rendered = render(item, rng)
        if not unique or text(rendered) not in seen:
            seen.add(text(rendered))
            out.append(rendered)
    return out
