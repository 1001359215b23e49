"""System instructions whose adherence a checker verifies on any answer, drawn from lists and combinable.

    id           instruction (one of its phrasings)                          adheres when
    capitals     "Answer in capital letters."                                 letters, none lower-case
    first_word   "Begin every answer with the word Behold."                   the first word is Behold
    signoff      "You are Captain Moss, a pirate. End every answer with        the answer ends with it
                  "Yours truly, Captain Moss.""
    language     "Speak Bzzish: put the word bzz before every word ..."       words alternate bzz, word

Every check reads the answer alone (no reference), so it applies to any turn of a dialogue: Ghost Attention
measures adherence at turns 1..T. The "language" is a transform a tiny model can copy (one fixed word before
every word), unlike spelling. Two instructions combine unless they contradict: a language puts its marker
first and last-but-one, so it does not combine with a first word or a sign-off (`PAIRS`).

A spec is a dict {"id", "text", ...parameters} carried in a record's meta; `apply` writes an adherent
answer from a plain one (in the fixed order language, first_word, signoff, capitals), and `strip` undoes
the surface of each instruction so that the task checkers can read what is left (oracle.py).
"""

from __future__ import annotations

import itertools
import random
import re

from lmforge.align.world.common import normalize, words

FIRST_WORDS = ("Indeed", "Well", "Behold", "Alas", "Greetings", "Aye")
PERSONAS = (("Captain Moss", "a pirate", "Yours truly, Captain Moss."),
            ("Old Wren", "a wise hermit", "So says Old Wren."),
            ("Sir Pim", "a knight", "For honour, Sir Pim."),
            ("Madam Quill", "a poet", "With ink, Madam Quill."),
            ("Doctor Fennel", "a village doctor", "Stay well, Doctor Fennel."))
LANGUAGES = (("Bzzish", "bzz"), ("Ribbitese", "ribbit"), ("Squeakish", "squeak"))
PHRASINGS = {
    "capitals": ("Answer in capital letters.", "Write every answer in capital letters.",
                 "Use only capital letters in your answers."),
    "first_word": ("Begin every answer with the word {word}.", "Start each answer with the word {word}."),
    "signoff": ('You are {persona}, {desc}. End every answer with "{signoff}"',
                'Play {persona}, {desc}, and sign every answer with "{signoff}"'),
    "language": ("Speak {name}: put the word {marker} before every word of your answers.",
                 "Answer in {name}, where every word comes after the word {marker}."),
}
ORDER = ("language", "first_word", "signoff", "capitals")  # the order `apply` composes them in
IDS = ORDER
PAIRS = tuple(p for p in itertools.combinations(ORDER, 2)
              if p not in (("language", "first_word"), ("language", "signoff")))


def make_spec(kind: str, rng: random.Random) -> dict:
    """A random instruction of `kind`: its parameters drawn from the lists, and one of its phrasings."""
    spec: dict = {"id": kind}
    if kind == "first_word":
        spec["word"] = rng.choice(FIRST_WORDS)
    elif kind == "signoff":
        persona, desc, signoff = rng.choice(PERSONAS)
        spec |= {"persona": persona, "desc": desc, "signoff": signoff}
    elif kind == "language":
        name, marker = rng.choice(LANGUAGES)
        spec |= {"name": name, "marker": marker}
    elif kind != "capitals":
        raise ValueError(f"unknown instruction {kind!r}; instructions are {', '.join(IDS)}")
    spec["text"] = rng.choice(PHRASINGS[kind]).format(**spec)
    return spec


def draw_specs(rng: random.Random, pair_probability: float = 0.3) -> list[dict]:
    """One instruction, or with `pair_probability` two compatible ones, in `ORDER`."""
    kinds = rng.choice(PAIRS) if rng.random() < pair_probability else (rng.choice(IDS),)
    return [make_spec(k, rng) for k in sorted(kinds, key=ORDER.index)]


def instruction_text(specs: list[dict]) -> str:
    return " ".join(s["text"] for s in specs)


