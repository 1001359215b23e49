"""Request and response bodies of the OpenAI-compatible API, as pydantic models (they also make /openapi.json).

Requests are strict: a field of the wrong type (a string for a number, 1.5 for an integer, true for `n`) or a
field this server does not know is a 400 naming it (errors.py), never a silent coercion. Ranges follow
OpenAI's API reference; the few fields past it are vLLM's extensions (`top_k`, `min_p`, `repetition_penalty`,
`stop_token_ids`, `ignore_eos`). `tools`, `tool_choice`, `response_format` (other than text), `suffix`,
`best_of` > 1 and `logit_bias` are accepted by the schema so that app.py can answer them with a 400 that says
they are not supported, instead of "unknown field".
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # choices per request (OpenAI allows 128; each choice here costs a full sequence of the engine)
MAX_STOP = 16  # stop strings per request (OpenAI: 4; vLLM: any)
MAX_SEED = 2**63 - 1


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Probability = Annotated[float, Field(gt=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
TokenId = Annotated[int, Field(ge=0)]


class StreamOptions(_Request):
    include_usage: bool = False


class ChatMessage(_Request):
    # NOTE: "developer" is OpenAI's newer name for "system" (app.py treats them the same); "tool" and "function"
    # messages need tools, which this server does not support.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None
    name: str | None = None


class _Sampling(_Request):
    """Fields shared by both endpoints."""

    model: str
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Probability | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    # a string, a list of strings, a list of token ids, or a list of token-id lists: one prompt per entry
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)] | \
        Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # OpenAI's default; 0 only with echo (score the prompt)
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None


# --- responses -------------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class _Answer(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage
    system_fingerprint: str | None = None


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmforge"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


__all__ = [
    "AssistantMessage", "ChatChoice", "ChatCompletion", "ChatCompletionRequest", "ChatLogprobs", "ChatMessage",
    "Completion", "CompletionChoice", "CompletionLogprobs", "CompletionRequest", "ErrorResponse", "MAX_N",
    "ModelCard", "ModelList", "StreamOptions", "TokenLogprob", "TopLogprob", "Usage",
]
