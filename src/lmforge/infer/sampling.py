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
                      (computed as argmax_v (logits_v / T - log E_v): the softmax's normaliser drops out)

Steps 4-6 run only when some row asks for them (`SamplingFlags`, decided from the host-side parameters, never
from tensor values), and each filter is the identity for a row that leaves it off. `sample` is tensor
operations only, so a compiled graph or a CUDA graph can hold it (with a static `SamplingBatch`).

Determinism. Row b's E_v are a pure function of its seed, its counter (the tokens it has sampled before) and v
(noise.py): a request's tokens depend only on its seed and its own logits, alone or batched with any other
requests, preempted and recomputed or not, in a graph or eagerly (up to floating-point differences in the
logits themselves, which batching can cause on some kernels). A row without a seed gets one from torch's
global generator when its batch is built (reproducible under `torch.manual_seed`).

Log-probabilities. `logprobs` and `top_logprobs` are those of the model's distribution,
log_softmax(raw logits), before penalties, temperature and filters.
NOTE: vLLM's default and OpenAI's meaning; the processed distribution would make log-probs depend on the
sampling knobs and be -inf for filtered tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from lmforge.infer.noise import counter_log_exponential
from lmforge.infer.transfer import copy_to_device, to_device

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


def token_index(token_lists: Sequence[Sequence[int]], device) -> tuple[Tensor, Tensor]:
    """(rows, ids) (N,) of every token of every row, copied to `device` at once (without waiting for the GPU)."""
    rows = [b for b, ids in enumerate(token_lists) for _ in ids]
    both = to_device(torch.tensor([rows, [t for ids in token_lists for t in ids]], dtype=torch.long), device)
    return both[0], both[1]


@dataclass(frozen=True)
class SamplingFlags:
    """Which stages `sample` runs, from the host-side parameters (never from tensor values). A graph that
    samples is recorded for one set of flags."""

    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    use_repetition: bool
    use_counts: bool  # frequency or presence penalties
    want_logprobs: bool
    top_logprobs: int

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> "SamplingFlags":
        greedy, top_k, top_p, min_p, rep, counts, logprobs, top = True, False, False, False, False, False, False, 0
        for p in params:  # (one pass: this runs every engine step)
            greedy &= p.temperature == 0
            top_k |= p.top_k > 0
            top_p |= p.top_p < 1
            min_p |= p.min_p > 0
            rep |= p.repetition_penalty != 1
            counts |= p.frequency_penalty != 0 or p.presence_penalty != 0
            logprobs |= p.logprobs
            top = max(top, p.top_logprobs)
        return cls(greedy, top_k, top_p, min_p, rep, counts, logprobs, top)


_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
_PADDING = SamplingParams(temperature=0)  # the parameters of a static batch's padding rows


class SamplingBatch:
    """Per-row sampling parameters as (B,) tensors, the token counts the penalties need, and each row's noise
    seed and counter (noise.py).

    Built once per batch of requests; `sample` counts each step's tokens (`observe`). A static batch
    (`SamplingBatch.static`) keeps its tensors at fixed addresses for a graph to read, and is refilled in
    place (`load`) before each replay; rows past the loaded ones are greedy padding.
    """

    def __init__(self, params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]], vocab_size: int, device,
                 generators: list[torch.Generator | None] | None = None, seeds: Sequence[int] | None = None,
                 counters: Sequence[int] | None = None):
        """seeds / counters: each row's noise seed and how many tokens it has sampled before (default: the
        row's `seed`, or a draw from torch's global generator, and 0). generators: one per row (None: the
        global generator) to draw the noise from instead, eager only."""
        self._allocate(SamplingFlags.of(params), len(params), vocab_size, device)
        self.load(params, prompts, seeds, counters)
        if generators is not None and len(generators) != len(params):
            raise ValueError(f"{len(generators)} generators for {len(params)} rows")
        self.generators = generators

    @classmethod
    def static(cls, flags: SamplingFlags, rows: int, vocab_size: int, device) -> "SamplingBatch":
        """An empty batch of `rows` rows for parameters with these flags, to `load` before each use."""
        batch = cls.__new__(cls)
        batch._allocate(flags, rows, vocab_size, device)
        batch.generators = None
        return batch

    def _allocate(self, flags: SamplingFlags, rows: int, vocab_size: int, device) -> None:
        self.flags, self.rows, self.vocab_size, self.device = flags, rows, vocab_size, device
        self.floats = torch.zeros(len(_FLOATS), rows, device=device)  # (6, B), one copy fills them all
        self.temperature, self.top_p, self.min_p = self.floats[0], self.floats[1], self.floats[2]
        self.repetition_penalty, self.frequency_penalty, self.presence_penalty = self.floats[3:6]
        self.ints = torch.zeros(3, rows, dtype=torch.long, device=device)  # (3, B): top-k, seed, counter
        self.top_k, self.seeds, self.counters = self.ints[0], self.ints[1], self.ints[2]
        shape = (rows, vocab_size)
        self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=device) if flags.use_repetition else None
        counted = flags.use_repetition or flags.use_counts
        self.output_counts = torch.zeros(shape, dtype=torch.long, device=device) if counted else None

    def load(self, params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]],
             seeds: Sequence[int] | None = None, counters: Sequence[int] | None = None) -> None:
        """Write the first len(params) rows in place (without waiting for the GPU); output counts restart at 0."""
        B = len(params)
        if len(prompts) != B:
            raise ValueError(f"{B} sampling params for {len(prompts)} prompts")
        assert B <= self.rows and SamplingFlags.of(params) == self.flags, "parameters of other flags"
        pad = [_PADDING] * (self.rows - B)
        rows = list(params) + pad
        seeds = list(seeds) if seeds is not None else [p.seed if p.seed is not None else random_seed() for p in params]
        counters = list(counters) if counters is not None else [0] * B
        # NOTE: numpy builds these from Python lists about 3x faster than torch.tensor (this runs every step)
        floats = np.array([v for p in rows for v in (p.temperature, p.top_p, p.min_p, p.repetition_penalty,
                                                    p.frequency_penalty, p.presence_penalty)], dtype=np.float32)
        floats = torch.from_numpy(floats).view(len(rows), len(_FLOATS)).T  # (6, B), in the order of _FLOATS
        ints = np.array([p.top_k for p in rows] + seeds + [0] * len(pad) + counters + [0] * len(pad), dtype=np.int64)
        ints = torch.from_numpy(ints).view(3, -1)
        copy_to_device([(self.floats, floats)])
        copy_to_device([(self.ints, ints)])
        if self.prompt_mask is not None:
            self.prompt_mask.zero_()
            row, ids = token_index([list(p) for p in prompts], self.device)
            self.prompt_mask[row, ids] = True
        if self.output_counts is not None:
            self.output_counts.zero_()

    def tensors(self) -> list[Tensor]:
        """Every tensor the batch holds (for `torch._dynamo.mark_static_address`)."""
        return [t for t in vars(self).values() if isinstance(t, Tensor)]

    def state(self) -> list[Tensor]:
        """A copy of what sampling changes (counters, output counts), for `restore`."""
        return [t.clone() for t in (self.ints, self.output_counts) if t is not None]

    def restore(self, state: list[Tensor]) -> None:
        for t, saved in zip((t for t in (self.ints, self.output_counts) if t is not None), state):
            t.copy_(saved)

    def observe(self, tokens: Tensor) -> None:
        """Count this step's sampled tokens (B,): the noise counters and the penalties' output counts."""
        self.counters.add_(1)
        if self.output_counts is not None:
            self.output_counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None]))