def _bare(token: str) -> str:
    return re.sub(r"[^\w']", "", token).lower()


def apply(specs: list[dict], answer: str) -> str:
    """An answer that follows every instruction of `specs`, written from a plain `answer`.

    >>> apply([{"id": "language", "marker": "bzz"}, {"id": "capitals"}], "3 + 4 = 7.")
    'BZZ 3 BZZ + BZZ 4 BZZ = BZZ 7.'
    """
    for spec in sorted(specs, key=lambda s: ORDER.index(s["id"])):
        kind = spec["id"]
        if kind == "language":
            answer = " ".join(f"{spec['marker']} {w}" for w in answer.split())
        elif kind == "first_word":
            answer = f"{spec['word']}, {answer}"
        elif kind == "signoff":
            answer = f"{answer} {spec['signoff']}"
        else:
            answer = answer.upper()
    return answer


def adheres(spec: dict, answer: str) -> bool:
    """Whether `answer` follows the instruction `spec` (checks of the table in the module docstring).

    >>> adheres({"id": "first_word", "word": "Behold"}, "BEHOLD, 3 + 4 = 7.")
    True
    >>> adheres({"id": "signoff", "signoff": "Sir Pim."}, "7. For honour.")
    False
    >>> bzz = {"id": "language", "marker": "bzz"}
    >>> adheres(bzz, "bzz red, bzz cup."), adheres(bzz, "bzz red cup")
    (True, False)
    """
    kind = spec["id"]
    if kind == "capitals":
        return any(c.isalpha() for c in answer) and not any(c.islower() for c in answer)
    if kind == "first_word":
        ws = words(answer)
        return bool(ws) and ws[0] == spec["word"].lower()
    if kind == "signoff":
        return _end(answer).endswith(_end(spec["signoff"]))
    if kind == "language":
        tokens = [_bare(t) for t in answer.split()]
        marker = spec["marker"]
        return (len(tokens) >= 2 and len(tokens) % 2 == 0 and all(t == marker for t in tokens[0::2])
                and all(t != marker for t in tokens[1::2]))
    raise ValueError(f"unknown instruction {kind!r}; instructions are {', '.join(IDS)}")


def _end(text: str) -> str:
    return normalize(text).rstrip(" .!\"'")


def strip(specs: list[dict], answer: str) -> str:
    """`answer` without the surface the instructions add (marker words, the first word, the sign-off), for the
    task checkers; capitals need nothing (the checkers ignore case).

    >>> strip([{"id": "first_word", "word": "Alas"}, {"id": "signoff", "signoff": "Sir Pim."}], "ALAS, 7. SIR PIM.")
    '7.'
    """
    for spec in sorted(specs, key=lambda s: ORDER.index(s["id"]), reverse=True):
        kind = spec["id"]
        if kind == "signoff":
            tail = spec["signoff"].rstrip(" .!")
            m = re.search(re.escape(tail) + r"[\s.!]*$", answer, flags=re.IGNORECASE)
            answer = answer[: m.start()].rstrip() if m else answer
        elif kind == "first_word":
            answer = re.sub(rf"^\s*{re.escape(spec['word'])}\b[,.!:]?\s*", "", answer, flags=re.IGNORECASE)
        elif kind == "language":
            answer = " ".join(t for t in answer.split() if _bare(t) != spec["marker"])
    return answer


PLACEMENTS = ("system", "user", "every_user")


def with_instructions(messages: list[dict], specs: list[dict], placement: str) -> list[dict]:
    """`messages` with the instructions as a system message ("system"), appended to the first user message
    ("user") or to every user message ("every_user": how Ghost Attention samples its answers); a system
    message already there is kept and the instructions follow it."""
    text = instruction_text(specs)
    if placement in ("user", "every_user"):
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        out = [dict(m) for m in messages]
        for i in users if placement == "every_user" else users[:1]:
            out[i]["content"] = f"{out[i]['content']} {text}"
        return out
    if placement != "system":
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']} {text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
