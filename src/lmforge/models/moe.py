"""Sparse mixture of experts with learned top-k routing (Mixtral; Gemini 1.5), dropless.

Notation: N tokens (B * T flattened), d model width, f expert hidden width, E experts, k experts per token.

    logits = x W_g                          (N, E)   router, no bias
    top_logits, top_idx = topk(logits, k)   (N, k)
    weights = softmax(top_logits)           (N, k)   softmax over the k selected logits only
    y_n = sum_j weights[n, j] * SwiGLU_{top_idx[n, j]}(x_n)

Experts are stored stacked, `w1`, `w3`: (E, f, d) and `w2`: (E, d, f), so that one grouped matrix product
serves all experts; expert e's weights are exactly a dense `FeedForward`'s `w1.weight`, `w2.weight`,
`w3.weight` (Meta / Mistral per-expert checkpoints stack into these without any transpose).

Three implementations compute the same function (tests/models/test_moe.py): `experts_loop`, one expert at a
time (readable; data-dependent shapes); `experts_grouped`, tokens sorted by expert and three
`torch._grouped_mm` calls with group offsets computed on the device (no host sync, compiles to static
shapes), for training and pre-fill; and `experts_gathered`, which gathers each token's k experts' weights,
for decoding a few tokens (static shapes, capturable in a CUDA graph, reads only the chosen experts).
No token is ever dropped for capacity.

Training losses (Switch Transformer's load balance, ST-MoE's router z-loss), returned from every call, never
kept in global state:

    load_balance = E * sum_e f_e * P_e     f_e: share of the N * k assignments that go to e (sums to 1)
                                           P_e: mean router probability of e over the N tokens
    z_loss       = mean_n logsumexp(logits_n)^2

NOTE: Hugging Face's Mixtral lets f_e sum to k, which makes its load-balance term k times ours; with
k = 2 our `aux_loss_coef` 0.02 therefore weighs the same as 0.01 there.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.models.config import MoEConfig

ExpertsImpl = Literal["auto", "grouped", "loop", "gathered"]


class RouterLosses(NamedTuple):
    """Auxiliary router losses of one forward pass, already multiplied by their coefficients."""

    load_balance: Tensor  # scalar
    z_loss: Tensor  # scalar

    @property
    def total(self) -> Tensor:
        return self.load_balance + self.z_loss


def router_losses(logits: Tensor, top_idx: Tensor, cfg: MoEConfig) -> RouterLosses:
    """logits: (N, E) router logits; top_idx: (N, k) chosen experts. See the module docstring."""
    N, E = logits.shape
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)  # (N, E)
    # Assignment counts through scatter_add: bincount would sync with the host to size its output.
    counts = torch.zeros(E, device=logits.device).scatter_add_(
        0, top_idx.reshape(-1), torch.ones(top_idx.numel(), device=logits.device)
    )
    f = counts / top_idx.numel()  # (E,), sums to 1
    P = probs.mean(dim=0)  # (E,)
    load_balance = cfg.aux_loss_coef * E * (f * P).sum()
    z_loss = cfg.z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean()
    return RouterLosses(load_balance, z_loss)


def experts_loop(x: Tensor, top_idx: Tensor, weights: Tensor, w1: Tensor, w2: Tensor, w3: Tensor) -> Tensor:
    """Reference: for each expert, gather its tokens, run its SwiGLU, scatter back weighted.

    x: (N, d); top_idx, weights: (N, k); w1, w3: (E, f, d); w2: (E, d, f) -> (N, d)
    """
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, slot = torch.where(top_idx == e)  # which tokens chose e, and in which of their k slots
        if token.numel() == 0:
            continue
        xe = x[token]  # (n_e, d)
        he = F.silu(xe @ w1[e].T) * (xe @ w3[e].T)  # (n_e, f)
        y.index_add_(0, token, (he @ w2[e].T) * weights[token, slot, None])
    return y


def experts_grouped(x: Tensor, top_idx: Tensor, weights: Tensor, w1: Tensor, w2: Tensor, w3: Tensor) -> Tensor:
    """Dropless grouped-GEMM path; same inputs and output as `experts_loop`.

    Worked example, N = 3 tokens, k = 2, E = 3, top_idx = [[2, 0], [0, 1], [2, 1]]:
      flat expert ids     [2, 0, 0, 1, 2, 1]     (assignment a = n * k + j)
      order (stable sort) [1, 2, 3, 5, 0, 4]     -> experts [0, 0, 1, 1, 2, 2]
      token of each row   order // k = [0, 1, 1, 2, 0, 2]
      counts per expert   [2, 2, 2]  -> offs = cumsum = [2, 4, 6]  (end row of each expert's group)
    Rows [0, 2) go through expert 0, [2, 4) expert 1, [4, 6) expert 2; results are weighted and summed
    back into their tokens with index_add.
    """
    N, k = top_idx.shape
    E = w1.shape[0]
    flat_idx = top_idx.reshape(-1)  # (N * k,)
    order = torch.argsort(flat_idx, stable=True)  # assignments grouped by expert
    token = order // k  # (N * k,) source token of each sorted row
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat_idx, torch.ones_like(flat_idx, dtype=torch.int32)
    )
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)  # (E,)
    xs = x[token]  # (N * k, d)
    h = F.silu(torch._grouped_mm(xs, w1.transpose(-2, -1), offs=offs)) * torch._grouped_mm(
        xs, w3.transpose(-2, -1), offs=offs
    )  # (N * k, f)
    out = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)  # (N * k, d)
    out = out * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))


def experts_gathered(x: Tensor, top_idx: Tensor, weights: Tensor, w1: Tensor, w2: Tensor, w3: Tensor) -> Tensor:
    """Per-token gather of the chosen experts' weights; same inputs and output as `experts_loop`.

    Reads N * k expert weight sets, so it pays off only while N * k <= E (decoding); the gathered copies are
    (N, k, f, d) each.
    """
    x1, x3 = torch.einsum("nd,nkfd->nkf", x, w1[top_idx]), torch.einsum("nd,nkfd->nkf", x, w3[top_idx])
    out = torch.einsum("nkf,nkdf->nkd", F.silu(x1) * x3, w2[top_idx])  # (N, k, d)
    return (out * weights[..., None]).sum(dim=1)


class MoE(nn.Module):
    """Router `gate` plus E SwiGLU experts; forward returns (output, RouterLosses)."""

    def __init__(self, dim: int, ffn_dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(cfg.num_experts, ffn_dim, dim))
        self.w2 = nn.Parameter(torch.empty(cfg.num_experts, dim, ffn_dim))
        self.w3 = nn.Parameter(torch.empty(cfg.num_experts, ffn_dim, dim))
        # "auto": gathered while N * k <= E (a decode step; a Python decision on shapes, so it compiles),
        # else grouped (see forward).
        self.impl: ExpertsImpl = "auto"

    def forward(self, x: Tensor) -> tuple[Tensor, RouterLosses]:
        B, T, d = x.shape
        x = x.reshape(B * T, d)  # (N, d)
        logits = self.gate(x)  # (N, E)
        top_logits, top_idx = torch.topk(logits, self.cfg.top_k, dim=-1)  # (N, k)
        weights = torch.softmax(top_logits.float(), dim=-1).to(x.dtype)  # (N, k)
        impl = self.impl
        if impl == "auto":
            # NOTE: torch._grouped_mm runs natively on CUDA in bf16 only; other dtypes take a fallback that
            # copies the offsets to the host, which a CUDA graph cannot capture.
            native_grouped = not x.is_cuda or x.dtype == torch.bfloat16
            few_tokens = x.shape[0] * self.cfg.top_k <= self.cfg.num_experts
            impl = "gathered" if few_tokens or not native_grouped else "grouped"
        experts = {"grouped": experts_grouped, "loop": experts_loop, "gathered": experts_gathered}[impl]
        y = experts(x, top_idx, weights, self.w1, self.w2, self.w3)
        return y.reshape(B, T, d), router_losses(logits, top_idx, self.cfg)
