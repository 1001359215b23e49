"""What PPO and GRPO share around their own update: the option groups, the models, the plan of an iteration,
the rollout through the engine, the trainer's no-grad passes and the iteration's metrics.

One iteration of either trainer (each keeps its own `for iteration` loop, ppo.py and grpo.py):

    plan      P prompts (`PromptSchedule`), shuffled into mini-batches of M / n prompts (n answers each)
    rollout   the engine samples n answers per prompt (rollout.py), the texts are decoded
    score     the recipe's reward (scorers.py)
    forward   no-grad passes for the old and reference log-probs (and PPO's values), micro-batch by micro-batch
    update    one gradient step per mini-batch
    sync      the new weights into the engine (`rollout.sync_engine`)

Data parallelism (torchrun): the iteration's shuffled prompt order q = 0 .. P - 1 is the same on every rank;
rank r answers the prompts at q = r, r + W, ... (W ranks), and mini-batch j holds the prompts at q in
[j * M / n, (j + 1) * M / n), i.e. M / (n W) of them from every rank. The answer k to the prompt at q is
seeded s_i + q * n + k (s_i: the iteration's seed), so the answers, the mini-batches and the losses are those
of one process (the denominators of the losses are the whole mini-batch's, and * W undoes the ranks'
gradient averaging, as in lm_step.py). Worked example, P = 8, n = 1, M = 4, W = 2: mini-batch 0 is q = 0..3,
rank 0 holds q = 0, 2 (its local rows 0, 1) and rank 1 q = 1, 3 (its rows 0, 1).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lmforge.align.prompts import PromptFileError, PromptSchedule, read_prompt_records
from lmforge.align.rollout import RolloutBatch, RolloutConfig, Sample, batch_of, rollout
from lmforge.train.config import TrainBase, TrainConfigError


@dataclass
class PromptsConfig:
    """The prompts RL answers.

    Attributes:
        files: Prompt files (.jsonl / .parquet; align/prompts.py): chat-world records (rlhf_prompts.jsonl) or
            plain {"messages"} / {"prompt"} records.
        per_iteration: Prompts answered per iteration over all ranks (Llama 2's PPO: 512).
    """

    files: list[str] = field(default_factory=list)
    per_iteration: int = 512

    def __post_init__(self) -> None:
        if self.per_iteration < 1:
            raise TrainConfigError(f"prompts.per_iteration must be >= 1, got {self.per_iteration}")


@dataclass
class RLTrainConfig(TrainBase):
    """Length and memory of an RL run.

    Attributes:
        iterations: Iterations (rollout, then updates) of the run (Llama 2's PPO: 200-400).
        micro_batch_size: Rows per forward pass on one rank (memory only: the losses do not depend on it).
    """

    iterations: int = 200
    micro_batch_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iterations < 1 or self.micro_batch_size < 1:
            raise TrainConfigError("train.iterations and train.micro_batch_size must be >= 1")


# ---- the models -----------------------------------------------------------------------------------------------
def load_policy(init_from: str, device: torch.device):
    """(the policy in fp32, its tokenizer, the tokenizer's path) from a model folder with a tokenizer.model."""
    from lmforge.models.checkpoint import load_model
    from lmforge.tokenizer import Tokenizer

    tok_path = Path(init_from) / "tokenizer.model"
    if not tok_path.is_file():
        raise PromptFileError(f"{init_from}: no tokenizer.model in the model folder")
    return load_model(init_from, device=device, dtype=torch.float32), Tokenizer(tok_path), tok_path


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in eval mode without gradients (the reference policy)."""
    return model.eval().requires_grad_(False)


def read_prompts(cfg: PromptsConfig, tokenizer, max_seq_len: int, max_new_tokens: int):
    """(prompt records, their chat-format prompt ids); PromptFileError for a prompt that leaves no room for
    an answer of max_new_tokens in the model's context."""
    from lmforge.tokenizer.chat import encode_chat

    if not cfg.files:
        raise PromptFileError("prompts.files is empty: give one or more prompt files (--prompts.files "
                              "[runs/world/rlhf_prompts.jsonl])")
    records = read_prompt_records(cfg.files)
    ids = [encode_chat(tokenizer, r["messages"], add_generation_prompt=True).ids for r in records]
    for r, p in zip(records, ids):
        if len(p) + max_new_tokens > max_seq_len:
            raise PromptFileError(f"{r['source']}: the prompt has {len(p)} tokens; with rollout.max_new_tokens "
                                  f"{max_new_tokens} that exceeds the model's context of {max_seq_len}")
    return records, ids


# ---- the plan of an iteration -----------------------------------------------------------------------------------
def iteration_seed(seed: int, iteration: int) -> int:
    """The first sampling seed of an iteration: a hash of (seed, iteration) below 2**62, so the seeds of
    different iterations (each spans P * n consecutive values) do not meet in practice."""
    digest = hashlib.blake2b(f"lmforge-rl|{seed}|{iteration}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


@dataclass
class IterationPlan:
    """This rank's share of iteration `iteration` (module docstring).

    prompts: indices into the prompt records, in local order; seeds: each one's first sampling seed;
    minibatches: the local sample rows of every mini-batch (row l * n + k is answer k of local prompt l)."""

    iteration: int
    n: int
    prompts: list[int]
    seeds: list[int]
    minibatches: list[list[int]]


def plan_iteration(schedule: PromptSchedule, iteration: int, n: int, minibatch_size: int, seed: int, dp
                   ) -> IterationPlan:
    """The plan of `iteration` for data-parallel rank `dp` (module docstring); minibatch_size M in answers."""
    P, W = schedule.per_iteration, dp.size
    if minibatch_size % n or P % (minibatch_size // n) or (minibatch_size // n) % W:
        raise TrainConfigError(
            f"the mini-batch size ({minibatch_size} answers) must be a multiple of the answers per prompt ({n}), "
            f"and its {minibatch_size // max(1, n)} prompts must divide prompts.per_iteration ({P}) and be a "
            f"multiple of the data-parallel ranks ({W})")
    chosen = schedule.iteration(iteration)
    order = np.random.default_rng([seed, iteration, 29]).permutation(P)  # q -> position in `chosen`
    s0 = iteration_seed(seed, iteration)
    qs = list(range(dp.rank, P, W))
    per_mb = minibatch_size // n // W  # local prompts per mini-batch
    minibatches = [[l * n + k for l in range(j, j + per_mb) for k in range(n)] for j in range(0, len(qs), per_mb)]
    return IterationPlan(iteration, n, [chosen[order[q]] for q in qs], [s0 + q * n for q in qs], minibatches)


# ---- rollout --------------------------------------------------------------------------------------------------
class Timer:
    """Wall time per phase of an iteration: `with timer("rollout"): ...`; `times` in seconds."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def figures(self, rollout_tokens: float) -> dict[str, float]:
        """time/<phase> and time/iteration in seconds, and rollout/tokens_per_s for `rollout_tokens` sampled."""
        return {**{f"time/{k}": v for k, v in self.times.items()}, "time/iteration": sum(self.times.values()),
                "rollout/tokens_per_s": rollout_tokens / max(self.times.get("rollout", 0.0), 1e-9)}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - start


def collect(engine, tokenizer, prompt_ids: list[list[int]], plan: IterationPlan, cfg: RolloutConfig
            ) -> tuple[list[Sample], list[str]]:
    """The plan's answers through the engine, and their texts (without </s>), prompt-major as the plan's rows.

    NOTE: Python's garbage collector is paused while the engine runs: a trainer's heap (models, optimizer
    states, records) makes each full collection long, and the engine's steps allocate the many small objects
    that trigger them. Measured on one H200 (benchmarks/ppo_iteration.py --rollout-variants): PPO's rollouts at
    0.737x the engine alone as they were, 0.789x with the collector paused; rollouts free what they allocate by
    reference counting, and the collector runs again right after."""
    prompts = [prompt_ids[i] for i in plan.prompts]
    with gc_paused():
        samples = rollout(engine, prompts, cfg.sampling(seed=0), plan.n, seeds=plan.seeds)
    return samples, [tokenizer.decode(s.response_ids).strip() for s in samples]


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector inside the block (if it was on), and restore it after."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


@dataclass
class MicroBatch:
    """The rows of one forward pass: `rows` (local sample rows) and their tensors on the device."""

    rows: list[int]
    batch: RolloutBatch


def micro_batches(samples: list[Sample], plan: IterationPlan, micro: int, device) -> list[list[MicroBatch]]:
    """Each mini-batch of the plan as micro-batches of at most `micro` rows, on `device`. The same tensors serve
    the no-grad passes and the update, so the first mini-batch's ratio is exactly 1."""
    full = batch_of(samples)
    return [[MicroBatch(mb[i : i + micro], full.rows(mb[i : i + micro]).to(device)) for i in range(0, len(mb), micro)]
            for mb in plan.minibatches]


@torch.no_grad()
def no_grad_pass(fn: Callable[[RolloutBatch], Tensor], minibatches: list[list[MicroBatch]]) -> list[list[Tensor]]:
    """fn(batch) of every micro-batch, without gradients, in the same nesting."""
    return [[fn(m.batch) for m in mb] for mb in minibatches]


def _reduce(t: Tensor, group, op=None) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, group=group, **({} if op is None else {"op": op}))
    return t


def global_means(sums: dict[str, tuple[float, float]], group, device) -> dict[str, float]:
    """{key: (sum, count)} of this rank -> {key: sum / count} over every rank (keys with no count left out)."""
    keys = sorted(sums)
    t = _reduce(torch.tensor([[sums[k][0], sums[k][1]] for k in keys], dtype=torch.float64, device=device), group)
    return {k: (t[i, 0] / t[i, 1]).item() for i, k in enumerate(keys) if t[i, 1] > 0}


def global_sum(value: float, group, device) -> float:
    return _reduce(torch.tensor(value, dtype=torch.float64, device=device), group).item()


class Sums:
    """Figures gathered over micro-batches on this rank, then reduced over the ranks (`global_figures`):
    `add(key, value)` sums, `add(key, value, count)` gives sum / count, `add_max` the maximum."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}
        self.maxima: dict[str, float] = {}

    def add(self, key: str, value: float, count: float | None = None) -> None:
        cell = self.sums.setdefault(key, [0.0, 0.0, count is None])
        cell[0] += value
        cell[1] += count or 0.0

    def add_max(self, key: str, value: float) -> None:
        self.maxima[key] = max(self.maxima.get(key, -float("inf")), value)

    def global_figures(self, group, device) -> dict[str, float]:
        """Every figure over all ranks: sums summed, ratios as global sum / global count, maxima as the max."""
        keys = sorted(self.sums)
        t = _reduce(torch.tensor([self.sums[k][:2] for k in keys], dtype=torch.float64, device=device).reshape(-1, 2),
                    group)
        out = {k: t[i, 0].item() if self.sums[k][2] else (t[i, 0] / t[i, 1].clamp(min=1e-30)).item()
               for i, k in enumerate(keys)}
        for k, v in self.maxima.items():
            out[k] = _reduce(torch.tensor(v, dtype=torch.float64, device=device), group, dist.ReduceOp.MAX).item()
        return out

    def means(self) -> dict[str, float]:
        """This rank's figures without reducing (for values that are already global): sum / count (a sum
        added without counts as it is), maxima as the max."""
        return {**{k: s / max(c, 1.0) for k, (s, c, _) in self.sums.items()}, **self.maxima}


def rollout_sums(samples: list[Sample], records: list[dict], answers: list[str], eos_id: int
                 ) -> dict[str, tuple[float, float]]:
    """This rank's {key: (sum, count)} of the answers' figures: length in tokens, the share ended by </s>, and
    the oracle's figures of the same answers (scorers.oracle_sums)."""
    from lmforge.align.scorers import oracle_sums

    n = float(len(samples))
    ended = sum(bool(s.response_ids) and s.response_ids[-1] == eos_id for s in samples)
    return {"answer/length": (float(sum(len(s.response_ids) for s in samples)), n),
            "answer/ended": (float(ended), n), **oracle_sums(records, answers)}


def finish_policy_run(job, state, policy: torch.nn.Module, tokenizer_path, save_model: bool,
                      plot_keys: tuple[str, ...]) -> Path:
    """The end of a completed RL run: the summary and plot of `plot_keys` (harness.finish_run), then the policy
    in RUN/model with its tokenizer; the run folder."""
    from lmforge.train import harness

    harness.finish_run(job, state, plot_keys=plot_keys)
    if save_model:
        harness.export_model(job, policy, tokenizer_path)
    return job.dir


__all__ = ["IterationPlan", "MicroBatch", "PromptsConfig", "RLTrainConfig", "Sums", "Timer", "collect",
           "finish_policy_run", "frozen", "global_means", "global_sum", "iteration_seed", "load_policy",
           "micro_batches", "no_grad_pass", "plan_iteration", "read_prompts", "rollout_sums"]
