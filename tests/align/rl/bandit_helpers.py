"""One-token bandits trained through the real PPO and GRPO loss functions (importable as `bandit_helpers`).

The policy is a bare table of 8 logits z (pi = softmax(z)) and PPO's critic one number (the value of the one
prompt). Why this is a faithful test of the losses: with one-token answers the model's whole effect is the
distribution at the prompt's last position, and the table can take every distribution, so the losses'
fixed points are those of any network that can represent them; the tensors the losses see have the trainer's
shapes ((B, T = 1) log-probs, values and masks), and every step goes through the trainer's own functions
(ppo_targets, whiten, whiten_advantages, ppo_loss; group_advantages, grpo_loss) with AdamW, mini-batches of
the iteration's samples and one gradient step per mini-batch. What the table leaves out (the model, the
rollout, batching) is tested in test_rollout.py.
"""

import torch

from lmforge.align import rl_math
from lmforge.align.grpo import GRPOConfig, grpo_loss
from lmforge.align.ppo import PPOConfig, ppo_loss, ppo_targets, whiten_advantages

REWARDS = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3, 0.0, 0.6, 0.4])
Z0 = torch.tensor([0.3, -0.2, 0.0, -0.5, 0.6, 0.1, 0.2, -0.4])  # the reference's logits; the best token is 3


def tv(p, q) -> float:
    return 0.5 * (p - q).abs().sum().item()


def ppo_bandit(cfg: PPOConfig, whiten_scores: bool, iterations: int, batch: int = 512, lr: float = 0.05, seed=0):
    """PPO's updates on the bandit; returns pi = softmax(z) after `iterations`."""
    gen = torch.Generator().manual_seed(seed)
    z, v = Z0.clone().requires_grad_(True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([z, v], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    ref_all = torch.log_softmax(Z0, 0)
    mask = torch.ones(batch, 1, dtype=torch.bool)
    for _ in range(iterations):
        with torch.no_grad():
            y = torch.multinomial(torch.softmax(z, 0), batch, replacement=True, generator=gen)  # (B,) answers
            old = torch.log_softmax(z, 0)[y][:, None]  # (B, 1): the rollout's log-probs
            score = rl_math.whiten(REWARDS[y]) if whiten_scores else REWARDS[y]
            target = ppo_targets(old, ref_all[y][:, None], v.expand(batch, 1).clone(), mask, score, cfg)
            if cfg.whiten_advantages:
                whiten_advantages([target], False)
        order = torch.randperm(batch, generator=gen)
        for j in range(0, batch, cfg.minibatch_size):
            rows = order[j : j + cfg.minibatch_size]
            logp = torch.log_softmax(z, 0)[y[rows]][:, None]
            loss, _ = ppo_loss(logp, v.expand(len(rows), 1), {k: t[rows] for k, t in target.items()}, cfg,
                               len(rows), float(len(rows)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return torch.softmax(z.detach(), 0)


def grpo_bandit(cfg: GRPOConfig, iterations: int, groups: int = 64, lr: float = 0.05, seed=0):
    """GRPO's updates on the bandit (`groups` groups of cfg.group_size answers an iteration); softmax(z)."""
    gen = torch.Generator().manual_seed(seed)
    z = Z0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([z], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    ref_all = torch.log_softmax(Z0, 0)
    n = groups * cfg.group_size
    mask = torch.ones(n, 1, dtype=torch.bool)
    for _ in range(iterations):
        with torch.no_grad():
            y = torch.multinomial(torch.softmax(z, 0), n, replacement=True, generator=gen)  # group g: rows g*K..
            old = torch.log_softmax(z, 0)[y][:, None]
            adv = rl_math.group_advantages(REWARDS[y].view(groups, cfg.group_size), cfg.scale_std).flatten()
        order = torch.randperm(groups, generator=gen)  # whole groups into mini-batches, as the trainer does
        per_mb = cfg.minibatch_size // cfg.group_size
        for j in range(0, groups, per_mb):
            rows = (order[j : j + per_mb, None] * cfg.group_size + torch.arange(cfg.group_size)).flatten()
            logp = torch.log_softmax(z, 0)[y[rows]][:, None]
            ref = ref_all[y[rows]][:, None] if cfg.beta > 0 else None
            loss, _ = grpo_loss(logp, old[rows], ref, adv[rows], mask[rows], cfg, len(rows), float(len(rows)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return torch.softmax(z.detach(), 0)
