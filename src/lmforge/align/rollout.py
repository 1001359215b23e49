"""Rollouts: answers sampled through `LLMEngine` in this process, and the trainer's own log-probabilities of them.

Rejection sampling, PPO and GRPO all sample through the one function here, `rollout(engine, prompts, sampling,
n)`: n answers to each prompt, answer k of prompt b seeded `sampling.seed + b * n + k`, so an answer depends
on the seed, the prompt and the weights only, never on what else is in the batch (nor on the rank that
samples it). The engine samples at `temperature` from the raw logits with every other knob off: top-k, top-p,
min-p and the penalties would make the sampled tokens come from another distribution than the one the trainer
scores, log_softmax(logits / T), so asking for them is an error (`check_rollout_sampling`).

After each update the policy's weights go into the engine in place (`sync_engine`; under FSDP2 from the full
state gathered on every rank), so the next rollout samples from the updated policy.

The trainer's side works on right-padded rows of prompt + answer:

    tokens (B, L)   p0 p1 p2 a0 a1 a2 .  .        row b: P_b prompt tokens, then R_b answer tokens, then padding
    index  (B, T)   2  3  4  .  ...              the position whose output predicts answer token t: P_b - 1 + t
    targets (B, T)  a0 a1 a2 0  ...              answer tokens, 0 past R_b
    mask   (B, T)   1  1  1  0  ...              t < R_b

Worked example, prompt [1, 5, 9] and answer [7, 2] (2 = </s>) in rows of L = 6, T = 3: tokens [1, 5, 9, 7, 2,
0], index [2, 3, 3] (the padded entry repeats the last real one), targets [7, 2, 0], mask [1, 1, 0]. A causal
model's outputs at real positions do not depend on the padding after them, so padding never changes a
log-probability. `response_logprobs` runs the model with `logits_index = index`: only the B * T answer
positions go through the output projection.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from lmforge.infer.sampling import SamplingParams


class RolloutConfigError(ValueError):
    """A sampling setting that rollouts cannot use (the message names the option)."""


@dataclass
class RolloutConfig:
    """How answers are sampled through LLMEngine.

    Attributes:
        temperature: Sampling temperature T (> 0); the trainer's log-probabilities are log_softmax(logits / T).
        max_new_tokens: Longest answer, in tokens (an answer cut here has no closing </s>).
        batch_size: Sequences the engine decodes together (its max_num_seqs).
        top_k: Must stay 0: filtered sampling would not be the distribution the trainer scores.
        top_p: Must stay 1 (as top_k).
        min_p: Must stay 0 (as top_k).
        repetition_penalty: Must stay 1 (as top_k).
        frequency_penalty: Must stay 0 (as top_k).
        presence_penalty: Must stay 0 (as top_k).
    """

    temperature: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 64
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise RolloutConfigError("rollout.max_new_tokens and rollout.batch_size must be >= 1")
        check_rollout_sampling(self.sampling(0), prefix="rollout.")

    def sampling(self, seed: int, temperature: float | None = None) -> SamplingParams:
        """The engine's SamplingParams for rollouts seeded `seed` (at `temperature`, default this config's)."""
        return SamplingParams(temperature=self.temperature if temperature is None else temperature,
                              top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty, frequency_penalty=self.frequency_penalty,
                              presence_penalty=self.presence_penalty, max_new_tokens=self.max_new_tokens, seed=seed)


_OFF = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0, "frequency_penalty": 0.0,
        "presence_penalty": 0.0}


def check_rollout_sampling(sampling: SamplingParams, prefix: str = "") -> None:
    """RolloutConfigError unless `sampling` samples softmax(logits / T) exactly: T > 0, every filter and
    penalty off, no stop strings."""
    if not sampling.temperature > 0:
        raise RolloutConfigError(f"{prefix}temperature must be > 0 for rollouts (got {sampling.temperature}): the "
                                 "trainer scores answers with log_softmax(logits / T)")
    for name, off in _OFF.items():
        if getattr(sampling, name) != off:
            raise RolloutConfigError(
                f"{prefix}{name} must be {off} for rollouts (got {getattr(sampling, name)}): the trainer's "
                "log-probabilities are those of softmax(logits / T), so sampling must not filter or penalise")
    if sampling.stop:
        raise RolloutConfigError(f"{prefix}stop strings are not supported in rollouts (answers end at </s>)")


# ---- sampling ---------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One sampled answer: prompt `prompt` (its index in the prompts given to `rollout`), choice `choice` of n.
    response_ids: the sampled tokens, the closing </s> included when the answer ended with it."""

    prompt: int
    choice: int
    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str | None
    engine_logprobs: list[float] | None = None


