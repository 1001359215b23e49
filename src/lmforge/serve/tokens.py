"""Token ids as the API shows them: token strings, their bytes, and OpenAI's two log-probability shapes.

A token's string is its SentencePiece piece with the meta-space "\u2581" shown as " " ("\u2581Hello" -> " Hello");
a byte-fallback piece "<0x0A>" is that byte: "\\n" for ASCII, else "bytes:\\xe2" (OpenAI's way to show part of
a character), its `bytes` [226]; control pieces stay as they are ("<s>", "</s>").

    chat          {"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]} per token
    completions   {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}, ...],
                   "text_offset": [...]}; the chosen token is always in its top_logprobs dict (so a dict has up
                   to logprobs + 1 entries, as OpenAI documents); with echo, the prompt's first token has None
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
MIN_LOGPROB = -9999.0  # NOTE: JSON has no -inf; a log-prob below this (a token of probability ~0) shows as this


def finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


class Vocabulary:
    """The tokenizer's view of ids: text of a sequence, string and bytes of one token.

    NOTE: a model whose vocabulary is padded past the tokenizer's can sample ids the tokenizer does not have;
    they decode to nothing (and show as "") instead of failing the request.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.size = tokenizer.vocab_size
        self.eos_id = tokenizer.eos_id
        self._strings: dict[int, str] = {}

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if 0 <= i < self.size])

    def string(self, token_id: int) -> str:
        s = self._strings.get(token_id)
        if s is None:
            s = self._strings[token_id] = self._string(token_id)
        return s

    def _string(self, token_id: int) -> str:
        if not 0 <= token_id < self.size:
            return ""
        piece = self.tokenizer.id_to_piece(token_id)
        m = _BYTE.fullmatch(piece)
        if m:
            b = int(m[1], 16)
            return chr(b) if b < 0x80 else f"bytes:\\x{b:02x}"
        return piece.replace("\u2581", " ")

    def bytes(self, token_id: int) -> list[int]:
        if 0 <= token_id < self.size:
            m = _BYTE.fullmatch(self.tokenizer.id_to_piece(token_id))
            if m:
                return [int(m[1], 16)]
        return list(self.string(token_id).encode("utf-8"))


def chat_logprobs(vocab: Vocabulary, tokens, n_top: int) -> list[dict]:
    """Chat's `logprobs.content` entries of generated tokens (generation.TokenInfo)."""
    out = []
    for t in tokens:
        top = [{"token": vocab.string(i), "logprob": finite(lp), "bytes": vocab.bytes(i)} for i, lp in (t.top or [])[:n_top]]
        out.append({"token": vocab.string(t.id), "logprob": finite(t.logprob), "bytes": vocab.bytes(t.id),
                    "top_logprobs": top})
    return out


class CompletionLogprobs:
    """The completions shape, grown token by token (prompt tokens for echo, then generated ones)."""

    def __init__(self, vocab: Vocabulary, n_top: int, offset: int = 0):
        self.vocab, self.n_top, self.offset = vocab, n_top, offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, token_id: int, logprob: float | None, top: Sequence[tuple[int, float]] | None) -> None:
        s = self.vocab.string(token_id)
        self.tokens.append(s)
        if logprob is None:
            self.token_logprobs.append(None)
            self.top_logprobs.append(None)
        else:
            self.token_logprobs.append(finite(logprob))
            entry = {self.vocab.string(i): finite(lp) for i, lp in (top or [])[: self.n_top]}
            entry.setdefault(s, finite(logprob))
            self.top_logprobs.append(entry)
        self.text_offset.append(self.offset)
        self.offset += len(s)

    def take(self) -> dict:
        """What was added since the last take (a streamed chunk's share), as the API's dict."""
        out = {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
               "text_offset": self.text_offset}
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out


__all__ = ["CompletionLogprobs", "Vocabulary", "chat_logprobs"]
