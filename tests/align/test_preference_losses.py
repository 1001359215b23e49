"""The losses of learning from preferences against hand computations, and DPO's bandit gate: trained by the real
DPO loss, the policy reaches pi*(y) proportional to pi_ref(y) exp(r(y) / beta)."""

import math

import numpy as np
import pytest
import torch

from lmforge.align.preference_losses import MARGINS, dpo_loss, implicit_rewards, margin_of, pair_accuracy, ranking_loss
from lmforge.align.world.oracle import DEGREES
from helpers import one_torch_thread  # noqa: F401  (autouse: tiny tensors run faster on one thread)

LN2, LN43, LN3 = math.log(2), math.log(4 / 3), math.log(3)


def test_the_margin_tables_are_llama_2s():
    assert [margin_of(d, "small") for d in DEGREES] == [1, 2 / 3, 1 / 3, 0]
    assert [margin_of(d, "large") for d in DEGREES] == [3, 2, 1, 0]
    assert [margin_of(d, "none") for d in DEGREES] == [0, 0, 0, 0]
    assert margin_of(None, "column", 0.25) == 0.25 and margin_of(None, "none") == 0.0
    with pytest.raises(ValueError, match="needs a 'degree'"):
        margin_of(None, "small")
    with pytest.raises(ValueError, match="numeric 'margin'"):
        margin_of("better", "column")
    assert set(MARGINS) == {"small", "large", "none"}


@pytest.mark.parametrize("table", ["small", "large", "none", "column"])
def test_the_ranking_loss_equals_a_hand_computation_for_every_margin_table(table):
    """-log sigma(z) with z = r_c - r_r - m: at z = 0 it is ln 2; at z = ln 3, sigma = 3/4 and it is ln(4/3). Each pair's
    reward gap is its margin (under the table) plus 0 or ln 3, so the mean loss is (ln 2 + ln(4/3)) / 2 per degree."""
    column = [0.5, -0.25, 2.0, 0.0]  # a numeric margin per pair, as TRL's margin column
    margins = [margin_of(d, table, column[i]) for i, d in enumerate(DEGREES)]
    gaps = torch.tensor([m + extra for m in margins for extra in (0.0, LN3)], dtype=torch.float64)
    rejected = torch.linspace(-1, 1, 8, dtype=torch.float64)
    m = torch.tensor([m for m in margins for _ in range(2)], dtype=torch.float64)
    loss = ranking_loss(rejected + gaps, rejected, m)
    assert loss.item() == pytest.approx((LN2 + LN43) / 2, rel=1e-12)
    # one pair at z = ln 3: dL/dr_c = -sigma(-z) = -1/4, dL/dr_r = +1/4
    c = torch.tensor([1.0 + LN3], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    ranking_loss(c, r, torch.tensor([margin_of("slightly_better", "large")], dtype=torch.float64)).backward()
    assert c.grad.item() == pytest.approx(-0.25, rel=1e-12) and r.grad.item() == pytest.approx(0.25, rel=1e-12)
    # large gaps: softplus stays exact where log(sigmoid(z)) would underflow
    assert ranking_loss(torch.tensor([-200.0]), torch.tensor([0.0])).item() == pytest.approx(200.0)


def test_the_dpo_loss_and_implicit_rewards_equal_a_hand_computation():
    """beta = ln(3) / 2, log pi - log pi_ref = +1 for the chosen and -1 for the rejected answer: implicit rewards
    +-ln(3) / 2, their difference ln 3, so the loss is ln(4/3); a pair the policy has not moved from the reference
    gives ln 2, and the accuracy counts the first pair only."""
    beta = LN3 / 2
    pc = torch.tensor([-2.0, -5.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-6.0, -4.0], dtype=torch.float64)
    rc, rr = torch.tensor([-3.0, -5.0], dtype=torch.float64), torch.tensor([-5.0, -4.0], dtype=torch.float64)
    loss, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta)
    assert r_c.tolist() == pytest.approx([beta, 0.0]) and r_r.tolist() == pytest.approx([-beta, 0.0])
    assert loss.item() == pytest.approx((LN43 + LN2) / 2, rel=1e-12)
    assert implicit_rewards(pc, rc, beta).tolist() == pytest.approx(r_c.tolist())
    assert pair_accuracy(r_c, r_r).item() == 0.5
    loss.backward()  # dL/dlog pi(y_c) = -beta sigma(-z) / P: -beta / 4 / 2 for z = ln 3, -beta / 2 / 2 for z = 0
    assert pc.grad.tolist() == pytest.approx([-beta / 8, -beta / 4], rel=1e-12)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(pc, pr, rc, rr, 0.0)


def test_dpo_on_a_bandit_reaches_the_kl_regularised_optimum():
    """The DPO bandit gate: 8 one-token answers y with fixed rewards r(y) and a non-uniform reference pi_ref;
    pairs (y1, y2) drawn uniformly, labelled by the Bradley-Terry model P(y1 better) = sigma(r(y1) - r(y2)); the policy
    trained by `dpo_loss` comes within 0.05 total variation of pi*(y) proportional to pi_ref(y) exp(r(y) / beta).

    The policy is a bare table of 8 logits, pi = softmax(theta). NOTE: a faithful test of DPO itself: for a
    one-token answer log pi(y | x) is exactly log softmax(logits)[y], the quantity a language model gives DPO for
    such an answer, and a table can represent pi* exactly, so what is tested is that minimising this loss on
    Bradley-Terry data recovers pi* (the DPO paper's section 4) and not a model's capacity. The real model's
    sequence log-probabilities are tested against a direct computation in test_dpo.py."""
    rng = np.random.default_rng(0)
    K, beta, n = 8, 0.5, 30_000
    r = torch.tensor(rng.uniform(0, 1.5, K))
    ref_logits = torch.tensor(rng.normal(0, 0.7, K))
    log_ref = torch.log_softmax(ref_logits, 0)
    y1, y2 = rng.integers(0, K, n), rng.integers(0, K, n)
    keep = y1 != y2
    y1, y2 = y1[keep], y2[keep]
    first = rng.random(len(y1)) < 1 / (1 + np.exp(-(r[y1] - r[y2]).numpy()))
    chosen, rejected = torch.tensor(np.where(first, y1, y2)), torch.tensor(np.where(first, y2, y1))

    theta = ref_logits.clone().requires_grad_(True)  # the policy starts at the reference, as DPO's does
    opt = torch.optim.Adam([theta], lr=0.1)
    for _ in range(300):
        log_pi = torch.log_softmax(theta, 0)
        loss, _, _ = dpo_loss(log_pi[chosen], log_pi[rejected], log_ref[chosen], log_ref[rejected], beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pi = torch.softmax(theta.detach(), 0)
    target = torch.softmax(log_ref + r / beta, 0)
    tv = 0.5 * (pi - target).abs().sum().item()
    start = 0.5 * (torch.softmax(ref_logits, 0) - target).abs().sum().item()
    assert start > 0.3  # the reference is far from pi*: the policy had to move
    assert tv < 0.05, (tv, pi, target)
