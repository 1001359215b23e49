"""`Tokenizer`: a thin, typed wrapper around a SentencePiece model file (ours, Llama 2's or Mistral's).

Ids come straight from SentencePiece; the wrapper adds nothing to the text (no special-token parsing: the
string "<s>" encodes as the characters `<`, `s`, `>`, never as id 1, as in Meta's reference code) and only
appends `bos_id` / `eos_id` when asked. Worked example with Llama 2's tokenizer.model:

    tok = Tokenizer("llama-2-7b/tokenizer.model")
    tok.encode("Hello world", bos=True)       # [1, 15043, 3186]
    tok.encode(" Hello world")                # [29871, 15043, 3186]  (the dummy prefix keeps the space)
    tok.decode([1, 15043, 3186])              # "Hello world"  (control ids decode to nothing)

`sha256` is the digest of the model file's bytes: manifests of token shards record it so that shards are
never silently read with a different vocabulary.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm


class TokenizerError(ValueError):
    """A tokenizer model that cannot be loaded, or a tokenizer that cannot be trained as asked."""


class Tokenizer:
    """Encode and decode text with a SentencePiece model.

    `vocab_size` V counts every piece, control and byte pieces included, so ids lie in [0, V). `pad_id` is
    -1 when the model has no pad piece (Llama 2, Mistral and our default): pad with `eos_id` or mask instead.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "tokenizer.model"
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"cannot read tokenizer model {self.path}: {e.strerror or e}") from None
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{self.path} is not a SentencePiece model: {e}") from None
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.vocab_size: int = self.sp.get_piece_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.unk_id: int = self.sp.unk_id()
        self.pad_id: int = self.sp.pad_id()

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]}...)"

    # NOTE: Meta's reference asserts `type(s) is str`; we do too, because encode(bytes) in SentencePiece
    # silently decodes and a list of strings would silently take the batch path.
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, with `bos_id` prepended and `eos_id` appended when asked."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = self.sp.encode(text)
        return self._wrap(ids, bos, eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]:
        """`[encode(t, bos, eos) for t in texts]`, with SentencePiece's own thread pool when `num_threads` > 1."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch expects a sequence of str")
        batch: list[list[int]] = self.sp.encode(list(texts), num_threads=num_threads)
        return [self._wrap(ids, bos, eos) for ids in batch]

    def encode_numpy(self, text: str, eos: bool = False) -> np.ndarray:
        """`encode(text, eos=eos)` as an int64 array, without building a Python list (the shard writer's path)."""
        ids = np.asarray(self.sp.encode_as_numpy(text) if text else [], dtype=np.int64)
        return np.append(ids, self.eos_id) if eos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; control ids (`<s>`, `</s>`) decode to nothing, byte pieces to their UTF-8 text."""
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"id {i} is outside the vocabulary [0, {self.vocab_size})")
        return self.sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        """Id of `piece`; pieces not in the vocabulary map to `unk_id` (SentencePiece's convention)."""
        return self.sp.piece_to_id(piece)

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id < 0:
                raise TokenizerError(f"{self.path} has no <s> piece, cannot add bos")
            ids = [self.bos_id, *ids]
        if eos:
            if self.eos_id < 0:
                raise TokenizerError(f"{self.path} has no </s> piece, cannot add eos")
            ids = [*ids, self.eos_id]
        return ids