def random_seed() -> int:
    """A seed for a row without one, from torch's global generator (so `torch.manual_seed` reproduces it)."""
    return int(torch.randint(0, 2**62, (1,)))


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
    """One token per row from logits (B, V) with the per-row parameters of `batch` (module docstring).
    Tensor operations only: no host sync, and the flags are host-side, so a graph can hold the whole of it."""
    f = batch.flags
    raw = logits.float()
    processed = apply_penalties(
        raw, batch.prompt_mask, batch.output_counts,
        batch.repetition_penalty, batch.frequency_penalty, batch.presence_penalty,
    )
    greedy = processed.argmax(dim=-1)  # (B,)
    if f.all_greedy:
        tokens = greedy
    else:
        temperature = torch.where(batch.temperature > 0, batch.temperature, 1.0)[:, None]
        scaled = processed / temperature
        if f.use_top_k or f.use_top_p:
            top_k, top_p = batch.top_k if f.use_top_k else None, batch.top_p if f.use_top_p else None
            scaled = top_k_top_p_filter(scaled, top_k, top_p)
        if f.use_min_p:
            scaled = min_p_filter(scaled, batch.min_p)
        if batch.generators is not None:
            # NOTE: E = 0 has probability ~2^-24 but would give log 0 = -inf; clamp it.
            log_e = exponential_noise(tuple(scaled.shape), batch.generators, scaled.device).clamp_min(1e-10).log()
        else:
            log_e = counter_log_exponential(batch.seeds, batch.counters, scaled.shape[-1])
        # the exponential race in log space: argmax_v p_v / E_v = argmax_v (scaled_v - log E_v); filtered
        # tokens are -inf (the softmax's normaliser is the same for every v, so it drops out)
        sampled = (scaled - log_e).argmax(dim=-1)
        tokens = torch.where(batch.temperature == 0, greedy, sampled)
    batch.observe(tokens)
    if not f.want_logprobs:
        return SampleOutput(tokens, None, None, None)
    logp = raw.log_softmax(dim=-1)  # (B, V)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    if f.top_logprobs == 0:
        return SampleOutput(tokens, chosen, None, None)
    top_values, top_ids = logp.topk(f.top_logprobs, dim=-1)  # (B, n)
    return SampleOutput(tokens, chosen, top_values, top_ids)


__all__ = [
    "SampleOutput", "SamplingBatch", "SamplingFlags", "SamplingParams", "SamplingParamsError", "apply_penalties",
    "exponential_noise", "min_p_filter", "random_seed", "sample", "token_index", "top_k_top_p_filter",
]
