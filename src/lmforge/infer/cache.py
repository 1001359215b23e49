"""KV caches for batched generation: a contiguous cache and Mistral's rolling buffer.

Notation: L layers, B sequences, Hkv key/value heads, D head dim, S slots per sequence, W sliding window,
Tq new tokens per sequence in one forward call (a pre-fill chunk, or 1 when decoding).

Both caches keep, per layer, k and v buffers of shape (B, Hkv, S, D), preallocated once with static shapes,
and one (B, S) tensor `slot_pos` shared by all layers: the position held in each slot, -1 for an empty slot.
The attention mask is always `allowed_mask(q_pos, slot_pos, window)` from `lmforge.models.attention`, so the
causal / window rule lives in one place; an empty slot has a negative position and is never attended.

    ContiguousCache   S = max_len        position p lives in slot p
    RollingCache      S = W              position p lives in slot p mod W (Mistral's rolling buffer)

Per-sequence positions. Every row of the batch carries its own positions (B, Tq). A batch of prompts of
different lengths is left-padded: row b's real tokens sit in the last L_b columns with positions
0 .. L_b - 1, and padding columns have position -1. Padding is never written to the cache, a padding query
sees no key (its output is set to 0), and all prompts end in the last column, so one `logits_index`
picks every row's last prompt token. Worked example, prompts of lengths 3 and 5:

    columns     0   1   2   3   4
    row 0      -1  -1   0   1   2      (2 padding columns)
    row 1       0   1   2   3   4

Decoding then advances each row from its own length: row 0 writes position 3 while row 1 writes position 5.

The model calls `attend` once per layer. A cache hands the model a bound view for one forward call:

    view = cache.prefill(positions)   # (B, Tq) with -1 for padding; any Tq (a chunk)
    view = cache.decode(positions)    # (B, 1), every row a real token: static shapes, no host sync
    logits = model(tokens, positions, cache=view)

The view holds the mask and write slots computed once for all layers. `decode` uses only tensor indices
(scatter_ into preallocated buffers, no `.item()`, no branching on tensor values), so a decode step can be
compiled and captured in a CUDA graph (`lmforge.infer.decode_step`). `prefill` uses `nonzero` to skip padding,
a host sync that is fine once per chunk.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lmforge.models.attention import allowed_mask, reference_attention, sdpa_attention
from lmforge.models.config import ModelConfig

AttentionImpl = Literal["sdpa", "reference"]


class _SlotCache:
    """Buffers and the shared read / write code of both caches; subclasses say which slot a position uses."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        n_slots: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        attention: AttentionImpl = "sdpa",
    ):
        self.window = config.sliding_window
        self.batch_size, self.n_slots = batch_size, n_slots
        self.attention = attention
        shape = (batch_size, config.n_kv_heads, n_slots, config.head_dim)  # (B, Hkv, S, D)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.slot_pos = torch.full((batch_size, n_slots), -1, dtype=torch.long, device=device)  # (B, S)

    def slot_of(self, positions: Tensor) -> Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget every sequence (the buffers are reused; only the positions are cleared)."""
        self.slot_pos.fill_(-1)

    @property
    def nbytes(self) -> int:
        """Bytes held by the k / v buffers and the slot positions."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v, self.slot_pos))

    def buffers(self) -> list[Tensor]:
        """Every tensor the cache mutates in place (for `torch._dynamo.mark_static_address`)."""
        return [*self.k, *self.v, self.slot_pos]

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        if self.attention == "reference":
            return reference_attention(q, k, v, mask)
        return sdpa_attention(q, k, v, mask=mask)

    def decode(self, positions: Tensor) -> "DecodeView":
        """Bind one decode step: positions (B, 1), every row a real token (>= 0).

        The new keys are written first, then the query attends over all S slots: with one new token per
        row, the slot it overwrites (a rolling buffer's position p - W) is exactly the one leaving the window.
        """
        if positions.shape != (self.batch_size, 1):
            raise ValueError(f"decode positions must have shape ({self.batch_size}, 1), got {tuple(positions.shape)}")
        slots = self.slot_of(positions)  # (B, 1)
        self.slot_pos.scatter_(1, slots, positions)
        mask = allowed_mask(positions, self.slot_pos, self.window).unsqueeze(1)  # (B, 1, 1, S)
        return DecodeView(self, slots, mask)


