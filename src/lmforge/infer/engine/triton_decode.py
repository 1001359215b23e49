"""Paged decode attention in Triton: one query per row, keys and values read once, straight from the pool.

Notation: G rows (sequences decoding one token each), H query heads, Hkv kv heads, r = H / Hkv query heads per
kv head (GQA), D head dim, K key slots per row (a static bucket, the tail masked), S splits of a row's keys,
N keys per loop iteration (BLOCK_N).

Same function as `paged_attention.gathered_decode_attention` (and the same call), for the static-shape decode
steps (decode_graphs.py, decode_attention="triton"):

    q (G, H, D), kp / vp (slots, Hkv, D) the pool, key_slots (G, K), allowed (G, K) -> out (G, H, D)

At decode time attention reads every live key once per step, so its cost is bytes of keys and values over
memory bandwidth; the aim is to read them at copy bandwidth. One program per (row g, kv head j, split s)
loads the r query heads of kv head j once, then walks keys s * L .. (s + 1) * L - 1 of its row (L = K / S,
rounded up to N) N at a time: it gathers their slots, loads each key's D values of head j (a contiguous
2 D bytes in bf16, from wherever the block manager put it), and keeps a running max m, sum l and weighted sum
acc per query head (online softmax, as flash attention). Masked keys (not allowed, or past the row's live
keys) load nothing. A second, tiny pass combines the S partial results of each (row, head):

    M = max_s m_s      out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s

Splits exist for small batches: G * Hkv programs would not fill the GPU (batch 1 of Llama-2-7B: 32), so each
row's keys are cut into S pieces so that G * Hkv * S is at least `TARGET_PROGRAMS`. Worked example, G = 1,
Hkv = 32, K = 512, N = 32: S = ceil(264 / 32) = 9, capped at K / N = 16, so 9; L = ceil(512 / 9) = 57 -> 64
(a multiple of N), and split 8 covers keys 512 .. 575, all past K: it finds no key, ends with m = -1e30, l = 0,
and weighs nothing in the combination.

NOTE: running maxima start at -1e30, not -inf: an iteration whose keys are all masked then gives
exp(-inf - (-1e30)) = 0 instead of exp(-inf + inf) = nan.
On the CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported),
which the tests use; the choice between this kernel and the compiled "fused" one is made by measurement on the
GPU (benchmarks/decode.py part e).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

TARGET_PROGRAMS = 264  # about two programs per SM of an H100 / H200 (132 SMs)
BLOCK_N = 32


_jit = None  # the kernel, once built (`kernel()`)


def kernel():
    """The Triton kernel, built once (Triton is imported here). NOTE: call it before compiling a step that
    uses `paged_decode_attention`, so that the traced code finds the kernel in a plain global."""
    global _jit
    if _jit is None:
        _jit = _build()
    return _jit


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode(Q, K, V, SLOTS, ALLOWED, ACC, M, L, scale, n_keys, split_len,
                     sq_g, sq_h, sk_slot, sk_h, ss_g, sa_g, so_g, so_h, so_s,
                     R: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
        g, j, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        r, d = tl.arange(0, R_PAD), tl.arange(0, D)
        heads = j * R + r  # the query heads of kv head j
        q = tl.load(Q + g * sq_g + heads[:, None] * sq_h + d[None, :], mask=(r < R)[:, None], other=0.0)
        # NOTE: .to after the product: under torch.compile `scale` arrives as a float64 scalar, which would make
        # the loop's running max float64 (Triton refuses a loop-carried variable that changes type)
        q = (q.to(tl.float32) * scale).to(tl.float32)  # (R_PAD, D)
        m = tl.full((R_PAD,), -1e30, tl.float32)
        l = tl.zeros((R_PAD,), tl.float32)
        acc = tl.zeros((R_PAD, D), tl.float32)
        start = s * split_len
        end = tl.minimum(start + split_len, n_keys)
        for n0 in range(start, end, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            live = n < end
            slot = tl.load(SLOTS + g * ss_g + n, mask=live, other=0)
            ok = (tl.load(ALLOWED + g * sa_g + n, mask=live, other=0) != 0) & live  # (BLOCK,)
            offsets = slot[:, None] * sk_slot + j * sk_h + d[None, :]  # (BLOCK, D)
            k = tl.load(K + offsets, mask=ok[:, None], other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (R_PAD, BLOCK)
            scores = tl.where(ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])  # (R_PAD, BLOCK), 0 where masked
            v = tl.load(V + offsets, mask=ok[:, None], other=0.0).to(tl.float32)  # (BLOCK, D)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
        out = g * so_g + heads * so_h + s * so_s  # (R_PAD,) offsets of (g, head, s) in M and L
        live_heads = r < R
        tl.store(M + out, m, mask=live_heads)
        tl.store(L + out, l, mask=live_heads)
        tl.store(ACC + out[:, None] * D + d[None, :], acc, mask=live_heads[:, None])

    return paged_decode


def num_splits(rows: int, kv_heads: int, keys: int) -> int:
    """S: enough splits that rows * kv_heads * S reaches TARGET_PROGRAMS, at most one per BLOCK_N keys."""
    return max(1, min(-(-TARGET_PROGRAMS // (rows * kv_heads)), -(-keys // BLOCK_N)))


def paged_decode_attention(q: Tensor, kp: Tensor, vp: Tensor, key_slots: Tensor, allowed: Tensor,
                           splits: int | None = None) -> Tensor:
    """q (G, H, D), kp / vp (slots, Hkv, D), key_slots (G, K), allowed (G, K) bool (each row at least one key)
    -> (G, H, D) in q's dtype. Query head h reads kv head h // r (module docstring); splits: S (default
    `num_splits`)."""
    G, H, D = q.shape
    Hkv, K = kp.shape[1], key_slots.shape[1]
    R = H // Hkv
    S = splits or num_splits(G, Hkv, K)
    split_len = -(-K // S)  # ceil(K / S) keys per split,
    split_len = -(-split_len // BLOCK_N) * BLOCK_N  # rounded up to a multiple of BLOCK_N
    assert D & (D - 1) == 0 and kp.stride(2) == 1 and q.stride(2) == 1, "head dim a power of two, contiguous"
    acc = torch.empty(G, H, S, D, device=q.device, dtype=torch.float32)
    m = torch.empty(G, H, S, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    slots, ok = key_slots.contiguous(), allowed.to(torch.int8).contiguous()
    (_jit if _jit is not None else kernel())[(G, Hkv, S)](
        q, kp, vp, slots, ok, acc, m, l, D**-0.5, K, split_len,
        q.stride(0), q.stride(1), kp.stride(0), kp.stride(1), slots.stride(0), ok.stride(0),
        m.stride(0), m.stride(1), m.stride(2),
        R=R, R_PAD=max(1, 1 << (R - 1).bit_length()), D=D, BLOCK=BLOCK_N,
    )
    weight = torch.exp(m - m.amax(dim=2, keepdim=True))  # (G, H, S)
    out = (acc * weight[..., None]).sum(2) / (l * weight).sum(2)[..., None]  # (G, H, D)
    return out.to(q.dtype)


def available() -> bool:
    """Whether Triton can be imported (it is on CUDA machines; on the CPU only under its interpreter)."""
    return importlib.util.find_spec("triton") is not None


__all__ = ["BLOCK_N", "TARGET_PROGRAMS", "available", "kernel", "num_splits", "paged_decode_attention"]

