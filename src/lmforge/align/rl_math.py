"""The mathematics of PPO and GRPO as small pure functions (tensors in, tensors out), each tested by hand.

Notation: B rollouts (sequences) in a batch, T response positions per row (right-padded), `mask` (B, T) True
on the real response tokens; for GRPO G prompts with K samples each (B = G * K). logp, old_logp, ref_logp
(B, T): log-probabilities of the sampled tokens under the policy being trained, the policy that sampled them
and the frozen reference (each log_softmax(logits / temperature) of the trainer's own forward pass).

What comes from the papers:

- Llama 2's reward (section 3.2.3): Rc = Rs if the prompt is tagged safety-relevant or Rs < 0.15, else Rh,
  where Rs, Rh are the sigmoid scores of the Safety and Helpfulness reward models; R~c = whiten(logit(Rc));
  R = R~c - beta * KL(pi || pi_0). A reward model's raw output r is the logit of its sigmoid score, so
  logit(Rc) is the chosen model's raw output and `gated_score` works on raw outputs (no sigmoid that could
  saturate to exactly 0 or 1 in floating point); "Rs < 0.15" is "r_s < logit(0.15) = -1.7346".
- PPO's clipped surrogate (Schulman et al. 2017, eq. 7): L = -min(rho A, clip(rho, 1 - eps, 1 + eps) A) with
  rho = exp(logp - old_logp).
- GAE (Schulman et al. 2016, eq. 16): delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_l (gamma lambda)^l
  delta_{t+l}, and the value targets (returns) R_t = A_t + V_t.
- GRPO (DeepSeekMath, Shao et al. 2024, eq. 3-4): the advantage of sample i of a group is its reward minus the
  group's mean, divided by the group's standard deviation; no critic; the KL to the reference is a term of
  the loss, estimated per token by k3 = pi_ref / pi - log(pi_ref / pi) - 1.

lmforge's own choices where Llama 2 is silent (each a NOTE at its function, and tested):

- PPO puts the KL in the reward, per token, with the k1 estimator log pi(y_t) - log pi_0(y_t) of the sampled
  token (`token_rewards`); the sequence's score lands on its last response token. As a reward that the
  policy gradient treats as fixed, -beta * k1 makes the expected update the gradient of
  E[R~c] - beta * KL(pi || pi_0), whose optimum is pi_0(y) exp(R~c(y) / beta) / Z (the bandit test checks it).
- GAE with gamma = 1 (the episode is one answer; its reward comes at the end) and lambda = 0.95.
- The value loss is clipped around the rollout's values (PPO2's, `value_loss`), coefficient 0.1.
- Whitening uses the population variance of the whole batch (all ranks); advantages are whitened too.
- GRPO's KL is k3 in the loss (DeepSeekMath's). NOTE: on the policy's own samples the gradient of the k3 term
  is beta (pi - pi_ref) on the logits, the gradient of the *forward* KL(pi_ref || pi), not of KL(pi || pi_ref)
  (`grpo_optimum` gives the optimum this implies; the bandit test checks it).
- GRPO's std scaling is on by default (DeepSeekMath) and can be switched off (Dr. GRPO); a group whose
  rewards are all equal has advantage 0 for every sample either way, so it contributes nothing.
- Loss averaging: "token" (sum over every response token of the mini-batch / their number: long answers
  weigh more) or "sequence" (each answer's mean over its tokens, then the mean over answers: DeepSeekMath's).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

Averaging = Literal["token", "sequence"]
KLEstimator = Literal["k1", "k3"]
SAFETY_THRESHOLD = 0.15  # Llama 2: the Safety RM's sigmoid score below which the gate picks it


# ---- sums and moments, over the batch of every rank ----------------------------------------------------------
def _all_reduce(t: Tensor, group) -> Tensor:
    if group is not False and dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, group=group)
    return t


def masked_sum(x: Tensor, mask: Tensor | None = None) -> Tensor:
    return x.sum() if mask is None else (x * mask).sum()


def moments(x: Tensor, mask: Tensor | None = None, group=False) -> tuple[Tensor, Tensor]:
    """Mean and population variance of the entries of `x` where `mask` (all of them without one).

    group: False for this process's entries only; None or a process group for the entries of every rank of
    it (two all-reduces: the mean first, then the squared deviations from it, so no precision is lost to
    sum-of-squares cancellation). Worked example, x = [1, 2, 3, 4]: mean 2.5, variance (2.25 + 0.25 + 0.25 +
    2.25) / 4 = 1.25.
    """
    mask_f = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    stats = _all_reduce(torch.stack([(x * mask_f).sum(), mask_f.sum()]), group)
    mean = stats[0] / stats[1].clamp(min=1)
    sq = _all_reduce(((x - mean) ** 2 * mask_f).sum(), group)
    return mean, sq / stats[1].clamp(min=1)


def whiten(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8, group=False) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the entries where `mask` (`moments`, `group` as there); with
    shift_mean=False, mean + (x - mean) / sqrt(var + eps): the spread normalised, the mean kept. Entries
    outside the mask are returned as 0. Worked example, x = [1, 2, 3, 4]: mean 2.5, var 1.25, whiten(x) =
    [-1.3416, -0.4472, 0.4472, 1.3416]; with shift_mean=False [1.1584, 2.0528, 2.9472, 3.8416].
    """
    mean, var = moments(x, mask, group)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out if mask is None else out * mask


