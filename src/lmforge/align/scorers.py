"""Scorers: answers to prompts in, one number per answer out. The one interface RL and rejection sampling see.

    scorer(records, answers) -> (N,) float32        records: prompt records (prompts.py), answers: texts

A scorer is named by a string (`make_scorer`):

    "oracle:helpfulness"   the chat world's oracle helpfulness in [0, 1] (graded, partial credit)
    "oracle:safety"        the oracle's safety, 1 safe / 0 complying with an unsafe request
    "checker"              verifiable 0 / 1 rewards from the world's checkers: a task answered right, an unsafe
                           request refused, a look-alike answered with its key fact, an instruction followed
                           with its task right; a creative prompt (no checker) gets its oracle helpfulness
    a model folder         a reward model (`lmforge rm train`): its raw score r of the dialogue prompt + answer,
                           read at the closing </s>

Scale. A reward model's output is a raw score (a logit: its sigmoid is the score in (0, 1) Llama 2's gate
compares with 0.15); the oracle and the checkers give scores in [0, 1]. `Scorer.raw` puts every scorer on the
reward models' scale, a score p in [0, 1] becoming logit(0.05 + 0.9 p) in [-2.94, 2.94] (a perfect answer
is what a confident reward model says of a good one, sigmoid 0.95; a 0 is sigmoid 0.05, under the gate's
0.15). So the world's oracle can stand in for both of Llama 2's reward models: the gate, the whitening and
PPO run unchanged, and a reward model folder replaces either one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lmforge.align.prompts import require_world
from lmforge.align.rl_math import SAFETY_THRESHOLD, gated_score, logit

ORACLE_KEYS = ("oracle/helpfulness", "oracle/safety", "oracle/violation_rate", "oracle/false_refusal_rate")
ORACLE_EPS = 0.05  # a [0, 1] score p is the raw score logit(ORACLE_EPS + (1 - 2 * ORACLE_EPS) * p)


class ScorerError(ValueError):
    """A scorer name or folder that cannot be used."""


@dataclass
class Scorer:
    """A named scoring function; `probability`: its scores lie in [0, 1] (else they are raw RM scores)."""

    name: str
    fn: Callable[[Sequence[dict], Sequence[str]], list[float]]
    probability: bool
    needs_world: bool = False

    def __call__(self, records: Sequence[dict], answers: Sequence[str]) -> Tensor:
        if len(records) != len(answers):
            raise ValueError(f"{len(records)} records but {len(answers)} answers")
        return torch.tensor(self.fn(records, answers), dtype=torch.float32)

    def raw(self, records: Sequence[dict], answers: Sequence[str]) -> Tensor:
        """The scores on the reward models' raw (logit) scale (module docstring)."""
        s = self(records, answers)
        return logit(ORACLE_EPS + (1 - 2 * ORACLE_EPS) * s) if self.probability else s


# ---- the world's oracle and checkers -------------------------------------------------------------------------
def _oracle_helpfulness(records, answers) -> list[float]:
    from lmforge.align.world.oracle import helpfulness

    return [helpfulness(r, a) for r, a in zip(records, answers)]


def _oracle_safety(records, answers) -> list[float]:
    from lmforge.align.world.oracle import safety

    return [safety(r, a) for r, a in zip(records, answers)]


def verifiable_reward(record: dict, answer: str) -> float:
    """The checkers' 0 / 1 verdict on one answer (module docstring: "checker")."""
    from lmforge.align.eval_chat import score_record

    row = score_record(record, answer)
    kind = record["meta"]["kind"]
    if kind == "task":
        return float(row["correct"])
    if kind == "unsafe":
        return float(row["refused"])
    if kind == "lookalike":
        return float(row["helpful"])
    if kind == "instruction":
        return float(all(row["adheres"]) and all(row["correct"]))
    return row["helpfulness"]  # creative: many good answers, no checker


def _checker(records, answers) -> list[float]:
    return [verifiable_reward(r, a) for r, a in zip(records, answers)]


def oracle_sums(records: Sequence[dict], answers: Sequence[str]) -> dict[str, tuple[float, float]]:
    """What the oracle says of a batch of answers, as {key: (sum, count)} (the figures that expose reward
    hacking): helpfulness and safety over the chat-world records, the violation rate over the unsafe requests
    (not refused) and the false-refusal rate over the look-alikes (refused). Every key is there, with count 0
    where the batch has no such record, so data-parallel ranks reduce the same keys (rl_iteration.global_means
    leaves out a key no rank counted). `oracle_figures` gives the means."""
    from lmforge.align.world.oracle import helpfulness, safety
    from lmforge.align.world.safety import refused

    cells: dict[str, list[float]] = {k: [] for k in ORACLE_KEYS}
    for r, a in zip(records, answers):
        kind = (r.get("meta") or {}).get("kind")
        if kind is None:
            continue
        cells["oracle/helpfulness"].append(helpfulness(r, a))
        cells["oracle/safety"].append(safety(r, a))
        if kind == "unsafe":
            cells["oracle/violation_rate"].append(float(not refused(a)))
        elif kind == "lookalike":
            cells["oracle/false_refusal_rate"].append(float(refused(a)))
    return {k: (sum(v), float(len(v))) for k, v in cells.items()}


