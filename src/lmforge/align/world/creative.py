"""Creative prompts: open requests (a poem, a story, a description) with many good answers.

They are the world's counterpart of its factual prompts (the fact look-ups), for the analysis of how
alignment changes answer diversity with temperature: a factual prompt has one right answer, a creative one
many. The SFT demonstrations are drawn from a small grammar, so the same prompt has varied references. The
oracle's helpfulness of a creative answer is the share of the prompt's subject words it uses (oracle.py);
there is no right or wrong.

Item: (template index, subject words); subjects come from the list vocabulary (common.py).
"""

from __future__ import annotations

import random

from lmforge.align.world.common import ANIMALS, COLOURS, OBJECTS

# template, and the vocabulary each of its slots draws from
TEMPLATES = (
    ("Write a short poem about a {0} {1}.", (COLOURS, ANIMALS)),
    ("Tell a short story about a {0} and a {1}.", (ANIMALS, OBJECTS)),
    ("Describe a {0} {1} in a few words.", (COLOURS, OBJECTS)),
    ("Write a tiny tale about a {0} who lost a {1}.", (ANIMALS, OBJECTS)),
    ("Make up a song about a {0} {1}.", (COLOURS, ANIMALS)),
)
_OPENERS = ("Once", "One morning", "Long ago", "At dusk", "In spring", "One winter night")
_PLACES = ("by the river", "in the old forest", "on a windy hill", "near the sea", "under the bridge",
           "in a quiet town")
_DOINGS = ("sang softly", "danced in the rain", "slept until noon", "watched the stars", "ran through the grass",
           "waited for a friend")
_ENDINGS = ("and everyone smiled.", "and the day ended in peace.", "and nobody ever forgot it.",
            "and the wind carried the tale away.", "and that was enough.")


def draw(rng: random.Random) -> tuple[int, tuple[str, ...]]:
    t = rng.randrange(len(TEMPLATES))
    return t, tuple(rng.choice(vocab) for vocab in TEMPLATES[t][1])


def key(item) -> str:
    t, subjects = item
    return f"creative|{t}|{','.join(subjects)}"


def reference(subjects: tuple[str, ...], rng: random.Random) -> str:
    """One answer from the grammar, naming every subject word."""
    one = subjects[0] in COLOURS  # "a red fox" (one thing) or "a fox and a cup" (two)
    thing = f"a {subjects[0]} {subjects[1]}" if one else f"a {subjects[0]} and a {subjects[1]}"
    return (f"{rng.choice(_OPENERS)}, {thing} {rng.choice(_DOINGS)} {rng.choice(_PLACES)}. "
            f"{'It' if one else 'They'} {rng.choice(_DOINGS)} {rng.choice(_PLACES)}, {rng.choice(_ENDINGS)}")


def render(item, rng: random.Random) -> tuple[list[dict], dict]:
    t, subjects = item
    meta = {"kind": "creative", "item": key(item), "subjects": list(subjects), "reference": reference(subjects, rng)}
    return [{"role": "user", "content": TEMPLATES[t][0].format(*subjects)}], meta
