"""Incremental text and stop strings across token boundaries."""

import random

import pytest

from infer_helpers import tiny_tokenizer_path
from lmforge.infer.detokenize import TextStream, _held_suffix


class BytePieces:
    """A fake tokenizer whose pieces are byte strings: multi-byte characters can span tokens."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def decode(self, ids):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def _stream(pieces, ids, stop=()):
    tok = BytePieces(pieces)
    ts = TextStream(tok, stop)
    chunks, stopped_at = [], None
    for n, i in enumerate(ids):
        text, stopped = ts.add(i)
        chunks.append(text)
        if stopped:
            stopped_at = n
            break
    if stopped_at is None:
        chunks.append(ts.finish())
    return chunks, stopped_at, ts


def test_held_suffix_worked_example():
    assert _held_suffix("Hello wor", ["world", "or!"]) == 3
    assert _held_suffix("Hello", ["world"]) == 0
    assert _held_suffix("w", ["world"]) == 1


def test_stop_string_across_token_boundaries_is_cut_and_held_back():
    pieces = [b"Hel", b"lo w", b"or", b"ld!", b" more"]
    chunks, stopped_at, ts = _stream(pieces, [0, 1, 2, 3, 4], stop=["world"])
    assert stopped_at == 3  # "ld!" completes "world", which began two tokens earlier
    assert ts.text == "Hello "
    # streamed: "Hel", then "lo " (the "w" could start "world"), then nothing while "wor" is held back
    assert chunks == ["Hel", "lo ", "", ""]
    assert "".join(chunks) == "Hello "


def test_held_back_text_is_released_when_the_match_breaks():
    pieces = [b"Hel", b"lo w", b"or", b"ms"]
    chunks, stopped_at, ts = _stream(pieces, [0, 1, 2, 3], stop=["world"])
    assert stopped_at is None
    assert chunks == ["Hel", "lo ", "", "worms", ""]
    assert ts.text == "Hello worms"


def test_earliest_of_several_stops_wins():
    chunks, stopped_at, ts = _stream([b"a", b"bXY", b"Zc"], [0, 1, 2], stop=["XYZ", "bX"])
    assert stopped_at == 1 and ts.text == "a"


def test_split_utf8_characters_wait_for_their_last_byte():
    snow = "\u2603".encode()  # 3 bytes
    pieces = [b"a", snow[:1], snow[1:2], snow[2:], b"b"]
    chunks, _, ts = _stream(pieces, [0, 1, 2, 3, 4])
    assert chunks == ["a", "", "", "\u2603", "b", ""]
    assert ts.text == "a\u2603b"


def test_incomplete_bytes_at_the_end_are_flushed():
    chunks, _, ts = _stream([b"a", "\u2603".encode()[:2]], [0, 1])
    assert chunks[-1] == "\ufffd" and ts.text == "a\ufffd"


def test_streamed_text_equals_decode_with_sentencepiece():
    """Random id sequences through a real tokenizer (byte pieces, leading-space pieces): the concatenated
    stream is exactly decode(ids)."""
    from lmforge.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer(tiny_tokenizer_path())
    rng = random.Random(0)
    samples = [tok.encode("Sliding window attention 東京 café 12345 🙂 and more")]
    samples += [[rng.randrange(3, tok.vocab_size) for _ in range(40)] for _ in range(20)]
    for ids in samples:
        ts = TextStream(tok)
        streamed = "".join(ts.add(i)[0] for i in ids) + ts.finish()
        assert streamed == tok.decode(ids)
        assert ts.text == tok.decode(ids)


def test_add_after_stop_is_an_error():
    _, _, ts = _stream([b"ab"], [0], stop=["b"])
    with pytest.raises(RuntimeError):
        ts.add(0)
