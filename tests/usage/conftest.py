"""Fixtures for the tests of what a new user meets (issue 13): a tiny model folder with its tokenizer, a small
corpus, and token shards the model can be evaluated on; tiny models run on one thread."""

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import CORPUS, one_torch_thread, tiny_tokenizer_path  # noqa: F401  (one_torch_thread: autouse)
from lmforge import ModelConfig, Transformer
from lmforge.data import write_token_documents
from lmforge.models.checkpoint import save_model


@pytest.fixture(scope="session")
def tokenizer_file() -> str:
    return tiny_tokenizer_path()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS * 20, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_file) -> Path:
    """Our folder of a random `tiny` model (max_seq_len 256, vocabulary 512) with a 320-piece tokenizer."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "model"
    save_model(Transformer(ModelConfig.from_name("tiny")), path, tokenizer_path=tokenizer_file)
    return path


@pytest.fixture(scope="session")
def token_dir(tmp_path_factory, tokenizer_file) -> Path:
    """A few thousand random ids as token shards with a validation split."""
    rng = np.random.default_rng(0)
    docs = [(rng.integers(3, 320, int(rng.integers(50, 200))).tolist() + [2], None) for _ in range(60)]
    path = tmp_path_factory.mktemp("data") / "tokens"
    write_token_documents(docs, path, tokenizer_file, val_fraction=0.3)
    return path

