"""Fused projections for decoding: one (q | k | v) product and one (w1 | w3) product per layer.

Notation: d model width, H / Hkv query / key-value heads, D head dim, f feed-forward width.

A decode step at small batch reads every weight once per token, and each matrix product is a kernel launch
with its own tail; three products of the same input (wq, wk, wv: (H D, d), (Hkv D, d), (Hkv D, d)) cost more
than one of their concatenation ((H + 2 Hkv) D, d), and so do w1, w3 ((f, d) each, one (2 f, d)). So

    Attention.wqkv = [wq; wk; wv]      ((H + 2 Hkv) D, d)    q | k | v = x wqkv^T, split along the output
    FeedForward.w13 = [w1; w3]         (2 f, d)              gate | up = x w13^T, chunked in two

The fused tensor holds the only copy of these weights: `wq.weight`, `wk.weight`, `wv.weight` (and `w1`, `w3`)
become views of its rows, so parameter names, `state_dict()`, the checkpoint format and in-place updates by
name (`LLMEngine.load_weights`, `load_state_dict`) are unchanged and reach the fused tensor. Fusing costs no
memory beyond one layer's worth, briefly (the old storage is freed as each layer is fused). The model uses the
fused products only without autograd (`torch.no_grad`, inference mode); with gradients on it computes the
three products of its parameters as before, so training through a fused model is unchanged too.

NOTE: fuse a model where it will stay. `.to()`, `.half()` and the like convert parameters and buffers one by
one, which parts the views from the fused tensor: both then hold the same values, but later in-place updates
of the parameters no longer reach it. Unfuse first. For the same reason safetensors refuses to save a fused
CPU model's `state_dict()` (tensors sharing memory): save a copy or unfuse it (a CUDA model's `.cpu()` copy is
fine). Tensor-parallel models are not fused: their weights are DTensor shards (parallel.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.models.transformer import FeedForward, Transformer


@torch.no_grad()
def fuse_projections(model: Transformer) -> bool:
    """Fuse every layer's (wq, wk, wv) and dense (w1, w3) in place (module docstring); False if the model is
    tensor-parallel (nothing done)."""
    if getattr(model, "tp_degree", 1) > 1:
        return False
    _drop_kept_steps(model)
    for layer in model.layers:
        attention, ffn = layer.attention, layer.feed_forward
        if attention.wqkv is None:
            attention.wqkv = _stack([attention.wq, attention.wk, attention.wv])
        if isinstance(ffn, FeedForward) and ffn.w13 is None:
            ffn.w13 = _stack([ffn.w1, ffn.w3])
    return True


@torch.no_grad()
def unfuse_projections(model: Transformer) -> None:
    """Give every fused parameter its own storage again and drop the fused tensors."""
    _drop_kept_steps(model)
    for layer in model.layers:
        attention, ffn = layer.attention, layer.feed_forward
        if attention.wqkv is not None:
            for linear in (attention.wq, attention.wk, attention.wv):
                linear.weight.data = linear.weight.data.clone()
            attention.wqkv = None
        if isinstance(ffn, FeedForward) and ffn.w13 is not None:
            for linear in (ffn.w1, ffn.w3):
                linear.weight.data = linear.weight.data.clone()
            ffn.w13 = None


def _drop_kept_steps(model: Transformer) -> None:
    """Forget `generate()`'s kept decode step (decode_step.py): its graphs read the parameters where they were."""
    model.__dict__.pop("_lmforge_kept_decode", None)


def is_fused(model: Transformer) -> bool:
    return any(layer.attention.wqkv is not None for layer in model.layers)


def _stack(linears: list[nn.Linear]) -> Tensor:
    """The weights concatenated along the output rows, each linear's weight rebound to its rows of it."""
    fused = torch.cat([linear.weight for linear in linears])  # (sum of output rows, d)
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = fused[start : start + rows]  # the old storage is freed here
        start += rows
    return fused


__all__ = ["fuse_projections", "is_fused", "unfuse_projections"]
