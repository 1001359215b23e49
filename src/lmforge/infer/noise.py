"""Counter-based random numbers for sampling: noise that is a pure function of (seed, counter, token id).

Notation: B rows, V vocabulary; row b has a 63-bit `seed` and a `counter` c_b (how many tokens the request
has sampled before this one).

Sampling draws V exponential variates E_v per row and step (sampling.py). A `torch.Generator` per row cannot
live inside a compiled graph or a CUDA graph, and its state would have to follow a request through batches,
preemptions and forks. Here the variate is computed from where it is used instead:

    key_b   = mix(mix(mix(seed_lo) ^ seed_hi) ^ c_b)                 (B,)    32-bit key of (seed, counter)
    h_bv    = mix(key_b ^ mix(v ^ 0x9E3779B9))                       (B, V)  32-bit hash, uniform
    u_bv    = ((h_bv >> 8) + 1/2) / 2^24                             in (0, 1), 24 bits (a float32's mantissa)
    log E   = log(-log u)                                            E ~ Exp(1)

`mix` is Chris Wellons' "lowbias32" integer hash (two multiply-xorshift rounds, a bijection of 32-bit values
with strong avalanche). Everything is int64 tensor arithmetic on values below 2^49 (a 32-bit product is split
into 16-bit halves, `_mul32`), so there is no overflow, and eager, compiled and captured code compute the same
u. The same (seed, counter) gives the same noise in any batch and at any row (the two logarithms may round
differently in their last bit on another device or in another kernel).
"""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32): x * c_lo + (x * c_hi mod 2^16) << 16, every term below 2^49."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def mix32(x: Tensor) -> Tensor:
    """lowbias32: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16 (mod 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_log_exponential(seeds: Tensor, counters: Tensor, vocab_size: int) -> Tensor:
    """log E (B, V) float32 for i.i.d. E ~ Exp(1), a function of seeds (B,), counters (B,) (int64) and v."""
    key = mix32(mix32(mix32(seeds & _M32) ^ ((seeds >> 32) & _M32)) ^ (counters & _M32))  # (B,)
    token = mix32(torch.arange(vocab_size, device=seeds.device) ^ 0x9E3779B9)  # (V,)
    h = mix32(key[:, None] ^ token[None, :])  # (B, V)
    u = ((h >> 8).float() + 0.5) * 2.0**-24
    return (-u.log()).log()


__all__ = ["counter_log_exponential", "mix32"]
