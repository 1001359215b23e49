"""Attention weights read from outside the model: forward hooks on its `Attention` modules.

The model's attention returns outputs, never weights (SDPA and FlexAttention do not form them), and the model
file holds no measurement code. To see where attention goes, as Llama 2's Figure 10 shows for Ghost Attention
(how much the last answer attends to the system instruction), a forward hook on each layer's `Attention`
module receives the module's inputs (x after attention_norm, and the rotary cos / sin) and recomputes the
probabilities of the reference path with the module's own projections:

    q = rot(x Wq^T) (B, H, T, D),   k = rot(x Wk^T) (B, Hkv, T, D),   k repeated to H heads (GQA)
    P = softmax(q k^T / sqrt(D) + mask)   (B, H, Tq, T), for the Tq query rows asked for only

with the mask rule of models/attention.py (causal, and the sliding window if the model has one). The probe
applies to a plain forward: no cache, no document ids, positions 0..T-1 (it refuses anything else). A test
checks that P v through wo gives each module's own output, so the weights are the ones the model used.

Notation: L layers, H query heads, Tq query positions, T tokens; `keys` a (T,) bool mask of the key positions
whose attention mass is summed (e.g. the instruction's tokens).

    attention_mass(model, tokens, queries, keys) -> (L, H, Tq): for each layer, head and query, the share of its
    attention that falls on `keys` (each query's weights sum to 1 over the keys it may see)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmforge.models.attention import allowed_mask, repeat_kv
from lmforge.models.transformer import Attention, apply_rotary


class ProbeError(ValueError):
    """A forward the attention probe cannot read (a cache, document ids)."""


def recompute_probs(module: Attention, x: Tensor, cos: Tensor, sin: Tensor, queries: Tensor) -> Tensor:
    """The attention probabilities of `module` at the query positions `queries` (Tq,), from its inputs
    x (B, T, d), cos / sin (T, D/2) of positions 0..T-1: (B, H, Tq, T) in float32 (module docstring)."""
    B, T, _ = x.shape
    q = module.wq(x).view(B, T, -1, module.head_dim).transpose(1, 2)  # (B, H, T, D)
    k = module.wk(x).view(B, T, -1, module.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
    q, k = apply_rotary(q, cos, sin)[:, :, queries], apply_rotary(k, cos, sin)  # (B, H, Tq, D), (B, Hkv, T, D)
    k = repeat_kv(k, q.shape[1] // k.shape[1])  # (B, H, T, D)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(module.head_dim)  # (B, H, Tq, T)
    pos = torch.arange(T, device=x.device)
    mask = allowed_mask(pos[queries], pos, module.window)  # (Tq, T)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


class AttentionProbe:
    """Hooks on every `Attention` module of `model` that call `reduce(layer_id, probs)` with the probabilities
    (B, H, Tq, T) of the query positions `queries` in each forward; a context manager (hooks removed on exit)."""

    def __init__(self, model: torch.nn.Module, queries: Tensor, reduce):
        self.queries, self.reduce = queries, reduce
        self.modules = [m for m in model.modules() if isinstance(m, Attention)]
        self.handles: list = []

    def _hook(self, module: Attention, args: tuple, output: Tensor) -> None:
        x, cos, sin, cache, document_ids = args
        if cache is not None or document_ids is not None:
            raise ProbeError("the attention probe reads a plain forward (no cache, no document ids)")
        if cos.dim() != 2 or cos.shape[0] != x.shape[1]:
            raise ProbeError("the attention probe needs positions 0..T-1 shared by the batch (positions=None)")
        self.reduce(module.layer_id, recompute_probs(module, x, cos, sin, self.queries))

    def __enter__(self) -> AttentionProbe:
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@torch.no_grad()
def attention_mass(model: torch.nn.Module, tokens: Tensor, queries: Tensor, keys: Tensor) -> Tensor:
    """(L, H, Tq) float32: for each layer, head and query position of `queries` (Tq,), the attention weight
    that falls on the key positions where `keys` (T,) is True, in one forward of `tokens` (1, T).

    Only the reduced masses are kept per layer, never the (H, Tq, T) probabilities of all layers at once.
    """
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ProbeError(f"attention_mass reads one sequence, tokens (1, T); got shape {tuple(tokens.shape)}")
    masses: dict[int, Tensor] = {}

    def reduce(layer_id: int, probs: Tensor) -> None:
        masses[layer_id] = (probs[0] * keys.to(probs.device, probs.dtype)).sum(-1).cpu()  # (H, Tq)

    with AttentionProbe(model, queries.to(tokens.device), reduce):
        model(tokens, return_hidden=True)  # the vocabulary projection is not needed
    return torch.stack([masses[i] for i in sorted(masses)])


__all__ = ["AttentionProbe", "ProbeError", "attention_mass", "recompute_probs"]
