"""Parity gate: our ids == SentencePiece's == Hugging Face AutoTokenizer's (from our export), and
decode(encode(x)) == x, on fixed texts and on random Unicode text (hypothesis)."""

import json

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_helpers import PARITY_TEXTS

from lmforge.tokenizer import CHAT_TEMPLATE, Tokenizer, TokenizerError, export_hf_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

# Valid Unicode text: no surrogates (category Cs, not encodable as UTF-8) and no U+2581, which SentencePiece
# decodes as a space.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=80)
# Text dense in what tokenizers get wrong: whitespace runs at the ends, digits, emoji, scripts.
TRICKY = st.lists(st.sampled_from(list(" \t\n\r ab1é日🙂ع") + ["  ", "\t\t", "\n\n", "[INST]", "[/INST]", "the"]),
                  max_size=30).map("".join)


def hf_ids(hf_tok, text):
    # split_special_tokens: treat "<s>" in text as characters, as SentencePiece does (hf_export.py NOTE)
    return hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True)


def test_export_writes_the_expected_files(hf_dir, tok):
    assert sorted(p.name for p in hf_dir.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    specials = (config["bos_token"], config["eos_token"], config["unk_token"], config["pad_token"])
    assert specials == ("<s>", "</s>", "<unk>", None)
    assert config["add_bos_token"] is True and config["add_eos_token"] is False and config["legacy"] is True
    assert config["chat_template"] == CHAT_TEMPLATE
    assert Tokenizer(hf_dir).sha256 == tok.sha256


@pytest.mark.parametrize("text", PARITY_TEXTS)
def test_ids_equal_sentencepiece_and_hugging_face(text, tok, tok_path, hf_tok):
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    ours = tok.encode(text)
    assert ours == sp.encode(text)
    assert hf_ids(hf_tok, text) == ours
    assert hf_tok.encode(text, split_special_tokens=True) == [tok.bos_id, *ours]  # add_bos_token, no eos
    assert tok.decode(ours) == text
    assert hf_tok.decode(ours) == text


def test_batch_encoding_matches(tok, hf_tok):
    batch = hf_tok(PARITY_TEXTS, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert batch == tok.encode_batch(PARITY_TEXTS)


def test_special_token_strings_in_text_differ_as_documented(tok, hf_tok):
    """Hugging Face parses "<s>" in text as id 1 by default; SentencePiece (and we) encode the characters."""
    assert tok.bos_id not in tok.encode("a <s> b")
    assert tok.bos_id in hf_tok.encode("a <s> b", add_special_tokens=False)
    assert hf_ids(hf_tok, "a <s> b") == tok.encode("a <s> b")


@settings(max_examples=300, deadline=None)
@given(text=TEXT | TRICKY)
def test_round_trip_and_parity_on_random_text(text, tok, hf_tok):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert hf_ids(hf_tok, text) == ids


def test_llama_tokenizer_class_matches_except_on_leading_whitespace(tok_path, tok, tmp_path):
    export_hf_tokenizer(tok_path, tmp_path, tokenizer_class="LlamaTokenizerFast")
    llama = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(llama).__name__ == "LlamaTokenizer"
    for text in PARITY_TEXTS:
        if text and not text[0].isspace():
            assert hf_ids(llama, text) == tok.encode(text), repr(text)


@pytest.mark.xfail(strict=True, reason="transformers 5 LlamaTokenizer replaces tokenizer.json's normalizer by a "
                   "Metaspace pre-tokenizer that skips the dummy prefix before a leading space (hf_export.py NOTE)")
def test_llama_tokenizer_class_on_leading_whitespace(tok_path, tok, tmp_path):
    export_hf_tokenizer(tok_path, tmp_path, tokenizer_class="LlamaTokenizerFast")
    llama = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf_ids(llama, " leading space") == tok.encode(" leading space")


def test_user_defined_pieces_match(corpus_file, tmp_path):
    path = train_tokenizer([str(corpus_file)], out_dir=str(tmp_path / "tok"), vocab_size=600,
                           user_defined_symbols=["<tool>", "[INST]"], control_symbols=["<ctrl>"])
    tok = Tokenizer(path)
    export_hf_tokenizer(path, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in ["<tool>", "a<tool>b", " <tool> x", "x <tool>", "<tool><tool>", "  <tool>", "the <tool>the",
                 "[INST] hi [/INST]", "<ctrl> stays text", *PARITY_TEXTS]:
        assert hf_ids(hf, text) == tok.encode(text), repr(text)


def test_only_bpe_models_with_identity_normaliser_export(corpus_file, tmp_path):
    spm.SentencePieceTrainer.train(input=str(corpus_file), model_prefix=str(tmp_path / "uni"), vocab_size=400,
                                   model_type="unigram", minloglevel=2)
    with pytest.raises(TokenizerError, match="only BPE"):
        export_hf_tokenizer(tmp_path / "uni.model", tmp_path / "hf")
    spm.SentencePieceTrainer.train(input=str(corpus_file), model_prefix=str(tmp_path / "nfkc"), vocab_size=400,
                                   model_type="bpe", minloglevel=2)  # default normaliser: nmt_nfkc
    with pytest.raises(TokenizerError, match="identity normaliser"):
        export_hf_tokenizer(tmp_path / "nfkc.model", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
