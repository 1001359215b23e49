"""Sampling parameters and batched sampling with per-row parameters.

Notation: B rows (sequences), V vocabulary, n = top_logprobs.

One decode step turns the model's logits (B, V) into one token per row, every row with its own parameters
(the serving engine batches requests with mixed parameters):

    1. penalties      repetition (prompt + output tokens), frequency and presence (output tokens)
    2. greedy rows    temperature 0: argmax of the penalised logits
    3. temperature    logits / T
    4. top-k          keep the k largest logits (ties at the k-th value are kept)
    5. top-p          keep the smallest prefix of the sorted distribution whose mass reaches p
    6. min-p          drop tokens whose probability is below min_p * (largest probability)
    7. sample         exponential race: argmax_v p_v / E_v with E_v ~ Exp(1), which picks v with probability p_v

Steps 4-6 run only when some row asks for them (decided from the host-side parameters, never from tensor
values), and each filter is the identity for a row that leaves it off.

Determinism. A row with `seed` draws its E_v from its own `torch.Generator`, seeded once from `seed` when the
request starts; each step draws exactly V variates from it. Its tokens therefore depend only on the seed and
its own logits: the same request gives the same tokens alone or batched with any other requests (up to
floating-point differences in the logits themselves, which batching can cause on some kernels). Rows without a
seed draw from torch's global generator (reproducible only under `torch.manual_seed` and the same batch).

Log-probabilities. `logprobs` and `top_logprobs` are those of the model's distribution,
log_softmax(raw logits), before penalties, temperature and filters.
NOTE: vLLM's default and OpenAI's meaning; the processed distribution would make log-probs depend on the
sampling knobs and be -inf for filtered tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

MAX_TOP_LOGPROBS = 20


class SamplingParamsError(ValueError):
    """A sampling parameter outside its allowed range; the message names the field and the range."""


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    Args:
        temperature: >= 0; 0 is greedy (argmax), 1 samples the model's distribution.
        top_k: >= 0; keep the k most likely tokens (0: off).
        top_p: in (0, 1]; nucleus sampling, keep the smallest set of tokens with total probability >= top_p.
        min_p: in [0, 1]; drop tokens with probability < min_p * the largest probability (0: off).
        repetition_penalty: > 0; CTRL / Hugging Face penalty on every token already in the prompt or output:
            logit / r if the logit is positive, logit * r if not (1: off).
        frequency_penalty: in [-2, 2]; subtract penalty * (times the token was generated) (OpenAI).
        presence_penalty: in [-2, 2]; subtract penalty once if the token was generated at all (OpenAI).
        seed: None or an integer in [0, 2**63); this request's own random generator, so that its tokens are
            the same alone or batched with others (None: torch's global generator).
        stop: strings that end the generation when they appear in the text (also across token boundaries);
            the stop string itself is not part of the returned text.
        stop_token_ids: token ids that end the generation (the tokenizer's end-of-sequence id always does,
            unless ignore_eos).
        max_new_tokens: >= 1; generate at most this many tokens.
        logprobs: return the log-probability of each sampled token.
        top_logprobs: in [0, 20]; also return the n most likely tokens and their log-probabilities at each
            step (needs logprobs).
        ignore_eos: keep generating after the end-of-sequence token (benchmarks).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    max_new_tokens: int = 256
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def fail(name: str, allowed: str) -> None:
            raise SamplingParamsError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(name, "a finite number")
            return float(value)

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(name, "an integer")
            return value

        if number("temperature") < 0:
            fail("temperature", ">= 0 (0 = greedy)")
        if integer("top_k") < 0:
            fail("top_k", ">= 0 (0 = off)")
        if not 0 < number("top_p") <= 1:
            fail("top_p", "in (0, 1] (1 = off)")
        if not 0 <= number("min_p") <= 1:
            fail("min_p", "in [0, 1] (0 = off)")
        if number("repetition_penalty") <= 0:
            fail("repetition_penalty", "> 0 (1 = off)")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= number(name) <= 2:
                fail(name, "in [-2, 2] (0 = off)")
        if self.seed is not None and not 0 <= integer("seed") < 2**63:
            fail("seed", "None or an integer in [0, 2**63)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "a list of non-empty strings")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "a list of integers >= 0")
        if integer("max_new_tokens") < 1:
            fail("max_new_tokens", ">= 1")
        if not 0 <= integer("top_logprobs") <= MAX_TOP_LOGPROBS:
            fail("top_logprobs", f"in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs and not self.logprobs:
            fail("top_logprobs", "0 unless logprobs=True")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SamplingBatch:
    """Per-row sampling parameters as (B,) tensors, plus the token counts the penalties need.

    Built once per batch of requests; `observe` records each step's sampled tokens.
    """

    def __init__(self, params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]], vocab_size: int, device,
                 generators: list[torch.Generator | None] | None = None):
        """generators: one per row (None: the global generator) to draw from; by default a fresh one seeded with
        each row's `seed`. A caller whose rows outlive the batch (the serving engine) passes their own."""
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        self.params = list(params)
        B = len(params)
        # one host-to-device copy for all the float columns: (6, B)
        names = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
        floats = _to_device(torch.tensor([[getattr(p, n) for p in params] for n in names], dtype=torch.float32), device)
        self.temperature, self.top_p, self.min_p = floats[0], floats[1], floats[2]
        self.repetition_penalty, self.frequency_penalty, self.presence_penalty = floats[3], floats[4], floats[5]
        self.top_k = _to_device(torch.tensor([p.top_k for p in params], dtype=torch.long), device)
        # Host-side switches (from the parameters, never from tensor values).
        self.all_greedy = all(p.greedy for p in params)
        self.any_greedy = any(p.greedy for p in params)
        self.use_top_k = any(p.top_k > 0 for p in params)
        self.use_top_p = any(p.top_p < 1 for p in params)
        self.use_min_p = any(p.min_p > 0 for p in params)
        self.use_repetition = any(p.repetition_penalty != 1 for p in params)
        self.use_counts = any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params)
        self.top_logprobs = max(p.top_logprobs for p in params)
        self.want_logprobs = any(p.logprobs for p in params)
        if generators is None:
            generators = [None if p.seed is None else torch.Generator(device=device).manual_seed(p.seed) for p in params]
        elif len(generators) != B:
            raise ValueError(f"{len(generators)} generators for {B} rows")
        self.generators = generators
        self.prompt_mask = None
        if self.use_repetition:
            self.prompt_mask = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)  # (B, V)
            for b, prompt in enumerate(prompts):
                self.prompt_mask[b, torch.tensor(list(prompt), dtype=torch.long, device=device)] = True
        self.output_counts = None
        if self.use_repetition or self.use_counts:
            self.output_counts = torch.zeros(B, vocab_size, dtype=torch.long, device=device)  # (B, V)

    def observe(self, tokens: Tensor) -> None:
        """Count this step's sampled tokens (B,) for the penalties."""
        if self.output_counts is not None:
            self.output_counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None]))


