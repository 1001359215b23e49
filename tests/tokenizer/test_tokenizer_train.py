"""`train_tokenizer` and `Tokenizer`: Llama 2's settings, digits, byte fallback, inputs, atomic output, errors."""

import hashlib
import json
import random

import pytest
from tokenizer_helpers import PARITY_TEXTS, synthetic_documents

from lmforge.cli import main
from lmforge.data.sources import DataError
from lmforge.tokenizer import Tokenizer, TokenizerError, train_tokenizer

model_pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")


def proto_of(path):
    m = model_pb2.ModelProto()
    m.ParseFromString(open(path, "rb").read())
    return m


def test_model_has_llama2_settings(tok_path):
    m = proto_of(tok_path)
    t, n = m.trainer_spec, m.normalizer_spec
    assert t.model_type == model_pb2.TrainerSpec.BPE
    assert (t.vocab_size, len(m.pieces)) == (600, 600)
    assert t.split_digits and t.byte_fallback and t.allow_whitespace_only_pieces
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2, -1)
    assert [p.piece for p in m.pieces[:3]] == ["<unk>", "<s>", "</s>"]
    assert n.name == "identity" and n.add_dummy_prefix and not n.remove_extra_whitespaces and not n.precompiled_charsmap
    bytes_ = [p.piece for p in m.pieces if p.type == model_pb2.ModelProto.SentencePiece.BYTE]
    assert bytes_ == [f"<0x{b:02X}>" for b in range(256)]


def test_tokenizer_api(tok, tok_path):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, -1, 600)
    assert tok.sha256 == hashlib.sha256(open(tok_path, "rb").read()).hexdigest()
    ids = tok.encode("the quick fox")
    assert tok.encode("the quick fox", bos=True, eos=True) == [1, *ids, 2]
    assert tok.decode([1, *ids, 2]) == "the quick fox"
    assert tok.encode_batch(PARITY_TEXTS, eos=True) == [tok.encode(t, eos=True) for t in PARITY_TEXTS]
    assert tok.encode_batch(PARITY_TEXTS, num_threads=2) == [tok.encode(t) for t in PARITY_TEXTS]
    assert [tok.piece_to_id(tok.id_to_piece(i)) for i in range(tok.vocab_size)] == list(range(tok.vocab_size))
    assert tok.piece_to_id("no such piece") == tok.unk_id
    assert list(tok.encode_numpy("the quick fox", eos=True)) == ids + [2]
    assert Tokenizer(tok_path.rsplit("/", 1)[0]).sha256 == tok.sha256  # a folder holding tokenizer.model
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(IndexError):
        tok.id_to_piece(600)


def test_not_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer(tmp_path / "tokenizer.model")
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer(tmp_path / "missing.model")


def test_round_trip_and_no_unk_on_fixed_texts(tok):
    for text in PARITY_TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text)
        assert tok.unk_id not in ids, repr(text)  # byte fallback: nothing is ever <unk>


def test_digits_are_always_single_tokens(tok):
    for i in range(tok.vocab_size):  # no piece holds a digit next to anything else (split_digits)
        piece = tok.id_to_piece(i).lstrip("▁")
        if not tok.sp.is_byte(i) and any(c in "0123456789" for c in piece):
            assert len(piece) == 1, piece
    rng = random.Random(0)
    for _ in range(50):
        number = str(rng.randint(0, 10**12))
        pieces = [tok.id_to_piece(i) for i in tok.encode(f"x = {number}")]
        assert [p for p in pieces if p.strip("▁")][-len(number):] == list(number)


def test_unseen_characters_become_byte_pieces(tok):
    for char in ("𝔘", "🦙", "ᚠ"):  # not in the corpus
        assert char not in "".join(synthetic_documents())
        pieces = [tok.id_to_piece(i) for i in tok.encode(char)]
        assert pieces == ["▁"] + [f"<0x{b:02X}>" for b in char.encode("utf-8")]
    assert "<0x0A>" in [tok.id_to_piece(i) for i in tok.encode("x\ny")]
    assert not any("\n" in tok.id_to_piece(i) for i in range(tok.vocab_size))  # lines are trained one by one


