"""Shared test settings: CPU, float32, deterministic, few threads (CI has 2 cores)."""

import os

import numpy as np
import pytest
import torch

from lmforge.tokenizer.train import train_tokenizer

torch.set_num_threads(2)
if not torch.cuda.is_available():
    # NOTE: Triton kernels (lmforge.infer.engine.triton_decode) run on the CPU under Triton's interpreter,
    # which must be chosen before anything imports triton (torch.compile may, to probe for it); never on a
    # GPU machine, where it would slow every Inductor kernel down
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer_512(tmp_path_factory) -> str:
    """A 512-piece tokenizer (the tiny presets' vocabulary) trained on random lowercase words."""
    folder = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(3000)]
    (folder / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(3000)))
    return train_tokenizer([str(folder / "corpus.txt")], out_dir=str(folder / "tok"), vocab_size=512, num_threads=1)
