"""Session fixtures: one tiny tokenizer (600 pieces, trained once on the synthetic corpus) and its HF export."""

import pytest
from tokenizer_helpers import synthetic_documents

from lmforge.tokenizer import Tokenizer, export_hf_tokenizer, train_tokenizer

VOCAB = 600


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(synthetic_documents()), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tok_path(corpus_file, tmp_path_factory):
    return train_tokenizer([str(corpus_file)], out_dir=str(tmp_path_factory.mktemp("tok")), vocab_size=VOCAB)


@pytest.fixture(scope="session")
def tok(tok_path):
    return Tokenizer(tok_path)


@pytest.fixture(scope="session")
def hf_dir(tok_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    export_hf_tokenizer(tok_path, out)
    return out


@pytest.fixture(scope="session")
def hf_tok(hf_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(hf_dir))
