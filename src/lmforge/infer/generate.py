"""Batched generation: chunked pre-fill into a KV cache, then token-by-token decoding with streaming events.

Notation: B prompts, L_b the length of prompt b, T = max_b L_b, C the pre-fill chunk size, V vocabulary.

    prompts ──► left-pad to (B, T), per-row positions (-1 on padding)          (see lmforge.infer.cache)
            ──► pre-fill in chunks of C columns; only the last chunk projects to the vocabulary, and only at
                its last column (every row's last prompt token): logits (B, V)
            ──► sample (B,) ─► loop: events ─► DecodeStep(tokens (B, 1), positions (B, 1)) ─► tokens (B,)
                (the decode step samples inside its graph: decode_step.py)

The batch is static: a finished row keeps its slot (its position stops advancing and its outputs are
ignored) until every row has finished. Continuous batching is the serving engine's job.

Finish reasons: "stop" (the end-of-sequence token, a stop token id or a stop string) and "length"
(max_new_tokens, or a full-attention model's context `max_seq_len` filled by prompt + output). A
sliding-window model has no context limit here: the rolling buffer serves any length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor

from lmforge.infer.decode_step import DecodeMode, kept_decode_step
from lmforge.infer.detokenize import TextStream
from lmforge.infer.sampling import SamplingFlags, SamplingParams, sample
from lmforge.infer.transfer import to_device, to_host_later
from lmforge.models.transformer import Transformer


CONTEXT_IDS = 6  # prompt ids a continuation's text is decoded after (detokenize.py; vLLM reads 5 or 6 too)


class GenerationError(ValueError):
    """A request that cannot be generated (bad prompt, prompt too long for the context)."""


@dataclass
class TokenEvent:
    """One generated token of sequence `index` (the position of its prompt in the input list)."""

    index: int
    token_id: int
    text: str  # new text that is safe to show (held back while it could still start a stop string)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, log-prob), most likely first
    finish_reason: str | None = None  # set on the last event of the sequence: "stop" or "length"


@dataclass
class GenerationResult:
    """A finished sequence. `token_ids` holds every generated token, the one that ended it included
    (an end-of-sequence / stop token id, or the token that completed a stop string); `text` is what the
    continuation adds to the prompt's text (" is ..." after "The module": its first space kept), stops before
    the stop string and never contains stop tokens."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


def _check_prompts(prompts: Sequence[Sequence[int]], model: Transformer) -> list[list[int]]:
    config = model.config
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise GenerationError("prompts must be a non-empty list of token id lists")
    out = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, (list, tuple)):
            raise GenerationError(f"prompt {i} is {type(prompt).__name__}, not a list of token ids")
        ids = list(prompt)
        if not ids:
            raise GenerationError(f"prompt {i} is empty: it needs at least one token (e.g. the BOS id)")
        if not all(isinstance(t, int) and 0 <= t < config.vocab_size for t in ids):
            bad = next(t for t in ids if not (isinstance(t, int) and 0 <= t < config.vocab_size))
            raise GenerationError(f"prompt {i} has token id {bad!r} outside the vocabulary [0, {config.vocab_size})")
        if config.sliding_window is None and len(ids) >= config.max_seq_len:
            raise GenerationError(
                f"prompt {i} has {len(ids)} tokens, but the model's context (max_seq_len) is {config.max_seq_len} "
                f"tokens, prompt and output together: shorten the prompt to at most {config.max_seq_len - 1} tokens"
            )
        out.append(ids)
    return out


def _left_pad(prompts: list[list[int]], device) -> tuple[Tensor, Tensor]:
    """tokens (B, T) padded with 0 on the left, positions (B, T) with -1 on padding (host tensors first)."""
    T = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), T, dtype=torch.long)
    positions = torch.full((len(prompts), T), -1, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p) :] = torch.tensor(p)
        positions[b, T - len(p) :] = torch.arange(len(p))
    return tokens, positions


@torch.no_grad()
def prefill(model: Transformer, cache, tokens: Tensor, positions: Tensor, chunk_size: int) -> Tensor:
    """Run left-padded prompts tokens / positions (B, T) (host tensors) through the cache in chunks of
    `chunk_size` columns; return the logits (B, V) of every row's last prompt token (the last column)."""
    device = next(model.parameters()).device
    B, T = tokens.shape
    logits = None
    for start in range(0, T, chunk_size):
        tok, pos = tokens[:, start : start + chunk_size], positions[:, start : start + chunk_size]
        kv_len = int(pos.max()) + 1  # host tensor: no device sync
        last = start + chunk_size >= T
        index = torch.full((B, 1 if last else 0), tok.shape[1] - 1, dtype=torch.long, device=device)
        pos_d = pos.to(device)
        out = model(tok.to(device), pos_d, cache=cache.prefill(pos_d, kv_len), logits_index=index, return_hidden=not last)
        if last:
            logits = out[:, 0]  # (B, V)
    return logits


