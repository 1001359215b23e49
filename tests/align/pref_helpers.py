"""Seeded preference files for the reward-model and DPO tests (importable as `pref_helpers`)."""

import numpy as np

from lmforge.align.world.oracle import DEGREES
from sft_helpers import WORDS

# The degrees of the seeded pairs: a mixture, so that every margin table has something to do.
SOURCES = ("helpfulness", "safety")


def seeded_pairs(seed: int, n: int, conversational: bool = True) -> list[dict]:
    """n pairs of random-word answers: the chosen answer says "gold" more often than the rejected one, so a
    reward model has a pattern to learn; each pair has a degree, a source and (for safety) a safety bin."""
    rng = np.random.default_rng(seed)

    def text(lo, hi, extra=()):
        return " ".join([*rng.choice(WORDS, int(rng.integers(lo, hi))), *extra])

    out = []
    for i in range(n):
        prompt = text(2, 8)
        chosen, rejected = text(1, 8, ["gold"] * int(rng.integers(1, 3))), text(1, 8)
        source = SOURCES[i % 4 == 3]
        record = {"prompt": [{"role": "user", "content": prompt}] if conversational else prompt,
                  "chosen": [{"role": "assistant", "content": chosen}] if conversational else chosen,
                  "rejected": [{"role": "assistant", "content": rejected}] if conversational else rejected,
                  "degree": DEGREES[int(rng.integers(0, 4))], "source": source}
        if source == "safety":
            record["safety_bin"] = ("chosen_safe", "both_safe", "both_unsafe")[i % 3]
        out.append(record)
    return out
