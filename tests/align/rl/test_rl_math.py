"""The RL math against hand computations: whitening, each branch of Llama 2's gate, the KL estimators, the
per-token rewards, GAE on a short trajectory, the clipped surrogate, the value loss, GRPO's group advantages
(a zero-variance group included), loss averaging, explained variance, and the GRPO optimum's condition."""

import math

import pytest
import torch

from lmforge.align import rl_math as m


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_whiten_by_hand():
    x = t(1.0, 2.0, 3.0, 4.0)
    mean, var = m.moments(x)
    assert (mean.item(), var.item()) == (2.5, 1.25)  # (2.25 + 0.25 + 0.25 + 2.25) / 4
    s = 1 / math.sqrt(1.25 + 1e-8)
    torch.testing.assert_close(m.whiten(x), t(-1.5 * s, -0.5 * s, 0.5 * s, 1.5 * s), rtol=0, atol=1e-12)
    torch.testing.assert_close(m.whiten(x, shift_mean=False), 2.5 + t(-1.5 * s, -0.5 * s, 0.5 * s, 1.5 * s))
    # a mask: only the first three count (mean 2, var 2/3), the fourth comes back as 0
    mask = torch.tensor([True, True, True, False])
    s3 = 1 / math.sqrt(2 / 3 + 1e-8)
    torch.testing.assert_close(m.whiten(x, mask), t(-s3, 0.0, s3, 0.0))


def test_each_branch_of_the_gate():
    # threshold 0.15 is a raw score of log(0.15 / 0.85) = -1.7346
    rs = t(2.0, -2.0, -1.0, -1.7346, -1.7347)
    rh = t(0.5, 0.5, 0.5, 0.5, 0.5)
    tagged = torch.tensor([True, False, False, False, False])
    chosen, used = m.gated_score(rs, rh, tagged)
    # tagged -> Rs; sigmoid(-2) = 0.119 < 0.15 -> Rs; sigmoid(-1) = 0.269 -> Rh; just above / below the threshold
    assert used.tolist() == [True, True, False, False, True]
    assert chosen.tolist() == [2.0, -2.0, 0.5, 0.5, -1.7347]
    # logit undoes the sigmoid: the chosen raw score is logit(Rc)
    assert m.logit(torch.sigmoid(t(-1.0, 0.3))).tolist() == pytest.approx([-1.0, 0.3])
    # a lower threshold makes the untagged Rs = sigmoid(-2) prompt go to the helpfulness model
    assert m.gated_score(rs, rh, tagged, threshold=0.1)[1].tolist() == [True, False, False, False, False]


def test_kl_estimators_by_hand():
    logp, ref = t(math.log(0.5)), t(math.log(0.25))
    assert m.kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert m.kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)
    assert m.kl_estimate(ref, ref, "k3").item() == 0.0
    # both are unbiased for KL(p || q): the expectation under p of each, over a 3-token distribution
    p, q = t(0.6, 0.3, 0.1), t(0.2, 0.5, 0.3)
    exact = (p * (p / q).log()).sum().item()
    for est in ("k1", "k3"):
        assert (p * m.kl_estimate(p.log(), q.log(), est)).sum().item() == pytest.approx(exact)
    with pytest.raises(ValueError, match="k1 or k3"):
        m.kl_estimate(logp, ref, "k2")