def masked_mean(x: Tensor, mask: Tensor | None = None, group=False) -> Tensor:
    return moments(x, mask, group)[0]


# ---- Llama 2's gated reward ------------------------------------------------------------------------------------
def logit(p: Tensor, eps: float = 1e-6) -> Tensor:
    """log(p / (1 - p)), p clamped into [eps, 1 - eps]: a score in [0, 1] as a reward model's raw output."""
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def gated_score(safety_raw: Tensor, helpful_raw: Tensor, safety_tagged: Tensor,
                threshold: float = SAFETY_THRESHOLD) -> tuple[Tensor, Tensor]:
    """Llama 2's gate on raw reward-model outputs (B,): (logit(Rc), True where the Safety RM was chosen).

    Rc = Rs if the prompt is safety-tagged or Rs = sigmoid(r_s) < threshold, else Rh; logit(Rc) is then r_s
    or r_h itself. Worked example, threshold 0.15 (logit -1.7346): (r_s, r_h, tagged) = (2.0, 0.5, True) ->
    2.0 (tagged); (-2.0, 0.5, False) -> -2.0 (sigmoid(-2) = 0.119 < 0.15); (-1.0, 0.5, False) -> 0.5
    (sigmoid(-1) = 0.269).
    """
    use_safety = safety_tagged.bool() | (safety_raw < math.log(threshold / (1 - threshold)))
    return torch.where(use_safety, safety_raw, helpful_raw), use_safety


# ---- KL estimators and per-token rewards -----------------------------------------------------------------------
def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probabilities (Schulman's k1 / k3).

    k1 = log pi - log pi_ref (unbiased, can be negative); k3 = u - log u - 1 with u = pi_ref / pi (unbiased,
    never negative, lower variance near pi = pi_ref). Worked example, logp = log 0.5, ref_logp = log 0.25:
    k1 = log 2 = 0.6931; u = 0.5, k3 = 0.5 + 0.6931 - 1 = 0.1931.
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_u = ref_logp - logp
        return torch.exp(log_u) - log_u - 1
    raise ValueError(f"unknown KL estimator {estimator!r}: k1 or k3")


def last_positions(mask: Tensor) -> Tensor:
    """(B,) index of each row's last real response token (rows are right-padded: mask = t < length)."""
    return (mask.sum(-1) - 1).clamp(min=0)


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token rewards (B, T) of PPO: -beta * kl on every response token, plus the sequence's score (B,) on its
    last one; 0 on padding.

    NOTE (lmforge's choice, Llama 2 gives only R = R~c - beta KL): the KL goes in per token so that GAE assigns
    each token its own share, and the score lands on the last token, where the answer is complete. Worked
    example, scores [1.0], kl [[0.1, -0.2, 0.3]], mask all True, beta 0.5: [[-0.05, 0.1, 1.0 - 0.15]].
    """
    rewards = -beta * kl * mask
    return rewards.scatter_add(1, last_positions(mask)[:, None], scores[:, None].to(rewards.dtype))


# ---- GAE ----------------------------------------------------------------------------------------------------
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and value targets (B, T) of right-padded rows.

    values[:, t] = V(s_t), the critic's value of the state before response token t. After a row's last token
    the episode ends: V = 0 there (values and rewards are zeroed outside the mask, so the recursion carries
    only zeros past the end). Backwards over t:
        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lambda A_{t+1},   R_t = A_t + V_t
    Worked example, one row, r = [0, 0, 1], V = [0.5, 0.6, 0.7], gamma 0.9, lambda 0.8:
        delta = [0 + 0.54 - 0.5, 0 + 0.63 - 0.6, 1 + 0 - 0.7] = [0.04, 0.03, 0.3]
        A_2 = 0.3, A_1 = 0.03 + 0.72 * 0.3 = 0.246, A_0 = 0.04 + 0.72 * 0.246 = 0.21712
        R = [0.71712, 0.846, 1.0]
    """
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * m


# ---- losses ---------------------------------------------------------------------------------------------------
def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate per token: (loss (B, T), clipped (B, T) bool, ratio (B, T)).

    loss = -min(rho A, clip(rho, 1 - eps, 1 + eps) A) = max(-rho A, -clip(rho) A); `clipped` marks the tokens
    where the clipped term is the one taken (their gradient is zero). Worked example, eps 0.2: rho 1.5, A = 1
    -> loss -1.2 (clipped); rho 1.5, A = -1 -> loss 1.5 (not clipped: a worse ratio is never clipped away);
    rho 0.5, A = 1 -> -0.5; rho 0.5, A = -1 -> 0.8 (clipped).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped_loss = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped_loss), clipped_loss > unclipped, ratio


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None) -> Tensor:
    """The critic's loss per token (B, T): 0.5 (V - R)^2, or with `clip` PPO2's pessimistic clipped form
    0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2).

    NOTE (lmforge's choice): clipped, as in PPO2 and OpenAI's lm-human-preferences, so that one mini-batch
    cannot move a value far from the rollout's. Worked example, c = 0.2, V_old 0, R 1: V = 0.5 -> 0.5 *
    max(0.25, 0.64) = 0.32; V = 0.1 -> 0.5 * max(0.81, 0.81) = 0.405.
    """
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped
    near = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum(unclipped, (near - returns) ** 2)


