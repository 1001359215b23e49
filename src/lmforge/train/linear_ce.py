"""Fused output projection + cross-entropy whose gradients are computed during the forward pass.

Notation: N token positions, d model width, V vocabulary, c rows per chunk; `h` (N, d) final hidden states,
`W` (V, d) the output projection, `t` (N,) targets with IGNORE_INDEX where no loss is taken.

    loss      = sum_n [t_n valid] * (logsumexp(h_n W^T) - (h_n W^T)[t_n])
    dloss/dz  = softmax(z) - onehot(t)      for z = h W^T, zero on ignored rows
    dloss/dh  = dz W,   dloss/dW = dz^T h

`losses.chunked_cross_entropy` (the readable reference) recomputes each chunk's logits in the backward pass;
this version computes dloss/dh and dloss/dW chunk by chunk while the logits are at hand, stores only those
(the size of h and W), and the backward pass merely scales them by the upstream gradient (a scalar). So the
(N, V) logits never exist whole and are never recomputed: one matrix product fewer per chunk, and the
softmax, one-hot subtraction and casts run as one compiled elementwise kernel per chunk on CUDA.

NOTE: valid only because the loss is a scalar at the end of the graph: its upstream gradient is a number.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

IGNORE_INDEX = -100


def _loss_and_grad(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """logits (c, V) in the compute dtype, targets (c,) -> (summed loss fp32, dloss/dlogits in logits' dtype)."""
    z = logits.float()
    valid = targets != IGNORE_INDEX
    safe_t = torch.where(valid, targets, 0)
    lse = torch.logsumexp(z, dim=-1)  # (c,)
    target_logit = z.gather(1, safe_t[:, None]).squeeze(1)
    loss = torch.where(valid, lse - target_logit, 0.0).sum()
    grad = torch.exp(z - lse[:, None])  # softmax, (c, V)
    grad = grad - torch.nn.functional.one_hot(safe_t, z.shape[-1]).to(grad.dtype)
    grad = grad * valid[:, None]
    return loss, grad.to(logits.dtype)


@functools.cache
def _compiled_loss_and_grad():
    return torch.compile(_loss_and_grad, dynamic=False)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, dtype: torch.dtype) -> Tensor:
        h, w = hidden.to(dtype), weight.to(dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = _compiled_loss_and_grad() if hidden.is_cuda else _loss_and_grad
        for start in range(0, h.shape[0], chunk):
            hc, tc = h[start : start + chunk], targets[start : start + chunk]
            chunk_loss, dz = step(hc @ w.T, tc)  # dz: (c, V)
            loss += chunk_loss
            grad_h[start : start + chunk] = dz @ w
            grad_w += (dz.T @ hc).float()  # (V, d), accumulated in fp32 over chunks
        ctx.save_for_backward(grad_h.to(hidden.dtype), grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, chunk: int = 4096) -> Tensor:
    """Summed next-token cross-entropy of `hidden @ weight.T` over masked positions (fp32 scalar).

    Same inputs and value as `losses.chunked_cross_entropy` (tests/train/test_linear_ce.py): hidden (B, T, d),
    weight (V, d), targets (B, T) int64, mask (B, T) bool. Under autocast the products run in the autocast
    dtype, as they would in `F.linear`.
    """
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    d = hidden.shape[-1]
    t = torch.where(mask.reshape(-1), targets.reshape(-1), IGNORE_INDEX)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden.reshape(-1, d), weight, t, chunk, dtype)