def generate_stream(
    model: Transformer,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    *,
    prefill_chunk: int | None = None,
    cache_kind: Literal["auto", "contiguous", "rolling"] = "auto",
    decode_mode: DecodeMode = "eager",
    eos_id: int | None = None,
) -> Iterator[TokenEvent]:
    """Generate continuations of token-id `prompts`, yielding one `TokenEvent` per token as it is decoded.

    Args:
        model: a Transformer (any device / dtype); put it in eval mode.
        tokenizer: anything with `decode(ids) -> str` (and `eos_id`), or None for ids only (no text, no stop
            strings).
        prompts: B lists of token ids, of any lengths.
        sampling: one SamplingParams for all prompts, or one per prompt.
        prefill_chunk: pre-fill chunk size; default the window W for a sliding-window model (Mistral's
            choice), the whole prompt otherwise.
        cache_kind: "auto", "contiguous" or "rolling" (see `lmforge.infer.cache.make_cache`).
        decode_mode: see `lmforge.infer.decode_step`.
        eos_id: the end-of-sequence id; default `tokenizer.eos_id` when there is a tokenizer.
    """
    prompts = _check_prompts(prompts, model)
    params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
    if len(params) != len(prompts):
        raise GenerationError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
    if any(p.stop for p in params) and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer (pass one, or use stop_token_ids)")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise GenerationError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
    config = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if eos_id is None and tokenizer is not None:
        eos_id = getattr(tokenizer, "eos_id", None)
    lengths = [len(p) for p in prompts]
    B, T = len(prompts), max(lengths)
    # NOTE: L_b + max_new_tokens slots, one more than the tokens a row can feed: the step after a row's last
    # token still runs for the batch and writes (ignored) k / v at that row's next position.
    max_len = max(L + p.max_new_tokens for L, p in zip(lengths, params))
    if config.sliding_window is None:
        max_len = min(max_len, config.max_seq_len)
    # NOTE: a model whose vocabulary is padded past the tokenizer's (to a multiple of 64, say) never samples
    # the padding ids, which the tokenizer could not decode: logits are cut to the tokenizer's vocabulary.
    n_vocab = min(config.vocab_size, getattr(tokenizer, "vocab_size", None) or config.vocab_size)
    # the decode step samples inside its graph, with a static sampling batch; compiled / captured once
    cache, step = kept_decode_step(model, B, max_len, cache_kind, decode_mode, dtype, SamplingFlags.of(params), n_vocab)
    step.sampling.load(params, prompts)
    chunk = prefill_chunk or config.sliding_window or T

    tokens, positions = _left_pad(prompts, device)
    logits = prefill(model, cache, tokens, positions, chunk)
    # The end of each prompt is the context of its text, so that a continuation's first space is kept.
    texts = [TextStream(tokenizer, p.stop, context=prompt[-CONTEXT_IDS:]) if tokenizer is not None else None
             for p, prompt in zip(params, prompts)]
    stops = [set(p.stop_token_ids) | ({eos_id} if eos_id is not None and not p.ignore_eos else set()) for p in params]
    n_new = [0] * B
    finished = [False] * B
    pos = torch.tensor(lengths, device=device)[:, None]  # (B, 1) position of the token fed next
    advance = torch.ones(B, 1, dtype=torch.long, device=device)  # 0 once a row has finished

    out = sample(logits[:, :n_vocab], step.sampling)  # the first tokens, from the pre-fill's logits
    while True:
        fetched = to_host_later([out.tokens, out.logprobs, out.top_ids, out.top_logprobs])
        # NOTE: the next decode step (forward and sampling) is launched before this step's tokens reach the
        # host, so the device computes while the host checks stops and streams text. Rows that turn out
        # finished have their position advance undone below; when every row has finished, that one step is
        # wasted. The tokens are cloned: `out` may be a graph's output, which its next replay overwrites.
        next_out = step(out.tokens[:, None].clone(), pos)
        pos += advance
        ids, logprobs, top_ids, top_logprobs = fetched()  # the one wait for the device per step
        top = list(zip(top_ids, top_logprobs)) if top_ids is not None else None
        newly_finished = False
        for b in range(B):
            if finished[b]:
                continue
            token, p = ids[b], params[b]
            n_new[b] += 1
            reason, text = None, ""
            if token in stops[b]:
                reason = "stop"
            elif texts[b] is not None:
                text, hit = texts[b].add(token)
                reason = "stop" if hit else None
            context_full = config.sliding_window is None and lengths[b] + n_new[b] >= config.max_seq_len
            if reason is None and (n_new[b] >= p.max_new_tokens or context_full):
                reason = "length"
            if reason is not None and texts[b] is not None:
                text += texts[b].finish()
            alternatives = None
            if top is not None and p.top_logprobs:
                alternatives = list(zip(top[b][0], top[b][1]))[: p.top_logprobs]
            logprob = logprobs[b] if logprobs is not None and p.logprobs else None
            yield TokenEvent(b, token, text, logprob, alternatives, reason)
            if reason is not None:
                finished[b] = newly_finished = True
        if all(finished):
            return
        if newly_finished:
            still = to_device(torch.tensor([[0] if f else [1] for f in finished]), device)
            pos -= advance - still  # a row that just finished keeps feeding its last position, as it was fed
            advance.copy_(still)
        out = next_out


def generate(
    model: Transformer,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    **kwargs,
) -> list[GenerationResult]:
    """`generate_stream` collected: one `GenerationResult` per prompt, in prompt order."""
    results = [GenerationResult(prompt_ids=p) for p in _check_prompts(prompts, model)]
    params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
    for r, p in zip(results, params):
        r.text = "" if tokenizer is not None else None
        r.logprobs = [] if p.logprobs else None
        r.top_logprobs = [] if p.top_logprobs else None
    for event in generate_stream(model, tokenizer, prompts, sampling, **kwargs):
        r = results[event.index]
        r.token_ids.append(event.token_id)
        if r.text is not None:
            r.text += event.text
        if r.logprobs is not None:
            r.logprobs.append(event.logprob)
        if r.top_logprobs is not None:
            r.top_logprobs.append(event.top_logprobs)
        r.finish_reason = event.finish_reason or r.finish_reason
    return results


__all__ = [
    "GenerationError", "GenerationResult", "TokenEvent", "generate", "generate_stream", "prefill", "to_host_later",
]
