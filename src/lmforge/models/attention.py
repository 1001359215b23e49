"""Attention kernels, masks and the cache protocol.

Notation: B batch, H query heads, Hkv key/value heads (GQA: H = n_rep * Hkv), Tq query positions,
Tk key positions, D head dim, W sliding window.

The mask rule, in one place. Query at position i may attend to the key at position j when

    j <= i                      (causal)
    i - W < j                   (sliding window, if any: W keys including itself, as in Hugging Face and vLLM)
    doc(i) == doc(j)            (document masking in packed training sequences, if asked)

Worked example, W = 3: query 5 sees keys 3, 4, 5; query 1 sees keys 0, 1 (min(i + 1, W) keys).

Three implementations compute the same function (tests/models/test_attention.py checks that they agree):
`reference_attention` (explicit scores and softmax, the readable one), `sdpa_attention`
(`F.scaled_dot_product_attention`, flash kernels on CUDA when no mask is needed) and `flex_attention_causal`
(FlexAttention with a block-sparse mask, the fast sliding-window / document path on CUDA; it is compiled and
has no CPU backward, so the CPU uses SDPA with an explicit mask instead).
"""

from __future__ import annotations

import functools
import math
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

Backend = Literal["auto", "reference", "sdpa", "flex"]


class KVCache(Protocol):
    """What the model asks of a cache; the inference code provides contiguous, rolling and paged ones.

    The model computes q, k, v for the new tokens (rotary already applied at their positions) and hands them
    to `attend`. The cache stores k and v wherever its layout says (slot `pos` of a contiguous buffer, slot
    `pos mod W` of a rolling buffer, a block of a paged pool addressed through a slot mapping) and returns
    attention of q over everything the new tokens may see. The cache knows the positions of this step (its
    owner sets them before the forward call); the model never does index arithmetic on cache slots.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tq, D); returns (B, H, Tq, D). A packed variable-length batch uses
    B = 1 and Tq = the total number of new tokens of all sequences.
    """

    def attend(self, layer_id: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


def allowed_mask(
    q_pos: Tensor,
    k_pos: Tensor,
    window: int | None,
    q_doc: Tensor | None = None,
    k_doc: Tensor | None = None,
) -> Tensor:
    """Boolean (..., Tq, Tk) mask, True where a query may attend to a key (the rule in the module docstring).

    q_pos: (..., Tq), k_pos: (..., Tk) integer positions; negative key positions mark empty cache slots and
    are never attended. q_doc / k_doc: optional document ids of the same shapes.
    """
    i = q_pos.unsqueeze(-1)  # (..., Tq, 1)
    j = k_pos.unsqueeze(-2)  # (..., 1, Tk)
    mask = (j <= i) & (j >= 0)
    if window is not None:
        mask = mask & (i - j < window)
    if q_doc is not None and k_doc is not None:
        mask = mask & (q_doc.unsqueeze(-1) == k_doc.unsqueeze(-2))
    return mask


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D): each kv head serves n_rep consecutive query heads."""
    if n_rep == 1:
        return x
    B, Hkv, T, D = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, T, D).reshape(B, Hkv * n_rep, T, D)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D) + mask) v, written out. mask: bool, broadcastable to (B, H, Tq, Tk).

    A query row with no allowed key (only possible with empty cache slots) returns zeros, not NaN.
    """
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, Tk, D)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ v.float()).to(q.dtype)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """PyTorch's fused attention; `mask` as in `reference_attention`, or `is_causal` for plain causal."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _causal_block_mask(T: int, window: int | None, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


def flex_attention_causal(q: Tensor, k: Tensor, v: Tensor, window: int | None, document_ids: Tensor | None) -> Tensor:
    """Causal (+ window, + document) attention through FlexAttention's block-sparse kernel.

    Blocks wholly outside the window are skipped, so the cost grows as T * W instead of T^2 / 2.
    The block mask is cached per (T, W, device) when there are no document ids.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    T = q.shape[2]
    if document_ids is None:
        block_mask = _causal_block_mask(T, window, str(q.device))
    else:
        docs = document_ids

        def mask_mod(b, h, q_idx, kv_idx):
            keep = (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])
            if window is not None:
                keep = keep & (q_idx - kv_idx < window)
            return keep

        block_mask = create_block_mask(mask_mod, B=q.shape[0], H=None, Q_LEN=T, KV_LEN=T, device=q.device)
    return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=True)


def causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int | None = None,
    document_ids: Tensor | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Self-attention of a whole sequence (no cache): q (B, H, T, D), k, v (B, Hkv, T, D) -> (B, H, T, D).

    backend "auto": SDPA's causal kernel when no mask beyond causal is needed; FlexAttention for a window or
    document mask on CUDA; SDPA with an explicit mask on the CPU.
    """
    if backend == "auto":
        needs_mask = window is not None or document_ids is not None
        backend = "flex" if needs_mask and q.is_cuda else "sdpa"
    if backend == "flex":
        return flex_attention_causal(q, k, v, window, document_ids)
    if backend == "sdpa" and window is None and document_ids is None:
        return sdpa_attention(q, k, v, is_causal=True)
    T = q.shape[2]
    pos = torch.arange(T, device=q.device)
    docs = document_ids[:, None] if document_ids is not None else None  # (B, 1, T)
    mask = allowed_mask(pos, pos, window, docs, docs)  # (T, T) or (B, 1, T, T)
    if backend == "reference":
        return reference_attention(q, k, v, mask)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, mask=mask)
    raise ValueError(f"unknown attention backend {backend!r}; choose auto, reference, sdpa or flex")