def test_token_rewards_put_the_score_on_the_last_token():
    kl = t([0.1, -0.2, 0.3], [0.4, 0.5, 9.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    r = m.token_rewards(t(1.0, -2.0), kl, mask, beta=0.5)
    torch.testing.assert_close(r, t([-0.05, 0.1, 1.0 - 0.15], [-0.2, -0.25 - 2.0, 0.0]))


def test_gae_on_a_short_trajectory_by_hand():
    r, v = t([0.0, 0.0, 1.0]), t([0.5, 0.6, 0.7])
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = m.gae(r, v, mask, gamma=0.9, lam=0.8)
    # delta = [0.54 - 0.5, 0.63 - 0.6, 1 - 0.7]; A_2 = 0.3, A_1 = 0.03 + 0.72 * 0.3, A_0 = 0.04 + 0.72 * A_1
    torch.testing.assert_close(adv, t([0.21712, 0.246, 0.3]))
    torch.testing.assert_close(ret, t([0.71712, 0.846, 1.0]))
    # padding after the end: the same numbers, zeros beyond; lambda = 1, gamma = 1 gives returns = reward-to-go
    r2, v2 = t([0.0, 0.0, 1.0, 5.0]), t([0.5, 0.6, 0.7, 9.0])
    adv2, _ = m.gae(r2, v2, torch.tensor([[True, True, True, False]]), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv2, t([0.21712, 0.246, 0.3, 0.0]))
    _, ret1 = m.gae(t([0.1, 0.2, 1.0]), v, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret1, t([1.3, 1.2, 1.0]))


def test_the_clipped_surrogate_by_hand():
    rho = t(1.5, 1.5, 0.5, 0.5, 1.1)
    adv = t(1.0, -1.0, 1.0, -1.0, 1.0)
    loss, clipped, ratio = m.clipped_surrogate(rho.log(), torch.zeros(5, dtype=torch.float64), adv, clip=0.2)
    torch.testing.assert_close(loss, t(-1.2, 1.5, -0.5, 0.8, -1.1))
    assert clipped.tolist() == [True, False, False, True, False]
    torch.testing.assert_close(ratio, rho)
    # the gradient is zero exactly where the clipped term was taken
    logp = rho.log().clone().requires_grad_(True)
    m.clipped_surrogate(logp, torch.zeros(5, dtype=torch.float64), adv, 0.2)[0].sum().backward()
    torch.testing.assert_close(logp.grad, t(0.0, 1.5, -0.5, 0.0, -1.1))


def test_the_value_loss_by_hand():
    old, ret = t(0.0, 0.0), t(1.0, 1.0)
    assert m.value_loss(t(0.5, 0.1), old, ret, clip=0.2).tolist() == pytest.approx([0.32, 0.405])
    assert m.value_loss(t(0.5, 0.1), old, ret, clip=None).tolist() == pytest.approx([0.125, 0.405])


def test_group_advantages_and_a_zero_variance_group():
    r = t([1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5])
    centred = m.group_advantages(r, scale_std=False)
    torch.testing.assert_close(centred, t([0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]))
    std = math.sqrt(4 * 0.25 / 3)  # the sample standard deviation of [1, 0, 0, 1]
    scaled = m.group_advantages(r, scale_std=True, eps=1e-4)
    torch.testing.assert_close(scaled, t([0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]) / t([std + 1e-4], [1e-4]))
    assert (scaled[1] == 0).all()  # the zero-variance group contributes nothing


def test_loss_averaging_by_hand():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    a, b = t([1.0, 3.0, 7.0], [2.0, 9.0, 9.0]), t([1.0, 3.0, 7.0], [4.0, 9.0, 9.0])
    assert m.reduce_tokens(a, mask, "token").item() == 2.0 and m.reduce_tokens(a, mask, "sequence").item() == 2.0
    assert m.reduce_tokens(b, mask, "token").item() == pytest.approx(8 / 3)
    assert m.reduce_tokens(b, mask, "sequence").item() == 3.0
    # a mini-batch in two parts with the whole one's counts adds up to the whole one's mean
    for mode in ("token", "sequence"):
        parts = sum(m.reduce_tokens(b[i : i + 1], mask[i : i + 1], mode, n_sequences=2, n_tokens=3) for i in range(2))
        assert parts.item() == pytest.approx(m.reduce_tokens(b, mask, mode).item())


def test_explained_variance_and_entropy_by_hand():
    mask = torch.ones(3, dtype=torch.bool)
    assert m.explained_variance(t(1.0, 2.0, 2.0), t(1.0, 2.0, 3.0), mask).item() == pytest.approx(2 / 3)
    assert m.entropy_of_logits(torch.zeros(4)).item() == pytest.approx(math.log(4))
    assert m.entropy_of_logits(torch.tensor([0.0, -1e9])).item() == pytest.approx(0.0, abs=1e-6)


def test_the_grpo_optimum_satisfies_its_stationarity_condition():
    ref = torch.softmax(t(0.3, -0.2, 0.0, 0.5, -1.0, 0.1, 0.2, -0.4), 0)
    r = t(0.0, 1.0, 0.2, 0.5, 0.9, 0.1, 0.3, 0.0)
    pi = m.grpo_optimum(ref, r, beta=0.2, k=4)
    c = 3 / 4
    lhs, rhs = c * pi * (r - (pi * r).sum()), 0.2 * (pi - ref)
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-7)
    assert pi.argmax().item() == 1 and abs(pi.sum().item() - 1) < 1e-12
