"""A stream whose consumer fell behind the engine: the outputs already waiting become one update per choice.

No server and no engine: outputs are put on a `RequestStream` by hand, as the driver's `_dispatch` does, and
read through `Generation.updates`, the path of every streamed HTTP answer.
"""

import asyncio

import pytest

from lmforge.infer.engine import RequestOutput
from lmforge.serve.driver import EngineFailed
from lmforge.serve.generation import ChoiceDecoder, ChoiceTiming, Generation
from lmforge.tokenizer import Tokenizer


class AbortRecorder:
    """The one method of EngineDriver that Generation calls while streaming; as the driver's, an abort takes the
    request off its stream at once."""

    def __init__(self):
        self.aborted: list[str] = []
        self.stream = None

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.stream.pending.discard(request_id)


def generation(tokenizer, choices: int, stop: list[str] = ()) -> Generation:
    gen = Generation(AbortRecorder(), tokenizer, tokenizer.eos_id, "req")
    gen.driver.stream = gen.stream
    for i in range(choices):
        gen.ids.append(f"req-{i}")
        gen.decoders.append(ChoiceDecoder(tokenizer, list(stop), {tokenizer.eos_id}))
        gen.timings.append(ChoiceTiming())
        gen.stream.pending.add(f"req-{i}")
    return gen


def collect(gen: Generation) -> list[tuple[int, str, int, str | None]]:
    async def run():
        return [(i, up.text, len(up.tokens), up.finish_reason) async for i, up in gen.updates()]

    return asyncio.run(run())


def word_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


def test_waiting_outputs_merge_per_choice_in_order(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    a, b = word_ids(tok, "hello world again"), word_ids(tok, "one two")
    gen = generation(tok, 2)
    steps = max(len(a), len(b))
    for k in range(steps):  # one engine step after another, both choices in each while they run
        for c, ids in ((0, a), (1, b)):
            if k < len(ids):
                done = k == len(ids) - 1
                gen.stream.queue.put_nowait(RequestOutput(f"req-{c}", [ids[k]], k + 1, done, "length" if done else None))
    updates = collect(gen)
    # everything was waiting before the first read: one update per choice, choice 0 first (its output came first)
    assert updates == [(0, tok.decode(a), len(a), "length"), (1, tok.decode(b), len(b), "length")]


def test_outputs_that_arrive_later_stay_separate_updates(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    ids = word_ids(tok, "hello world again")
    gen = generation(tok, 1)

    async def run():
        got = []

        async def engine():
            for k, t in enumerate(ids):
                done = k == len(ids) - 1
                gen.stream.queue.put_nowait(RequestOutput("req-0", [t], k + 1, done, "length" if done else None))
                await asyncio.sleep(0.01)  # the consumer reads each before the next arrives

        task = asyncio.create_task(engine())
        async for i, up in gen.updates():
            got.append(len(up.tokens))
        await task
        return got

    assert asyncio.run(run()) == [1] * len(ids)


def test_a_stop_string_inside_merged_outputs_ends_the_choice_there(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    ids = word_ids(tok, "hello world again and more")
    gen = generation(tok, 1, stop=["again"])
    for k, t in enumerate(ids):
        gen.stream.queue.put_nowait(RequestOutput("req-0", [t], k + 1, False))
    ((i, text, _, reason),) = collect(gen)  # the request still runs: the stop string aborts it
    assert (i, reason) == (0, "stop")
    assert "again" not in text and "more" not in text and text.strip().startswith("hello world")
    assert gen.driver.aborted == ["req-0"]


def test_an_error_behind_waiting_outputs_comes_after_them(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    ids = word_ids(tok, "hello world")
    gen = generation(tok, 1)
    for k, t in enumerate(ids):
        gen.stream.queue.put_nowait(RequestOutput("req-0", [t], k + 1, False))
    gen.stream.queue.put_nowait(EngineFailed("the engine failed: boom"))
    got = []

    async def run():
        async for i, up in gen.updates():
            got.append(up.text)

    with pytest.raises(EngineFailed, match="boom"):
        asyncio.run(run())
    assert got == [tok.decode(ids)]