def reduce_tokens(per_token: Tensor, mask: Tensor, averaging: Averaging, n_sequences: float | Tensor | None = None,
                  n_tokens: float | Tensor | None = None) -> Tensor:
    """A per-token loss (B, T) as one number: "token": sum over real tokens / n_tokens; "sequence": the sum over
    rows of (row mean over its tokens) / n_sequences.

    n_tokens / n_sequences default to this batch's; a mini-batch split over micro-batches or ranks passes the
    whole mini-batch's counts, so the parts add up to the mini-batch's mean. Worked example, per_token
    [[1, 3, -], [2, -, -]]: token (1 + 3 + 2) / 3 = 2; sequence (2 + 2) / 2 = 2; with [[1, 3, -], [4, -, -]]:
    token 8 / 3, sequence (2 + 4) / 2 = 3.
    """
    m = mask.to(per_token.dtype)
    if averaging == "token":
        return (per_token * m).sum() / (m.sum() if n_tokens is None else n_tokens)
    if averaging == "sequence":
        rows = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1)
        return rows.sum() / (per_token.shape[0] if n_sequences is None else n_sequences)
    raise ValueError(f"unknown loss averaging {averaging!r}: token or sequence")


# ---- GRPO ----------------------------------------------------------------------------------------------------
def group_advantages(rewards: Tensor, scale_std: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's advantages (G, K) of K samples per prompt: r - mean of the group, divided by the group's sample
    standard deviation (+ eps) when `scale_std`.

    A group with equal rewards gets 0 everywhere (with or without scaling), so its samples add nothing to the
    loss but their KL term. Worked example, rewards [[1, 0, 0, 1], [0.5, 0.5, 0.5, 0.5]]: means 0.5, 0.5;
    centred [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]]; the first group's std is sqrt(4 * 0.25 / 3) = 0.5774, so
    scaled [[0.8659, -0.8659, -0.8659, 0.8659], [0, 0, 0, 0]] (eps 1e-4).
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_std:
        return centred
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(centred[:, :1])
    return centred / (std + eps)


def grpo_optimum(pi_ref: Tensor, rewards: Tensor, beta: float, k: int) -> Tensor:
    """The distribution (V,) one-token GRPO converges to with std scaling off and k3 in the loss: the maximiser
    of c E_pi[r] - beta KL(pi_ref || pi) with c = (K - 1) / K.

    Why: the advantage r_i - mean_j r_j of sample i has the expected gradient c grad E_pi[r] (the sample's own
    reward inside the mean takes 1 / K of it), and the k3 term's gradient is that of the forward KL (module
    docstring). On the logits the optimum satisfies c pi(y) (r(y) - m) = beta (pi(y) - pi_ref(y)) with
    m = E_pi[r], i.e. pi(y) = pi_ref(y) / (1 - a (r(y) - m)), a = c / beta. The sum of the right side falls
    from +inf to 0 as m rises from max(r) - 1 / a, so one m makes it 1 (found by bisection, float64), and then
    E_pi[r] = m holds by itself (sum pi (1 - a (r - m)) = sum pi_ref = 1).
    """
    a = (k - 1) / k / beta
    ref, r = pi_ref.double(), rewards.double()

    def total(m: float) -> float:
        return (ref / (1 - a * (r - m))).sum().item()

    lo, hi = r.max().item() - 1 / a, r.max().item() + 1.0
    while total(hi) > 1:
        hi += hi - lo
    for _ in range(200):  # the bracket halves each time: far below float64's resolution long before the end
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) > 1 else (lo, mid)
    return (ref / (1 - a * (r - hi))).to(pi_ref.dtype)


# ---- diagnostics -----------------------------------------------------------------------------------------------
def entropy_of_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension, -sum p log p (fp32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, group=False) -> Tensor:
    """1 - Var[R - V] / Var[R] over the real tokens: 1 is a perfect critic, 0 one that predicts the mean, < 0
    worse than that. Worked example, R = [1, 2, 3], V = [1, 2, 2]: Var[R - V] = Var[0, 0, 1] = 2/9,
    Var[R] = 2/3 -> 1 - 1/3 = 0.6667."""
    var_r = moments(returns, mask, group)[1]
    var_d = moments(returns - values, mask, group)[1]
    return 1 - var_d / var_r.clamp(min=1e-12)


__all__ = ["Averaging", "KLEstimator", "SAFETY_THRESHOLD", "clipped_surrogate", "entropy_of_logits",
           "explained_variance", "gae", "gated_score", "group_advantages", "grpo_optimum", "kl_estimate",
           "last_positions", "logit", "masked_mean", "masked_sum", "moments", "reduce_tokens", "token_rewards",
           "value_loss", "whiten"]