def _to_device(t: Tensor, device) -> Tensor:
    """Copy a small host tensor to `device` without waiting for the GPU.

    NOTE: a copy from pageable host memory first waits for everything queued on the stream (CUDA's rule for
    pageable copies); from pinned memory it is queued like a kernel. The serving engine builds a batch while
    the model's forward pass still runs: with pageable copies the host would idle until the forward ends.
    """
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def apply_penalties(
    logits: Tensor,
    prompt_mask: Tensor | None,
    output_counts: Tensor | None,
    repetition: Tensor,
    frequency: Tensor,
    presence: Tensor,
) -> Tensor:
    """Penalised logits (B, V). prompt_mask (B, V) bool, output_counts (B, V) ints, penalties (B,).

    Worked example, one row, logits [2.0, -1.0, 0.5], token 0 in the prompt, token 1 generated twice,
    repetition 2, frequency 0.1, presence 0.5:
        repetition (tokens 0, 1 seen):  [2.0 / 2, -1.0 * 2, 0.5]   = [1.0, -2.0, 0.5]
        frequency + presence (token 1): [1.0, -2.0 - 0.1 * 2 - 0.5, 0.5] = [1.0, -2.7, 0.5]
    """
    logits = logits.float()
    if output_counts is None:
        return logits
    seen = output_counts > 0  # (B, V)
    if prompt_mask is not None:
        r = repetition[:, None]
        penalised = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen | prompt_mask, penalised, logits)
    counts = output_counts.to(logits.dtype)
    return logits - frequency[:, None] * counts - presence[:, None] * seen.to(logits.dtype)


