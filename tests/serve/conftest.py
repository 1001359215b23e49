"""Serving tests: a tiny random model behind the real server on 127.0.0.1, with a 512-piece tokenizer.

The tokenizer is trained once per session on the tokenizer tests' seeded synthetic corpus (prose, code,
digits, non-Latin scripts, so answers exercise byte fallback); 512 pieces, the tiny presets' vocabulary, so
that every id the model samples decodes.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tokenizer"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))

from serve_helpers import live_server, tiny_served  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
    from tokenizer_helpers import synthetic_documents

    from lmforge.tokenizer.train import train_tokenizer

    folder = tmp_path_factory.mktemp("serve-tok")
    (folder / "corpus.txt").write_text("\n\n".join(synthetic_documents(300)), encoding="utf-8")
    return train_tokenizer([str(folder / "corpus.txt")], out_dir=str(folder / "tok"), vocab_size=512, num_threads=1)


@pytest.fixture(scope="session")
def served(tokenizer_path):
    return tiny_served(tokenizer_path)


@pytest.fixture(scope="session")
def server(served):
    """One live server for the session's tests (no API key); yields its base URL (http://127.0.0.1:PORT)."""
    with live_server(served) as url:
        yield url