def rollout(engine, prompts: Sequence[Sequence[int]], sampling: SamplingParams, n: int = 1,
            seeds: Sequence[int] | None = None) -> list[Sample]:
    """n answers to each prompt through `engine`, prompt-major (entry b * n + k is answer k of prompt b).

    Answer k of prompt b is seeded seeds[b] + k, by default sampling.seed + b * n + k (module docstring).
    `sampling.logprobs` also returns the engine's log-probabilities of the sampled tokens (those of the raw
    logits, temperature 1). The n answers of a prompt are the engine's `add_samples`: the prompt is pre-filled
    once and choice k is seeded seed + k (so n must not exceed the engine's batch, rollout.batch_size).
    """
    check_rollout_sampling(sampling)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RolloutConfigError(f"n must be an integer >= 1, got {n!r}")
    if seeds is None:
        if sampling.seed is None:
            raise RolloutConfigError("rollouts need a seed (sampling.seed): answers must be reproducible")
        seeds = [sampling.seed + b * n for b in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise RolloutConfigError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    requests: dict[str, Sample] = {}
    for b, prompt in enumerate(prompts):
        params = dataclasses.replace(sampling, seed=seeds[b] % 2**63)
        for k, rid in enumerate(engine.add_samples(list(prompt), params, n)):
            requests[rid] = Sample(b, k, list(prompt), [], None, [] if sampling.logprobs else None)
    while any(rid in engine.seqs for rid in requests):
        for out in engine.step():
            s = requests.get(out.request_id)
            if s is None:
                continue
            s.response_ids.extend(out.new_token_ids)
            if out.new_logprobs is not None and s.engine_logprobs is not None:
                s.engine_logprobs.extend(out.new_logprobs)
            if out.finished:
                s.finish_reason = out.finish_reason
    return list(requests.values())


def make_engine(policy: nn.Module, eos_id: int, batch_size: int, max_prompts: int, block_size: int = 16):
    """An LLMEngine over a copy of `policy` for rollouts: bf16 on CUDA (fp32 elsewhere), in eval mode, up to
    `batch_size` sequences at a time and `max_prompts` requests queued.

    NOTE: its KV pool holds `batch_size` sequences of min(max_seq_len, 2048) tokens on every device. The
    engine's own CUDA default takes 80% of the free memory, which the trainer's optimizer states and
    activations (allocated after the engine) need."""
    from lmforge.infer.engine.llm import LLMEngine

    model = copy.deepcopy(policy).eval().requires_grad_(False)
    if next(model.parameters()).device.type == "cuda":
        model = model.to(torch.bfloat16)
    num_blocks = batch_size * -(-min(model.config.max_seq_len, 2048) // block_size)
    return LLMEngine(model, eos_id=eos_id, max_num_seqs=batch_size, max_waiting=max(1024, max_prompts),
                     block_size=block_size, num_blocks=num_blocks)


def sync_engine(engine, policy: nn.Module) -> None:
    """Load the policy's current weights into the engine (a collective under FSDP2: call it on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in policy.parameters()):
        state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))  # every rank: all
    else:
        state = policy.state_dict()
    engine.load_weights(state)


# ---- the trainer's side ------------------------------------------------------------------------------------------
@dataclass
class RolloutBatch:
    """Right-padded rows of prompt + answer (module docstring): tokens (B, L), index / targets / mask (B, T)."""

    tokens: Tensor
    index: Tensor
    targets: Tensor
    mask: Tensor

    def to(self, device) -> "RolloutBatch":
        return RolloutBatch(*(t.to(device) for t in (self.tokens, self.index, self.targets, self.mask)))

    def rows(self, rows: Tensor | list[int]) -> "RolloutBatch":
        """These rows only, trimmed to their own longest row and answer."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        mask = self.mask[rows]
        T = max(1, int(mask.sum(-1).max()))
        L = int((self.index[rows, :T].max(-1).values + 2).max().clamp(max=self.tokens.shape[1]))
        return RolloutBatch(self.tokens[rows, :L], self.index[rows, :T], self.targets[rows, :T], mask[:, :T])


def batch_of(samples: Sequence[Sample], pad_id: int = 0) -> RolloutBatch:
    """The rows of `samples` (module docstring). An empty answer (none is: the engine samples >= 1 token) would
    get one masked position."""
    P = [len(s.prompt_ids) for s in samples]
    R = [len(s.response_ids) for s in samples]
    L, T = max(p + r for p, r in zip(P, R)), max(1, max(R))
    tokens = torch.full((len(samples), L), pad_id, dtype=torch.long)
    targets = torch.zeros((len(samples), T), dtype=torch.long)
    t = torch.arange(T)
    for b, s in enumerate(samples):
        row = s.prompt_ids + s.response_ids
        tokens[b, : len(row)] = torch.tensor(row)
        targets[b, : R[b]] = torch.tensor(s.response_ids, dtype=torch.long)
    lengths = torch.tensor(R)
    prompt_lengths = torch.tensor(P)
    mask = t[None, :] < lengths[:, None]  # (B, T)
    # (B, T): P_b - 1 + t on real positions, the last real one repeated on padding (a valid index either way)
    index = prompt_lengths[:, None] - 1 + torch.minimum(t[None, :], (lengths - 1).clamp(min=0)[:, None])
    return RolloutBatch(tokens, index, targets, mask)


def response_logprobs(model: nn.Module, batch: RolloutBatch, temperature: float, with_entropy: bool = False
                      ) -> tuple[Tensor, Tensor | None]:
    """log pi_T(answer token t) (B, T) fp32 = log_softmax(logits / T) at `batch.targets`, and with
    `with_entropy` the entropy of pi_T at each answer position (B, T); both 0 on padding."""
    logits = model(batch.tokens, logits_index=batch.index)  # (B, T, V): only the answer positions
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, batch.targets[..., None]).squeeze(-1) * batch.mask
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1) * batch.mask
    return logp, entropy


def response_values(critic: nn.Module, batch: RolloutBatch) -> Tensor:
    """The critic's V(s_t) (B, T) fp32 at each answer position (the state before answer token t); 0 on padding."""
    return critic(batch.tokens, logits_index=batch.index)[..., 0].float() * batch.mask


__all__ = ["RolloutBatch", "RolloutConfig", "RolloutConfigError", "Sample", "batch_of", "check_rollout_sampling",
           "make_engine", "response_logprobs", "response_values", "rollout", "sync_engine"]
