"""Fixtures of the alignment tests: a tiny model folder (ours and Hugging Face's) and seeded dialogue files."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.models.checkpoint import save_model
from lmforge.models.convert import convert

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


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory, tokenizer_512) -> dict[str, Path]:
    """The same random tiny model as our folder ("ours") and as a Hugging Face folder ("hf"), both with the
    512-piece tokenizer."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig.from_name("tiny")), root / "ours", tokenizer_path=tokenizer_512)
    convert(root / "ours", root / "hf", to="hf")
    return {"ours": root / "ours", "hf": root / "hf"}


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    """120 seeded dialogues in the conversational format."""
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", seeded_dialogues(0, 120))
