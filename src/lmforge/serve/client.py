"""Answerers: batches of chat dialogues (or completion prompts) in, texts out, from an endpoint or in-process.

    answerer = EndpointAnswerer("http://127.0.0.1:8000/v1", api_key="...")   # our server, vLLM, any OpenAI API
    answerer = EngineAnswerer(engine, tokenizer)                              # the same, without HTTP
    texts = answerer.answer(dialogues, SamplingParams(temperature=0, max_new_tokens=256))
    full = answerer.answer_full(dialogues, sampling)       # [Answer(text, finish_reason, prompt / completion tokens)]
    texts = answerer.complete(prompts, sampling)           # plain completions of text prompts

Both classes have the same four methods, so an evaluation (`eval chat`, `redteam`) takes either. The endpoint
one uses the official `openai` package (its retries, timeouts and error types), sending up to `concurrency`
requests at once; answers come back in input order. Sampling fields OpenAI's API does not have (top_k, min_p,
repetition_penalty) go in `extra_body`, which our server and vLLM read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Protocol, Sequence

from lmforge.infer.sampling import SamplingParams


@dataclass
class Answer:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class Answerer(Protocol):
    def answer_full(self, dialogues: Sequence[list[dict]], sampling: SamplingParams) -> list[Answer]: ...
    def complete_full(self, prompts: Sequence[str], sampling: SamplingParams) -> list[Answer]: ...
    def answer(self, dialogues: Sequence[list[dict]], sampling: SamplingParams) -> list[str]: ...
    def complete(self, prompts: Sequence[str], sampling: SamplingParams) -> list[str]: ...


class _Texts:
    def answer(self, dialogues: Sequence[list[dict]], sampling: SamplingParams) -> list[str]:
        return [a.text for a in self.answer_full(dialogues, sampling)]

    def complete(self, prompts: Sequence[str], sampling: SamplingParams) -> list[str]:
        return [a.text for a in self.complete_full(prompts, sampling)]


def request_fields(sampling: SamplingParams) -> dict:
    """OpenAI request fields for `sampling` (and extra_body for vLLM's extensions)."""
    fields = {"temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_new_tokens,
              "frequency_penalty": sampling.frequency_penalty, "presence_penalty": sampling.presence_penalty}
    if sampling.seed is not None:
        fields["seed"] = sampling.seed
    if sampling.stop:
        fields["stop"] = list(sampling.stop)
    extra = {}
    if sampling.top_k:
        extra["top_k"] = sampling.top_k
    if sampling.min_p:
        extra["min_p"] = sampling.min_p
    if sampling.repetition_penalty != 1:
        extra["repetition_penalty"] = sampling.repetition_penalty
    if sampling.stop_token_ids:
        extra["stop_token_ids"] = list(sampling.stop_token_ids)
    if sampling.ignore_eos:
        extra["ignore_eos"] = True
    if extra:
        fields["extra_body"] = extra
    return fields


class EndpointAnswerer(_Texts):
    """Answers through an OpenAI-compatible endpoint.

    Args:
        base_url: the API root, e.g. http://127.0.0.1:8000/v1.
        api_key: the server's key (any string for a server without one).
        model: the model name to send; default: the first of GET /models.
        concurrency: requests in flight at once.
        timeout: seconds per request; max_retries: the openai client's retries (connection errors, 429, 5xx).
    """

    def __init__(self, base_url: str, api_key: str = "none", model: str | None = None, concurrency: int = 16,
                 timeout: float = 600.0, max_retries: int = 2):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url, self.api_key, self.model = base_url, api_key, model
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries

    def answer_full(self, dialogues: Sequence[list[dict]], sampling: SamplingParams) -> list[Answer]:
        return self._run(lambda client, model, d: client.chat.completions.create(
            model=model, messages=d, **request_fields(sampling)), dialogues, chat=True)

    def complete_full(self, prompts: Sequence[str], sampling: SamplingParams) -> list[Answer]:
        return self._run(lambda client, model, p: client.completions.create(
            model=model, prompt=p, **request_fields(sampling)), prompts, chat=False)

    def _run(self, call, items, chat: bool) -> list[Answer]:
        async def main() -> list[Answer]:
            import openai

            async with openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout,
                                          max_retries=self.max_retries) as client:
                model = self.model or (await client.models.list()).data[0].id
                gate = asyncio.Semaphore(self.concurrency)

                async def one(item) -> Answer:
                    async with gate:
                        r = await call(client, model, item)
                    choice = r.choices[0]
                    text = choice.message.content if chat else choice.text
                    usage = r.usage
                    return Answer(text or "", choice.finish_reason, usage.prompt_tokens if usage else 0,
                                  usage.completion_tokens if usage else 0)

                return list(await asyncio.gather(*(one(item) for item in items)))

        return _run_coroutine(main())


def _run_coroutine(coroutine):
    """asyncio.run, also from code that already runs an event loop (a notebook): then in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


class EngineAnswerer(_Texts):
    """Answers with an `LLMEngine` in this process, exactly as the server would (same chat template,
    detokenization and stop strings), without HTTP. `template`: a ChatTemplate (default: Llama 2's format)."""

    def __init__(self, engine, tokenizer, template=None):
        from lmforge.serve.chat_template import ChatTemplate
        from lmforge.serve.tokens import Vocabulary

        self.engine, self.tokenizer = engine, tokenizer
        self.template = template or ChatTemplate(tokenizer)
        self.vocab = Vocabulary(tokenizer)

    def answer_full(self, dialogues: Sequence[list[dict]], sampling: SamplingParams) -> list[Answer]:
        return self._generate([self.template.encode(d) for d in dialogues], sampling)

    def complete_full(self, prompts: Sequence[str], sampling: SamplingParams) -> list[Answer]:
        return self._generate([self.tokenizer.encode(p, bos=True) for p in prompts], sampling)

    def _generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Answer]:
        import dataclasses

        from lmforge.serve.generation import ChoiceDecoder

        engine, eos = self.engine, self.tokenizer.eos_id
        params = dataclasses.replace(sampling, stop=[])  # stop strings are handled on the text, as the server does
        ends = set(params.stop_token_ids) | ({eos} if not params.ignore_eos else set())
        ids = [engine.add_request(p, params) for p in prompts]
        decoders = {rid: ChoiceDecoder(self.vocab, sampling.stop, ends) for rid in ids}
        while any(d.finish_reason is None for d in decoders.values()):
            for out in engine.step():
                d = decoders.get(out.request_id)
                if d is None or d.finish_reason is not None:
                    continue
                d.feed(out)
                if d.stopped_by_string:
                    engine.abort(out.request_id)
        return [Answer(decoders[rid].text.text, decoders[rid].finish_reason, len(p), decoders[rid].num_tokens)
                for rid, p in zip(ids, prompts)]


__all__ = ["Answer", "Answerer", "EndpointAnswerer", "EngineAnswerer", "request_fields"]
