"""Fixtures of the alignment tests: a tiny model folder (ours and Hugging Face's) and seeded dialogue files."""

from pathlib import Path

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.models.checkpoint import save_model
from lmforge.export import convert
from sft_helpers import seeded_dialogues, write_jsonl


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


@pytest.fixture(scope="session")
def stage_world(tmp_path_factory):
    """A small world folder, a 600-piece tokenizer trained on its corpus, a tiny random model saved with it
    (the tests of gatt, eval gatt, distill-safety and redteam)."""
    from stage_helpers import build_stage_world

    return build_stage_world(tmp_path_factory.mktemp("stage"))
