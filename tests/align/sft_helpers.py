"""Seeded dialogue files for the SFT tests (importable as `sft_helpers`: pytest puts each test folder on sys.path)."""

import json
from pathlib import Path

import numpy as np

WORDS = ("red blue green cat dog fish one two three four five apple tree river stone light dark quick slow "
         "north south east west bread milk salt iron gold paper glass").split()


def seeded_dialogues(seed: int, n: int) -> list[dict]:
    """n dialogues of random words: single- and multi-turn, a third with a system message."""
    rng = np.random.default_rng(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))

    out = []
    for i in range(n):
        messages = [{"role": "system", "content": text(3, 6)}] if i % 3 == 0 else []
        for _ in range(int(rng.integers(1, 4))):
            messages += [{"role": "user", "content": text(2, 10)}, {"role": "assistant", "content": text(1, 12)}]
        out.append({"messages": messages})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
