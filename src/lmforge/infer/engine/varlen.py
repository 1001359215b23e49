"""Variable-length attention for a packed engine step: one kernel call per layer, whatever the step holds.

Notation as in paged_attention.py: S sequences in the step, sequence s computes n_s new tokens at positions
start_s .. e_s - 1 (e_s = start_s + n_s) and reads its K_s = e_s - lo_s keys at positions lo_s .. e_s - 1
(lo_s = max(0, start_s - W + 1) with a window W, else 0). The step is laid out flat:

    queries  (N, H, D)      N = sum n_s, sequence by sequence (the packed order of the model's tokens)
    keys     (Kt, Hkv, D)   Kt = sum K_s, gathered out of the pool at `key_slots` (Kt,)
    cu_q     (S + 1,)       cumulative n_s: sequence s owns queries cu_q[s] .. cu_q[s + 1] - 1
    cu_k     (S + 1,)       cumulative K_s: sequence s owns keys cu_k[s] .. cu_k[s + 1] - 1

Within a sequence the queries are the last n_s of its keys' positions ("bottom-right" alignment): query j
sits at key index K_s - n_s + j and may read key i when i <= K_s - n_s + j (and, with a window, when
K_s - n_s + j - i < W). Pre-fill chunks, chunks that continue a cached prompt and decodes (n_s = 1) all fit
this one form, so a step of 20 pre-fill chunks and 200 decodes is one call per layer rather than one per
chunk (the "padded" path's groups) -- which matters on the GPU, where each call costs host time.

Worked example, block size 4, no window. Sequence 0 decodes position 5 (table [7, 2]); sequence 1 pre-fills
positions 0..2 (table [4]). key_slots = [28 29 30 31 8 9 | 16 17 18], cu_k = [0, 6, 9], cu_q = [0, 1, 4];
the new tokens' slots are the last n_s keys of each sequence: slot_mapping = [9, 16, 17, 18].

On CUDA with bf16 / fp16 the kernel is PyTorch's flash-attention `varlen_attn` (its causal and window masks are
bottom-right aligned, as above); elsewhere `varlen_reference`, a loop over sequences with the explicit mask
(`allowed_mask`), so that the CPU tests check the metadata and the GPU test checks the kernel against it.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lmforge.infer.transfer import to_device
from lmforge.models.attention import allowed_mask, reference_attention


@dataclass
class VarlenArgs:
    key_slots: Tensor  # (Kt,) pool slots of every sequence's keys
    cu_q: Tensor  # (S + 1,) int32
    cu_k: Tensor  # (S + 1,) int32
    max_q: int
    max_k: int


def build_varlen(
    starts: list[int], lengths: list[int], tables: list[list[int]], block_size: int, window: int | None, device
) -> tuple[Tensor, Tensor, VarlenArgs]:
    """(positions (N,), slot_mapping (N,), VarlenArgs) of a step; one host-to-device copy."""
    bs, S = block_size, len(starts)
    start, n = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    lo = np.maximum(0, start - window + 1) if window is not None else np.zeros(S, dtype=np.int64)
    k_len = start + n - lo  # (S,) K_s
    cu_k, cu_q = np.zeros(S + 1, dtype=np.int64), np.zeros(S + 1, dtype=np.int64)
    cu_k[1:], cu_q[1:] = np.cumsum(k_len), np.cumsum(n)
    seq = np.repeat(np.arange(S), k_len)  # (Kt,) sequence of each key
    key_pos = np.arange(cu_k[-1]) - cu_k[:-1][seq] + lo[seq]  # (Kt,) lo_s, lo_s + 1, .., e_s - 1 per sequence
    width = max(max(len(t) for t in tables), int((start + n).max() - 1) // bs + 1)
    table = np.full((S, width), -1, dtype=np.int64)  # (S, blocks), -1: missing or freed
    for s, t in enumerate(tables):
        table[s, : len(t)] = t
    blocks = table[seq, key_pos // bs]
    assert (blocks >= 0).all(), "a key lies in a freed block or has none"
    key_slots = blocks * bs + key_pos % bs  # (Kt,)
    new = key_pos >= start[seq]  # the last n_s keys of each sequence are its new tokens
    host = torch.from_numpy(np.concatenate([key_pos[new], key_slots[new], key_slots, cu_q, cu_k]))
    dev = to_device(host, device)
    N, Kt = int(cu_q[-1]), int(cu_k[-1])
    positions, slot_mapping, slots = dev[:N], dev[N : 2 * N], dev[2 * N : 2 * N + Kt]
    cu = dev[2 * N + Kt :].to(torch.int32)
    args = VarlenArgs(slots, cu[: S + 1], cu[S + 1 :], int(n.max()), int(k_len.max()))
    return positions, slot_mapping, args


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, a: VarlenArgs, window: int | None) -> Tensor:
    """q (N, H, D), k / v (Kt, Hkv, D) -> (N, H, D): flash on CUDA in bf16 / fp16, else the reference loop."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention.varlen import varlen_attn

        # flash's window (left, 0) admits keys i - left .. i: left + 1 of them, so left = W - 1
        size = (window - 1, 0) if window is not None else (-1, 0)
        return varlen_attn(q, k, v, a.cu_q, a.cu_k, a.max_q, a.max_k, window_size=size, **_gqa_kwargs())
    return varlen_reference(q, k, v, a.cu_q.tolist(), a.cu_k.tolist(), window)


@functools.cache
def _gqa_kwargs() -> dict:
    """NOTE: torch 2.13's varlen_attn asks for enable_gqa=True when Hkv < H; torch 2.11's has no such argument
    and its flash kernel takes fewer kv heads as they are."""
    from torch.nn.attention.varlen import varlen_attn

    return {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}


def varlen_reference(q: Tensor, k: Tensor, v: Tensor, cu_q: list[int], cu_k: list[int], window: int | None) -> Tensor:
    """The same function, one sequence at a time with the explicit mask (float32 softmax)."""
    out = torch.empty_like(q)
    for s in range(len(cu_q) - 1):
        qa, qb, ka, kb = cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]
        K, n = kb - ka, qb - qa
        mask = allowed_mask(torch.arange(K - n, K, device=q.device), torch.arange(K, device=q.device), window)
        qs, ks, vs = (x.transpose(0, 1)[None] for x in (q[qa:qb], k[ka:kb], v[ka:kb]))  # (1, heads, len, D)
        out[qa:qb] = reference_attention(qs, ks, vs, mask)[0].transpose(0, 1)
    return out


__all__ = ["VarlenArgs", "build_varlen", "varlen_attention", "varlen_reference"]
