"""Session fixtures: a tiny tokenizer (300 pieces) and a corpus file of synthetic documents."""

import pytest
from data_helpers import synthetic_documents, write_jsonl

from lmforge.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="session")
def docs():
    return synthetic_documents()


@pytest.fixture(scope="session")
def corpus(docs, tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", docs)


@pytest.fixture(scope="session")
def tok_path(corpus, tmp_path_factory):
    return train_tokenizer([str(corpus)], out_dir=str(tmp_path_factory.mktemp("tok")), vocab_size=300)


@pytest.fixture(scope="session")
def tok(tok_path):
    return Tokenizer(tok_path)