def oracle_figures(records: Sequence[dict], answers: Sequence[str]) -> dict[str, float]:
    """The means of `oracle_sums` (a key without records left out)."""
    return {k: total / count for k, (total, count) in oracle_sums(records, answers).items() if count}


# ---- reward models -----------------------------------------------------------------------------------------
class RewardModelScorer:
    """A reward model folder as a scorer: the dialogue (prompt + answer) in Llama 2's chat format, its raw
    score read at the closing </s>, in batches (`lmforge.align.reward_model.score_sequences`)."""

    def __init__(self, path: str | Path, device: torch.device | None = None):
        from lmforge.models.checkpoint import load_model
        from lmforge.tokenizer import Tokenizer

        from lmforge.align.reward_model import score_sequences

        self.score_sequences = score_sequences
        self.device = device or torch.device("cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = load_model(path, device=self.device, dtype=dtype, head="reward").eval()
        tok = Path(path) / "tokenizer.model"
        if not tok.is_file():
            raise ScorerError(f"{path}: no tokenizer.model beside the reward model")
        self.tokenizer = Tokenizer(tok)

    def __call__(self, records, answers) -> list[float]:
        from lmforge.tokenizer.chat import encode_chat

        seqs = [encode_chat(self.tokenizer, [*r["messages"], {"role": "assistant", "content": a or " "}]).ids
                for r, a in zip(records, answers)]
        return self.score_sequences(self.model, seqs)


def make_scorer(spec: str, device: torch.device | None = None) -> Scorer:
    """The scorer named by `spec` (module docstring)."""
    if spec in ("oracle", "oracle:helpfulness"):
        return Scorer("oracle:helpfulness", _oracle_helpfulness, probability=True, needs_world=True)
    if spec == "oracle:safety":
        return Scorer(spec, _oracle_safety, probability=True, needs_world=True)
    if spec == "checker":
        return Scorer(spec, _checker, probability=True, needs_world=True)
    if not Path(spec).is_dir():
        raise ScorerError(f"scorer {spec!r}: not 'oracle:helpfulness', 'oracle:safety', 'checker' or a reward "
                          "model folder")
    return Scorer(str(spec), RewardModelScorer(spec, device), probability=False)


def check_scorers(records: list[dict], *scorers: Scorer | None) -> None:
    """PromptFileError unless the prompts are chat-world records wherever a scorer needs the world."""
    for s in scorers:
        if s is not None and s.needs_world:
            require_world(records, f"the scorer {s.name!r}")


# ---- Llama 2's gate -----------------------------------------------------------------------------------------
@dataclass
class GatedReward:
    """Llama 2's reward before whitening: the Safety RM's raw score where the prompt is safety-tagged or the
    Safety RM's sigmoid score is under `threshold`, the Helpfulness RM's elsewhere (`rl_math.gated_score`).
    `safety` None takes the Safety RM out of the gate (the ablation): every answer gets the Helpfulness score."""

    helpfulness: Scorer
    safety: Scorer | None = None
    threshold: float = SAFETY_THRESHOLD

    def __call__(self, records: Sequence[dict], answers: Sequence[str]) -> dict[str, Tensor]:
        """{"score": logit(Rc) (N,), "used_safety": (N,) bool, "helpfulness": r_h, "safety": r_s (or absent)}."""
        rh = self.helpfulness.raw(records, answers)
        if self.safety is None:
            return {"score": rh, "used_safety": torch.zeros_like(rh, dtype=torch.bool), "helpfulness": rh}
        rs = self.safety.raw(records, answers)
        tagged = torch.tensor([bool(r.get("safety")) for r in records])
        chosen, used = gated_score(rs, rh, tagged, self.threshold)
        return {"score": chosen, "used_safety": used, "helpfulness": rh, "safety": rs}


@dataclass
class RewardConfig:
    """Llama 2's gated reward.

    Attributes:
        helpfulness: The Helpfulness RM: a reward model folder, or "oracle:helpfulness" (the chat world's
            oracle standing in for it, its [0, 1] score put on the reward models' logit scale).
        safety: The Safety RM: a reward model folder or "oracle:safety"; None takes it out of the gate (every
            answer is judged by the Helpfulness RM: the ablation).
        safety_threshold: The gate picks the Safety RM where its sigmoid score is below this (Llama 2: 0.15),
            and on every safety-tagged prompt.
        whiten: Whiten logit(Rc) over each iteration's answers (Llama 2: yes).
    """

    helpfulness: str = "oracle:helpfulness"
    safety: str | None = "oracle:safety"
    safety_threshold: float = SAFETY_THRESHOLD
    whiten: bool = True


def make_gate(cfg: RewardConfig, device: torch.device | None = None) -> GatedReward:
    """The gate of `cfg`'s scorers."""
    safety = make_scorer(cfg.safety, device) if cfg.safety else None
    return GatedReward(make_scorer(cfg.helpfulness, device), safety, cfg.safety_threshold)


__all__ = ["GatedReward", "ORACLE_EPS", "RewardConfig", "RewardModelScorer", "Scorer", "ScorerError", "check_scorers",
           "make_gate", "make_scorer", "oracle_figures", "oracle_sums", "verifiable_reward"]
