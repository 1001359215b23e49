"""Bandit gates on the CPU (one-token answers over 8 tokens, a fixed reward per token), through the real PPO and
GRPO loss functions (bandit_helpers.py says why a logits table is a faithful test of them):

- PPO without a KL term moves to the best token;
- PPO with beta > 0 (the KL in the reward, k1) comes within 0.05 total variation of pi*(y) ~ pi_0(y) exp(r(y) / beta);
- GRPO without std scaling and with k3 in the loss reaches the optimum that normalisation implies
  (rl_math.grpo_optimum), which differs from PPO's; GRPO without a KL term moves to the best token.
"""

import torch
from bandit_helpers import REWARDS, Z0, grpo_bandit, ppo_bandit, tv

from lmforge.align import rl_math
from lmforge.align.grpo import GRPOConfig
from lmforge.align.ppo import PPOConfig

PI0 = torch.softmax(Z0, 0)
BEST = int(REWARDS.argmax())


def test_ppo_without_kl_moves_to_the_best_token():
    # the default path: whitened scores, whitened advantages, clipped value loss
    pi = ppo_bandit(PPOConfig(beta=0.0, minibatch_size=64), whiten_scores=True, iterations=30, batch=256, lr=0.1)
    assert pi[BEST] > 0.99 and PI0[BEST] < 0.1


def test_ppo_with_kl_comes_within_005_tv_of_the_kl_regularised_optimum():
    beta = 0.1
    star = PI0 * torch.exp(REWARDS / beta)
    star /= star.sum()
    pi = ppo_bandit(PPOConfig(beta=beta, minibatch_size=64), whiten_scores=False, iterations=80, batch=256, lr=0.05)
    assert tv(pi, star) < 0.05
    assert tv(PI0, star) > 0.5 and pi[BEST] < 0.95  # it moved far, and not to the best token alone


def test_grpo_reaches_the_optimum_of_its_normalisation():
    beta, k = 0.1, 8
    cfg = GRPOConfig(beta=beta, scale_std=False, group_size=k, minibatch_size=64)
    target = rl_math.grpo_optimum(PI0, REWARDS, beta, k)
    pi = grpo_bandit(cfg, iterations=40, groups=32, lr=0.1)
    assert tv(pi, target) < 0.05
    # the k3 term pulls towards the forward KL's optimum, which is not PPO's pi_0 exp(r / beta): the gate can fail
    star = PI0 * torch.exp(REWARDS / beta)
    assert tv(target, star / star.sum()) > 0.05


def test_grpo_without_kl_moves_to_the_best_token():
    pi = grpo_bandit(GRPOConfig(beta=0.0, scale_std=True, group_size=8, minibatch_size=64), iterations=30, groups=32,
                     lr=0.1)
    assert pi[BEST] > 0.99
