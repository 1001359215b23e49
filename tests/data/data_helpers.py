"""Seeded synthetic documents of very different lengths (1 to ~200 words) for the data pipeline tests."""

import json
import random

WORDS = "alpha beta gamma delta tokens shard loader packed sample epoch rank world seed 42 7 the of and".split()


def synthetic_documents(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.choice([1, 3, 20, 60, 200]))]
        docs.append(f"doc {i}: " + " ".join(words) + ("\n  indented line" if i % 7 == 0 else ""))
    return docs


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs), encoding="utf-8")
    return path