class DecodeView:
    """A cache bound to one decode step (see `_SlotCache.decode`); implements the model's KVCache protocol."""

    def __init__(self, cache: _SlotCache, slots: Tensor, mask: Tensor):
        self.cache, self.slots, self.mask = cache, slots, mask

    def attend(self, layer_id: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        c = self.cache
        index = self.slots[:, None, :, None].expand_as(k)  # (B, Hkv, 1, D)
        c.k[layer_id].scatter_(2, index, k)
        c.v[layer_id].scatter_(2, index, v)
        return c._attention(q, c.k[layer_id], c.v[layer_id], self.mask)  # (B, H, 1, D)


def _real_tokens(positions: Tensor) -> tuple[Tensor, Tensor]:
    """(row, column) indices of the non-padding entries of positions (B, T); a host sync (pre-fill only)."""
    return (positions >= 0).nonzero(as_tuple=True)


def _write(buf: Tensor, rows: Tensor, slots: Tensor, new: Tensor, cols: Tensor) -> None:
    """buf[rows[n], :, slots[n]] = new[rows[n], :, cols[n]] for every n; buf (B, Hkv, S, D), new (B, Hkv, T, D)."""
    buf[rows, :, slots] = new[rows, :, cols]  # advanced indices first: (N, Hkv, D) on both sides


class ContiguousCache(_SlotCache):
    """S = max_len slots per sequence; position p lives in slot p. Positions must stay below max_len.

    Pre-fill writes the chunk's real tokens first, then the chunk's queries attend over the slots; since
    nothing is ever overwritten, this equals attending over [previous tokens] + [the chunk] for any chunk size.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, **kwargs):
        super().__init__(config, batch_size, max_len, **kwargs)

    def slot_of(self, positions: Tensor) -> Tensor:
        return positions

    def prefill(self, positions: Tensor, kv_len: int | None = None) -> "PrefillView":
        """Bind one pre-fill chunk: positions (B, Tq), -1 for padding.

        kv_len: optional host-side bound (max position in the chunk + 1): only slots [0, kv_len) are read,
        so a chunk does not pay for the empty end of the cache.
        """
        rows, cols = _real_tokens(positions)
        slots = positions[rows, cols]
        self.slot_pos[rows, slots] = slots
        kv_len = kv_len or self.n_slots
        mask = allowed_mask(positions, self.slot_pos[:, :kv_len], self.window).unsqueeze(1)  # (B, 1, Tq, kv_len)
        return PrefillView(self, positions, mask, rows, cols, slots, kv_len=kv_len)


class RollingCache(_SlotCache):
    """Mistral's rolling buffer: S = W slots per sequence; position p lives in slot p mod W.

    Worked example, W = 4, a 10-token prompt pre-filled in chunks of 4, then decoding (slot contents are
    positions, `.` empty):

        chunk [0..3]   keys = buffer [. . . .] + chunk 0..3      write 0..3 -> slots 0..3   buffer [0 1 2 3]
        chunk [4..7]   keys = buffer [0 1 2 3] + chunk 4..7      query 5 sees 2 3 4 5       buffer [4 5 6 7]
        chunk [8, 9]   keys = buffer [4 5 6 7] + chunk 8, 9      write 8 -> 0, 9 -> 1       buffer [8 9 6 7]
        decode 10      write 10 -> slot 2 first, then attend     query 10 sees 7 8 9 10     buffer [8 9 10 7]

    A chunk larger than the window, W = 4, chunk 0..5: query 5 needs keys 2..5 and query 3 needs 0..3, but
    writing all six would put 4 and 5 over 0 and 1 before query 3 reads them. So a pre-fill chunk attends
    over [buffer contents before the chunk] + [the chunk's own keys] (W + Tq keys, masked by position),
    and only then are its last min(Tq, W) tokens written: 2..5 -> slots 2 3 0 1, buffer [4 5 2 3].
    The same holds for any chunk with Tq > 1 (chunk 4..7 above: query 4 needs position 1, which 5 would
    overwrite), so pre-fill always attends before writing; decoding (Tq = 1) writes first.
    """

    def __init__(self, config: ModelConfig, batch_size: int, **kwargs):
        if config.sliding_window is None:
            raise ValueError("RollingCache needs a sliding-window model (config.sliding_window is None)")
        super().__init__(config, batch_size, config.sliding_window, **kwargs)

    def slot_of(self, positions: Tensor) -> Tensor:
        return positions % self.n_slots

    def prefill(self, positions: Tensor, kv_len: int | None = None) -> "PrefillView":
        """Bind one pre-fill chunk: positions (B, Tq), -1 for padding. `kv_len` is ignored (always W + Tq keys)."""
        W, Tq = self.n_slots, positions.shape[1]
        key_pos = torch.cat([self.slot_pos, positions], dim=1)  # (B, W + Tq): buffer, then the chunk
        mask = allowed_mask(positions, key_pos, self.window).unsqueeze(1)  # (B, 1, Tq, W + Tq)
        # Only the last min(Tq, W) columns survive the chunk; with left padding they are each row's newest.
        first = max(Tq - W, 0)
        rows, cols = _real_tokens(positions[:, first:])
        cols = cols + first
        slots = self.slot_of(positions[rows, cols])
        self.slot_pos[rows, slots] = positions[rows, cols]
        return PrefillView(self, positions, mask, rows, cols, slots, concat=True)


class PrefillView:
    """A cache bound to one pre-fill chunk (see `ContiguousCache.prefill`, `RollingCache.prefill`)."""

    def __init__(self, cache, positions, mask, rows, cols, slots, *, kv_len: int | None = None, concat=False):
        self.cache, self.mask = cache, mask
        self.rows, self.cols, self.slots = rows, cols, slots
        self.kv_len, self.concat = kv_len, concat
        self.is_query = (positions >= 0)[:, None, :, None]  # (B, 1, Tq, 1)

    def attend(self, layer_id: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        c = self.cache
        kb, vb = c.k[layer_id], c.v[layer_id]  # (B, Hkv, S, D)
        if self.concat:  # rolling buffer: read before writing (see RollingCache)
            keys, values = torch.cat([kb, k], dim=2), torch.cat([vb, v], dim=2)  # (B, Hkv, W + Tq, D)
            _write(kb, self.rows, self.slots, k, self.cols)
            _write(vb, self.rows, self.slots, v, self.cols)
        else:
            _write(kb, self.rows, self.slots, k, self.cols)
            _write(vb, self.rows, self.slots, v, self.cols)
            keys, values = kb[:, :, : self.kv_len], vb[:, :, : self.kv_len]  # (B, Hkv, kv_len, D)
        out = c._attention(q, keys, values, self.mask)  # (B, H, Tq, D)
        # NOTE: a padding query sees no key; some kernels return NaN for such a row, and a NaN value vector
        # would poison real queries in the next layer (0 * NaN), so padding outputs are set to 0 here.
        return out.masked_fill(~self.is_query, 0.0)


def cache_config(model) -> ModelConfig:
    """The shapes a cache for `model` holds: its config, or under tensor parallelism the heads of one rank
    (`lmforge.parallel.apply_tensor_parallel` records the degree as `model.tp_degree`)."""
    import dataclasses

    tp = getattr(model, "tp_degree", 1)
    config = model.config
    if tp == 1:
        return config
    return dataclasses.replace(config, n_heads=config.n_heads // tp, n_kv_heads=config.n_kv_heads // tp)


def make_cache(
    config: ModelConfig,
    batch_size: int,
    max_len: int,
    *,
    kind: Literal["auto", "contiguous", "rolling"] = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    attention: AttentionImpl = "sdpa",
) -> ContiguousCache | RollingCache:
    """The cache for `batch_size` sequences of at most `max_len` positions each.

    "auto": a rolling buffer of W slots for a sliding-window model when max_len > W, else a contiguous
    cache of max_len slots (the window still applies through the mask).
    NOTE: a short generation of a sliding-window model takes the contiguous cache: max_len < W slots is less
    memory than W, and the two give the same logits (tests/infer/test_cache.py).
    """
    if kind == "auto":
        W = config.sliding_window
        kind = "rolling" if W is not None and max_len > W else "contiguous"
    common = dict(device=device, dtype=dtype, attention=attention)
    if kind == "rolling":
        return RollingCache(config, batch_size, **common)
    if kind == "contiguous":
        return ContiguousCache(config, batch_size, max_len, **common)
    raise ValueError(f"cache kind must be 'auto', 'contiguous' or 'rolling', got {kind!r}")


__all__ = ["ContiguousCache", "DecodeView", "PrefillView", "RollingCache", "make_cache"]
