"""From a validated request body to engine inputs: prompt ids, `SamplingParams`, stop strings.

pydantic (schemas.py) has checked types and ranges; what is checked here needs the model or crosses fields,
and each failure is an `APIError` 400 naming the field:

    unsupported features       tools, tool_choice, response_format other than text, suffix, best_of > 1,
                               logit_bias, top_logprobs without logprobs, max_tokens 0 without echo
    prompt ids                 every id inside the model's vocabulary; no prompt is empty
    context                    prompt + max_tokens <= max_model_len (max_tokens defaults to the room left)

Defaults are OpenAI's: temperature 1, top_p 1, penalties 0, n 1; completions' max_tokens 16.
"""

from __future__ import annotations

from lmforge.infer.sampling import SamplingParams, SamplingParamsError
from lmforge.serve.errors import APIError
from lmforge.serve.schemas import ChatCompletionRequest, CompletionRequest


def _unsupported(param: str, what: str) -> APIError:
    return APIError(400, f"{what} not supported by this server", param=param, code="unsupported_parameter")


def refuse_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    if body.logit_bias:
        raise _unsupported("logit_bias", "logit_bias is")
    if isinstance(body, ChatCompletionRequest):
        if body.tools:
            raise _unsupported("tools", "tools (function calling) are")
        if body.tool_choice not in (None, "none"):
            raise _unsupported("tool_choice", "tool_choice is")
        if body.response_format is not None and body.response_format.get("type", "text") != "text":
            raise _unsupported("response_format", "response_format other than {'type': 'text'} (JSON mode) is")
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    else:
        if body.suffix:
            raise _unsupported("suffix", "suffix (insertion) is")
        if body.best_of is not None and body.best_of > 1:
            raise _unsupported("best_of", "best_of > 1 is")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 is only meaningful with echo: true (score the prompt)",
                           param="max_tokens")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options needs stream: true", param="stream_options")


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    for i, s in enumerate(stops):
        if not s:
            raise APIError(400, "stop strings must be non-empty", param="stop" if isinstance(stop, str) else f"stop[{i}]")
    return stops


def completion_prompts(prompt, tokenizer, vocab_size: int) -> list[list[int]]:
    """The token ids of each prompt: strings are encoded with BOS (as a tokenizer's default), id lists kept."""
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt, bos=True)]
    if prompt and isinstance(prompt[0], str):
        return [tokenizer.encode(p, bos=True) for p in prompt]
    lists = [prompt] if prompt and isinstance(prompt[0], int) else prompt
    for i, ids in enumerate(lists):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            where = "prompt" if lists is not prompt else f"prompt[{i}]"
            raise APIError(400, f"{where} has token id {bad[0]} outside the vocabulary [0, {vocab_size})", param=where)
    return [list(ids) for ids in lists]


def max_new_tokens(requested: int | None, prompt_len: int, max_model_len: int, prompt_param: str,
                   tokens_param: str = "max_tokens") -> int:
    """The generation budget of one prompt: `requested`, or all the room the context leaves."""
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"{prompt_param} has {prompt_len} tokens; this model's context is {max_model_len} tokens, "
                       "prompt and output together: shorten it", param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return room
    if requested > room:
        raise APIError(400, f"{tokens_param} {requested} + {prompt_len} prompt tokens is more than this model's "
                       f"context of {max_model_len} tokens; ask for at most {room}", param=tokens_param,
                       code="context_length_exceeded")
    return requested


def sampling_params(body: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> SamplingParams:
    """Engine sampling parameters (no stop strings: the server handles those on text)."""
    if isinstance(body, ChatCompletionRequest):
        logprobs, top = body.logprobs, body.top_logprobs or 0
    else:
        logprobs, top = body.logprobs is not None, body.logprobs or 0

    def given(value, default):
        return default if value is None else value

    try:
        return SamplingParams(
            temperature=given(body.temperature, 1.0), top_p=given(body.top_p, 1.0), top_k=given(body.top_k, 0),
            min_p=given(body.min_p, 0.0), repetition_penalty=given(body.repetition_penalty, 1.0),
            frequency_penalty=given(body.frequency_penalty, 0.0), presence_penalty=given(body.presence_penalty, 0.0),
            seed=body.seed, stop_token_ids=list(body.stop_token_ids or []), max_new_tokens=max(1, max_tokens),
            logprobs=logprobs, top_logprobs=top, ignore_eos=body.ignore_eos,
        )
    except SamplingParamsError as e:  # NOTE: its message starts with the field's name
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None


__all__ = ["completion_prompts", "max_new_tokens", "refuse_unsupported", "sampling_params", "stop_strings"]