def top_k_top_p_filter(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Set filtered-out logits (B, V) to -inf. top_k (B,) ints (0: off), top_p (B,) in (0, 1] (1: off).

    Worked example, probabilities [0.1, 0.5, 0.25, 0.15] (sorted: 0.5, 0.25, 0.15, 0.1):
        top_k = 2       keeps 0.5, 0.25 (ranks 0, 1)
        top_p = 0.7     mass before each sorted token [0, 0.5, 0.75, 0.9]; keep where < 0.7 -> 0.5, 0.25
                        (0.5 + 0.25 = 0.75 >= 0.7: the smallest prefix reaching p; the first always stays)
    With both, top-p runs on the top-k distribution renormalised (Hugging Face's warper order).
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    V = logits.shape[-1]
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, V).clamp(max=V)  # (B,)
        kth = sorted_logits.gather(1, (k - 1)[:, None])  # (B, 1) the k-th largest value
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (B, V)
        drop = mass_before >= top_p[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def min_p_filter(logits: Tensor, min_p: Tensor) -> Tensor:
    """Set logits (B, V) of tokens with p < min_p * max p to -inf; min_p (B,), 0 is off.

    Worked example, probabilities [0.6, 0.3, 0.06, 0.04], min_p = 0.1: threshold 0.06 keeps 0.6, 0.3, 0.06.
    Compared in log space: log p_v < log(min_p) + log p_max.
    """
    logp = logits.log_softmax(dim=-1)
    threshold = logp.max(dim=-1, keepdim=True).values + min_p[:, None].log()  # log(0) = -inf: nothing dropped
    return logits.masked_fill(logp < threshold, float("-inf"))


def exponential_noise(shape: tuple[int, int], generators: list, device) -> Tensor:
    """(B, V) i.i.d. Exp(1); row b from generators[b] when it has one, else from the global generator."""
    noise = torch.empty(shape, device=device).exponential_()
    for b, gen in enumerate(generators):
        if gen is not None:
            noise[b].exponential_(generator=gen)
    return noise


class SampleOutput(NamedTuple):
    tokens: Tensor  # (B,) long
    logprobs: Tensor | None  # (B,) float32: log-prob of the sampled token under the model
    top_logprobs: Tensor | None  # (B, n) float32
    top_ids: Tensor | None  # (B, n) long


def sample(logits: Tensor, batch: SamplingBatch) -> SampleOutput:
    """One token per row from logits (B, V) with the per-row parameters of `batch` (module docstring)."""
    raw = logits.float()
    processed = apply_penalties(
        raw, batch.prompt_mask, batch.output_counts,
        batch.repetition_penalty, batch.frequency_penalty, batch.presence_penalty,
    )
    greedy = processed.argmax(dim=-1)  # (B,)
    if batch.all_greedy:
        tokens = greedy
    else:
        temperature = torch.where(batch.temperature > 0, batch.temperature, 1.0)[:, None]
        scaled = processed / temperature
        if batch.use_top_k or batch.use_top_p:
            scaled = top_k_top_p_filter(
                scaled, batch.top_k if batch.use_top_k else None, batch.top_p if batch.use_top_p else None
            )
        if batch.use_min_p:
            scaled = min_p_filter(scaled, batch.min_p)
        probs = scaled.softmax(dim=-1)  # (B, V); filtered tokens have probability 0
        noise = exponential_noise(tuple(probs.shape), batch.generators, probs.device)
        # NOTE: E = 0 has probability ~2^-24 but would give p / 0 = inf (or nan for p = 0); clamp it.
        sampled = (probs / noise.clamp_min(1e-10)).argmax(dim=-1)
        tokens = torch.where(batch.temperature == 0, greedy, sampled) if batch.any_greedy else sampled
    batch.observe(tokens)
    if not batch.want_logprobs:
        return SampleOutput(tokens, None, None, None)
    logp = raw.log_softmax(dim=-1)  # (B, V)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    if batch.top_logprobs == 0:
        return SampleOutput(tokens, chosen, None, None)
    top_values, top_ids = logp.topk(batch.top_logprobs, dim=-1)  # (B, n)
    return SampleOutput(tokens, chosen, top_values, top_ids)


__all__ = [
    "SampleOutput", "SamplingBatch", "SamplingParams", "SamplingParamsError", "apply_penalties",
    "exponential_noise", "min_p_filter", "sample", "top_k_top_p_filter",
]
