"""The losses of learning from preferences, as small pure functions: Llama 2's reward-model ranking loss with
its margins, and DPO's loss with its implicit rewards.

Notation: a pair is (x, y_c, y_r), a prompt with a chosen and a rejected answer; r(x, y) a reward model's
scalar score; pi(y | x) the policy's and pi_ref(y | x) the frozen reference's probability of a whole answer,
log pi(y | x) the sum of the answer tokens' log-probabilities; sigma the logistic function; P pairs in a batch.

Reward model (Llama 2, section 3.2.2, equation 2): a binary ranking loss with a margin m that grows with how
much better the annotators said the chosen answer is,

    L = -log sigma(r(x, y_c) - r(x, y_r) - m(degree))

    degree                         margin "small"   margin "large"
    significantly better           1                3
    better                         2/3              2
    slightly better                1/3              1
    negligibly better / unsure     0                0

`none` is margin 0 for every pair (the plain Bradley-Terry loss, equation 1); a numeric margin per pair (TRL's
`margin` column) replaces the table. With the margin, a pair labelled "significantly better" is only fitted
once the reward gap passes m, so clear pairs are pushed apart further than near ties.

DPO (Rafailov et al. 2023, equation 7): the policy is its own reward model. With beta > 0,

    implicit reward   r_hat(x, y) = beta * (log pi(y | x) - log pi_ref(y | x))
    L = -log sigma(r_hat(x, y_c) - r_hat(x, y_r))

the loss of the Bradley-Terry model under the implicit reward; its optimum over all policies is
pi*(y | x) proportional to pi_ref(y | x) * exp(r(x, y) / beta) for the reward r that generated the preferences
(the DPO paper's section 4). Logged alongside the loss: implicit-reward accuracy, the share of pairs with
r_hat(y_c) > r_hat(y_r), and the mean margin r_hat(y_c) - r_hat(y_r).

Every loss is the mean over the P pairs of the batch. `-log sigma(z)` is computed as softplus(-z), which is
exact for large |z| where log(sigmoid(z)) would underflow.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.align.world.oracle import DEGREES

MarginTable = Literal["small", "large", "none", "column"]
# Llama 2 (section 3.2.2): the margin of each degree, in the order of oracle.DEGREES (significantly .. negligibly).
MARGINS: dict[str, tuple[float, float, float, float]] = {
    "small": (1.0, 2 / 3, 1 / 3, 0.0),
    "large": (3.0, 2.0, 1.0, 0.0),
    "none": (0.0, 0.0, 0.0, 0.0),
}


def margin_of(degree: str | None, table: MarginTable, margin: float | None = None) -> float:
    """The margin of one pair: from `table` by its `degree`, or its own numeric `margin` for table "column".

    >>> margin_of("better", "small"), margin_of("better", "large"), margin_of("better", "none")
    (0.6666666666666666, 2.0, 0.0)
    """
    if table == "column":
        if margin is None:
            raise ValueError("loss.margin column needs a numeric 'margin' in every pair")
        return float(margin)
    if table not in MARGINS:
        raise ValueError(f"loss.margin must be small, large, none or column, got {table!r}")
    if table == "none":
        return 0.0
    if degree not in DEGREES:
        raise ValueError(f"loss.margin {table} needs a 'degree' ({', '.join(DEGREES)}) in every pair, got {degree!r}")
    return MARGINS[table][DEGREES.index(degree)]


def ranking_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None) -> Tensor:
    """Llama 2's reward-model loss, mean over pairs of -log sigma(r_c - r_r - m).

    chosen, rejected: (P,) rewards r(x, y_c), r(x, y_r); margin: (P,) m per pair (None: 0) -> scalar.
    """
    z = chosen - rejected
    if margin is not None:
        z = z - margin
    return F.softplus(-z).mean()


def implicit_rewards(policy_logp: Tensor, reference_logp: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward beta * (log pi(y | x) - log pi_ref(y | x)), elementwise: (P,) -> (P,)."""
    return beta * (policy_logp - reference_logp)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
             beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """DPO's loss (mean over pairs) and each pair's implicit rewards of the chosen and the rejected answer.

    Each input is (P,) sequence log-probabilities (sums over the answer tokens); returns (loss, r_hat_c, r_hat_r).
    """
    if not beta > 0:
        raise ValueError(f"DPO's beta must be > 0, got {beta}")
    r_c = implicit_rewards(policy_chosen, reference_chosen, beta)
    r_r = implicit_rewards(policy_rejected, reference_rejected, beta)
    return ranking_loss(r_c, r_r), r_c, r_r


def pair_accuracy(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Share of pairs whose chosen answer scores strictly higher: (P,), (P,) -> scalar in [0, 1]."""
    return (chosen > rejected).float().mean()


__all__ = ["MARGINS", "MarginTable", "dpo_loss", "implicit_rewards", "margin_of", "pair_accuracy", "ranking_loss"]
