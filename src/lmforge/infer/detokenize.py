"""Incremental detokenization and stop strings, one `TextStream` per generated sequence.

Decoding token by token is not decoding each token alone: SentencePiece drops the leading space of the first
piece of a decode call ("\u2581Hello" alone decodes to "Hello"), and a character that byte fallback splits
over several tokens decodes to U+FFFD until its last byte arrives. So each step decodes a short window of
recent ids twice (Hugging Face's TextStreamer / vLLM's approach):

    prefix = decode(ids[prefix_offset:read_offset])     text already emitted, re-decoded for context
    full   = decode(ids[prefix_offset:])
    if full is longer and does not end in U+FFFD:  new text = full[len(prefix):], both offsets move on
    else:                                          wait for the next token

Worked example, ids decoding as ["\u2581Hel", "lo", "\u2581w", "orld"]: step 1 emits "Hel" (decode of one
piece), step 2 emits "lo", step 3 decodes "lo w" after prefix "lo" and emits " w", step 4 emits "orld":
the concatenation "Hello world" is decode(all ids).

A continuation is decoded in the context of its prompt: `TextStream(tok, context=prompt_ids[-6:])` starts with
the prompt's last ids already read, so the first new piece is decoded after them and keeps its space. Worked
example, prompt "The module" = [<s>, "\u2581The", "\u2581module"], next piece "\u2581is": without context the
first text is "is"; with it, prefix = decode(["\u2581module"]) = "module", full = "module is", new text " is",
and prompt text + continuation text reads "The module is". (After a prompt of <s> alone the piece starts the
document, and its leading space is SentencePiece's dummy prefix: dropped, as decode(all ids) drops it.)

Stop strings may span tokens, so they are searched in the accumulated text, from the last
`len(stop) - 1` characters before the new text on. Streamed text holds back any suffix that could still
become a stop string: text "Hello wor" with stop "world" emits "Hello " and keeps "wor" until the next token
completes or breaks the match; a completed stop truncates the text before it ("Hello ").
"""

from __future__ import annotations

from typing import Protocol, Sequence


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


def _held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string.

    Worked example, text "Hello wor", stops ["world", "or!"]: "wor" starts "world" (3), "or" starts "or!"
    (2) -> 3.
    """
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class TextStream:
    """The text of one generated sequence, grown token by token, with stop-string detection.

    `add(token_id)` returns the newly safe text (possibly "") and whether a stop string completed; `finish()`
    returns whatever was held back. `text` is the text so far (after a stop: up to the stop string). `context`:
    ids that come before the stream (the end of the prompt), read but never part of `text`.
    """

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = (), context: Sequence[int] = ()):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = [int(i) for i in context]
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.text = ""  # decoded text, complete characters only
        self.emitted = 0  # characters of `text` already returned by add()
        self.stopped = False

    def add(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            raise RuntimeError("TextStream.add after a stop string")
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            old_len = len(self.text)
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if self._find_stop(old_len):
                return self._take(len(self.text)), True
        safe = len(self.text) - _held_suffix(self.text, self.stop)
        return self._take(safe), False

    def _find_stop(self, old_len: int) -> bool:
        """Search the stops that can end in the new text; on a hit, cut `text` before the earliest one."""
        hits = []
        for stop in self.stop:
            start = max(0, old_len - len(stop) + 1)
            at = self.text.find(stop, start)
            if at >= 0:
                hits.append(at)
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.stopped = True
        return True

    def finish(self) -> str:
        """End of the sequence: the held-back text, plus any trailing incomplete bytes as decoded."""
        if not self.stopped:
            prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
            full = self.tokenizer.decode(self.ids[self.prefix_offset :])
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset = len(self.ids)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out


__all__ = ["Decoder", "TextStream"]