def test_training_is_deterministic_and_reads_every_input_kind(corpus_file, tok, tmp_path):
    """The same lines in the same order give the same model bytes, whatever the container."""
    docs = synthetic_documents()
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    again = Tokenizer(train_tokenizer([str(corpus_file)], out_dir=str(tmp_path / "a"), vocab_size=600))
    assert again.sha256 == tok.sha256
    from_jsonl = Tokenizer(train_tokenizer([str(tmp_path / "d.jsonl")], out_dir=str(tmp_path / "b"), vocab_size=600,
                                           text_field="body"))
    assert from_jsonl.sha256 == tok.sha256
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "folder" / "nested"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"text": docs[:200]}), folder.parent / "a.parquet")
    (folder / "b.txt").write_text("\n".join(docs[200:]))
    (folder / ".hidden.txt").write_text("ignored hidden file")
    from_folder = Tokenizer(train_tokenizer([str(tmp_path / "folder")], out_dir=str(tmp_path / "c"), vocab_size=600))
    assert from_folder.sha256 == tok.sha256
    info = json.loads((tmp_path / "c" / "tokenizer_train.json").read_text())
    assert info["sha256"] == tok.sha256 and info["corpus"]["documents"] == 201


def test_output_is_atomic_and_not_overwritten(corpus_file, tmp_path):
    out = tmp_path / "tok"
    train_tokenizer([str(corpus_file)], out_dir=str(out), vocab_size=400)
    assert sorted(p.name for p in out.iterdir()) == [".lmforge-output", "tokenizer.model", "tokenizer_train.json"]
    with pytest.raises(FileExistsError, match="overwrite"):
        train_tokenizer([str(corpus_file)], out_dir=str(out), vocab_size=500)
    train_tokenizer([str(corpus_file)], out_dir=str(out), vocab_size=500, overwrite=True)
    assert Tokenizer(out).vocab_size == 500
    assert sorted(p.name for p in out.iterdir()) == [".lmforge-output", "tokenizer.model", "tokenizer_train.json"]


def test_vocabulary_too_large_is_a_clear_error(corpus_file, tmp_path):
    with pytest.raises(TokenizerError, match=r"vocab_size=50000 is too large for this corpus.*<= \d+"):
        train_tokenizer([str(corpus_file)], out_dir=str(tmp_path / "out"), vocab_size=50000)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", r"empty\.txt is empty"),
        ("blank.txt", b"  \n\n", r"blank\.txt is empty"),
        ("binary.txt", b"text\n\x00\x01\x02", r"binary\.txt:2: looks binary"),
        ("latin1.txt", "ok\nline two\ncaf\u00e9\n".encode("latin-1"), r"latin1\.txt:3: not valid UTF-8"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": oops}\n', r"bad\.jsonl:2: not valid JSON"),
        ("nofield.jsonl", b'{"text": "a"}\n\n{"body": "b"}\n', r"nofield\.jsonl:3: no field 'text' \(fields: body\)"),
        ("notstr.jsonl", b'{"text": 7}\n', r"notstr\.jsonl:1: field 'text' is int"),
        ("list.jsonl", b'["text"]\n', r"list\.jsonl:1: expected a JSON object"),
        ("badutf8.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', r"badutf8\.jsonl:2: not valid UTF-8"),
        ("emptytexts.jsonl", b'{"text": ""}\n', r"emptytexts\.jsonl is empty"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, corpus_file, name, content, message):
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        train_tokenizer([str(corpus_file), str(tmp_path / name)], out_dir=str(out), vocab_size=400)
    assert not out.exists()


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=f"no such file or folder: {tmp_path / 'nope.txt'}"):
        train_tokenizer([str(tmp_path / "nope.txt")], out_dir=str(tmp_path / "out"), vocab_size=400)
    assert not (tmp_path / "out").exists()


def test_extra_special_pieces(corpus_file, tmp_path):
    tok = Tokenizer(train_tokenizer([str(corpus_file)], out_dir=str(tmp_path), vocab_size=600,
                                    user_defined_symbols=["<tool>"], control_symbols=["<ctrl>"]))
    assert [tok.id_to_piece(i) for i in range(5)] == ["<unk>", "<s>", "</s>", "<ctrl>", "<tool>"]
    assert tok.piece_to_id("<tool>") in tok.encode("call<tool>now")  # user-defined: whole, from text
    assert tok.piece_to_id("<ctrl>") not in tok.encode("<ctrl>")  # control: only ever an id
    assert tok.decode(tok.encode("call <tool> now")) == "call <tool> now"
    with pytest.raises(TokenizerError, match="given twice"):
        train_tokenizer([str(corpus_file)], out_dir=str(tmp_path / "x"), user_defined_symbols=["</s>"])


def test_cli_help_and_run(corpus_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["tokenizer", "train", "--help"])
    assert "Train a SentencePiece BPE tokenizer with Llama 2's settings" in capsys.readouterr().out
    main(["tokenizer", "train", "--data", str(corpus_file), "--out_dir", str(tmp_path), "--vocab_size", "400"])
    assert Tokenizer(tmp_path).vocab_size == 400
