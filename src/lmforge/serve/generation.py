"""From engine outputs to the choices of a response: text, stop strings, finish reasons, one stream per request.

The engine works on ids (it stops on the end-of-sequence id, stop ids and max_tokens); this layer adds what
needs text, per choice, with `ChoiceDecoder`:

    engine output (new token ids, log-probs, finished?)
        ──► skip the final end-of-sequence / stop id (it is never text)
        ──► TextStream.add (lmforge.infer.detokenize: incremental decoding, stop strings across tokens,
            text that could still start a stop string held back)
        ──► ChoiceUpdate(new text, new tokens, finish_reason)

A stop string ends the choice with finish_reason "stop" and its engine request is aborted at once (its
blocks freed). `Generation` runs every choice of one HTTP request (n per prompt, several prompts) on the
driver: all are added before the first byte of the answer, so that an admission refusal is still an HTTP
status, then their outputs come as one stream of (choice index, update).

`n` > 1 is n independent engine requests (`fan_out`); the one place to change when the engine samples n
sequences from one shared prompt.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Sequence

from lmforge.infer.detokenize import TextStream
from lmforge.infer.engine import RequestOutput
from lmforge.infer.sampling import SamplingParams
from lmforge.serve.driver import EngineDriver, RequestStream

MAX_SEED = 2**63


def fan_out(sampling: SamplingParams, n: int) -> list[SamplingParams]:
    """The sampling parameters of each of n choices: choice i with seed (seed + i) mod 2^63 when the request is
    seeded, so choice 0 equals the same request with n = 1 and the choices differ from each other."""
    if sampling.seed is None:
        return [sampling] * n
    return [dataclasses.replace(sampling, seed=(sampling.seed + i) % MAX_SEED) for i in range(n)]


@dataclass
class TokenInfo:
    """One generated token, with its log-prob and the most likely alternatives when asked for."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token id, log-prob), most likely first


@dataclass
class ChoiceUpdate:
    text: str = ""  # new text, safe to show
    tokens: list[TokenInfo] = field(default_factory=list)  # new tokens
    finish_reason: str | None = None  # "stop", "length" (or "abort" if the engine ended it)


class ChoiceDecoder:
    """The text of one choice, fed with its engine outputs (see the module docstring)."""

    def __init__(self, tokenizer, stop: Sequence[str], end_ids: set[int]):
        """end_ids: the ids that end a choice without being text (end-of-sequence, stop_token_ids)."""
        self.text = TextStream(tokenizer, stop)
        self.end_ids = end_ids
        self.finish_reason: str | None = None
        self.stopped_by_string = False  # the engine request is still running and must be aborted
        self.num_tokens = 0

    def feed(self, out: RequestOutput) -> ChoiceUpdate:
        update = ChoiceUpdate()
        if self.finish_reason is not None:
            return update
        logprobs, top = out.new_logprobs, out.new_top_logprobs
        n = len(out.new_token_ids)
        for k, token in enumerate(out.new_token_ids):
            self.num_tokens += 1
            update.tokens.append(TokenInfo(token, logprobs[k] if logprobs else None, top[k] if top else None))
            if out.finished and k == n - 1 and out.finish_reason == "stop" and token in self.end_ids:
                break  # the end-of-sequence / stop id: not text
            piece, hit = self.text.add(token)
            update.text += piece
            if hit:
                self.finish_reason = update.finish_reason = "stop"
                self.stopped_by_string = True
                return update
        if out.finished:
            update.text += self.text.finish()
            self.finish_reason = out.finish_reason
        update.finish_reason = self.finish_reason
        return update


@dataclass
class ChoiceSpec:
    """What one choice generates: engine sampling parameters (no stop strings) and the stop strings."""

    prompt_ids: list[int]
    sampling: SamplingParams
    stop: list[str]


@dataclass
class ChoiceTiming:
    first: float | None = None  # time.monotonic() of the first token
    last: float | None = None


class Generation:
    """The choices of one HTTP request on the driver: `start()`, then `async for index, update in updates()`.

    Leaving the loop early (the client went away, an error) aborts every choice still running; so does
    `abort()`."""

    def __init__(self, driver: EngineDriver, tokenizer, eos_id: int | None, request_id: str):
        self.driver, self.tokenizer, self.eos_id, self.request_id = driver, tokenizer, eos_id, request_id
        self.stream = RequestStream()
        self.ids: list[str] = []
        self.decoders: list[ChoiceDecoder] = []
        self.timings: list[ChoiceTiming] = []

    async def start(self, specs: Sequence[ChoiceSpec]) -> None:
        """Add every choice to the engine; if one is refused, abort those already added and raise."""
        try:
            for i, spec in enumerate(specs):
                rid = f"{self.request_id}-{i}"
                end_ids = set(spec.sampling.stop_token_ids)
                if self.eos_id is not None and not spec.sampling.ignore_eos:
                    end_ids.add(self.eos_id)
                self.decoders.append(ChoiceDecoder(self.tokenizer, spec.stop, end_ids))
                self.timings.append(ChoiceTiming())
                self.ids.append(rid)
                await self.driver.add(spec.prompt_ids, spec.sampling, rid, self.stream)
        except BaseException:
            self.abort()
            raise

    async def updates(self) -> AsyncIterator[tuple[int, ChoiceUpdate]]:
        """(choice index, update) in step order. The outputs already waiting are taken with the awaited one and
        merged per choice (`RequestStream.ready`), so a busy event loop sends fewer, longer chunks."""
        index = {rid: i for i, rid in enumerate(self.ids)}
        try:
            async for out in self.stream:
                for i, update in self._feed(index, [out, *self.stream.ready()]):
                    yield i, update
        finally:
            self.abort()

    def _feed(self, index: dict[str, int], outs: list[RequestOutput]) -> list[tuple[int, ChoiceUpdate]]:
        """Feed outputs to their choices' decoders: one merged update per choice that has news, in the order of
        each choice's first output."""
        merged: dict[int, ChoiceUpdate] = {}
        now = time.monotonic()
        for out in outs:
            i = index[out.request_id]
            decoder, timing = self.decoders[i], self.timings[i]
            if out.new_token_ids:
                timing.first = timing.first or now
                timing.last = now
            update = decoder.feed(out)
            if decoder.stopped_by_string and out.request_id in self.stream.pending:
                self.driver.abort(out.request_id)
            m = merged.setdefault(i, ChoiceUpdate())
            m.text += update.text
            m.tokens += update.tokens
            m.finish_reason = update.finish_reason or m.finish_reason
        return [(i, m) for i, m in merged.items() if m.text or m.tokens or m.finish_reason]

    def abort(self) -> None:
        """Abort every choice whose engine request is still running."""
        for rid in list(self.stream.pending):
            self.driver.abort(rid)


__all__ = ["ChoiceDecoder", "ChoiceSpec", "ChoiceUpdate", "Generation", "TokenInfo", "fan_out"]
