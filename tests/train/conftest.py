"""Seeded synthetic token shards for the training tests (never the stdlib corpus: its text varies by Python).

The shards go through the data module's real writer (`write_token_documents`), so the loader, the manifest
and the loss masks are the ones a real run reads. The tokenizer only lends its vocabulary size and sha256
to the manifest: the ids are random.
"""

from pathlib import Path

import numpy as np
import pytest

from lmforge.data import write_token_documents
from lmforge.tokenizer.train import train_tokenizer

VOCAB = 512  # the tiny presets' vocabulary


@pytest.fixture(scope="session")
def tokenizer_512(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(3000)]
    (folder / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(3000)))
    return train_tokenizer([str(folder / "corpus.txt")], out_dir=str(folder / "tok"), vocab_size=VOCAB, num_threads=1)


def synthetic_documents(seed: int, n_docs: int, masked: bool):
    """n_docs documents of 20-200 ids ending with </s> (id 2); with `masked`, each learns only after a random
    "prompt" prefix and every fourth learns nothing, so batches hold very different numbers of targets."""
    rng = np.random.default_rng(seed)
    for i in range(n_docs):
        n = int(rng.integers(20, 200))
        # a little structure to learn: runs of +1 steps from random starts
        starts = rng.integers(3, VOCAB, n // 8 + 1).repeat(8)[:n]
        ids = (starts + np.tile(np.arange(8), n // 8 + 1)[:n]) % (VOCAB - 3) + 3
        ids[-1] = 2
        mask = None
        if masked:
            mask = np.zeros(n, dtype=np.uint8) if i % 4 == 3 else (np.arange(n) >= rng.integers(0, n)).astype(np.uint8)
        yield ids, mask


def make_data(out: Path, tokenizer: str, masked: bool) -> str:
    write_token_documents(synthetic_documents(0, 400, masked), out, tokenizer, val_fraction=0.1, seed=0)
    return str(out)


@pytest.fixture(scope="session")
def token_data(tmp_path_factory, tokenizer_512) -> str:
    """About 44k train and 5k validation tokens, every target learnt."""
    return make_data(tmp_path_factory.mktemp("data") / "plain", tokenizer_512, masked=False)


@pytest.fixture(scope="session")
def masked_token_data(tmp_path_factory, tokenizer_512) -> str:
    """The same documents with uneven loss masks."""
    return make_data(tmp_path_factory.mktemp("data") / "masked", tokenizer_512, masked=True)
