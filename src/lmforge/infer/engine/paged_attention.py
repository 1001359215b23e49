"""Attention over the paged KV pool for a packed batch (the model's `KVCache` protocol).

Notation: L layers, NB pool blocks, bs block size, Hkv kv heads, H query heads, D head dim; S sequences in the
step, n_s new tokens of sequence s, N = sum n_s (the packed batch is B = 1, T = N), K_s keys of sequence s.

The pool holds, per layer, k and v of shape ((NB + 1) * bs, Hkv, D): slot `block * bs + offset` (block NB is
a spare, see `PagedKVPool`). One step's metadata
(`PackedMetadata`, built by the runner) says where every new token goes and which keys each sequence reads:

    positions     (N,)        position of each new token in its own sequence
    slot_mapping  (N,)        slot(p) = block_table[s][p // bs] * bs + p % bs (see block_manager.py)
    groups        attention groups: decoding sequences (n_s = 1) together, in classes of key count
                  K in [2^(c-1), 2^c) (padding at most doubles a row's keys: a 4,000-token straggler does not
                  pad 255 decodes of 400 keys), and each pre-fill chunk alone (padding never multiplies a long
                  chunk by the number of decodes). Per group of G rows:
        q_index   (G, Qmax)   packed index of row g's j-th new token (padding: 0, with q_pos -1)
        q_pos     (G, Qmax)   its position, -1 on padding
        key_slots (G, Kmax)   slots of the keys row g may read (padding: 0, with key_pos -1)
        key_pos   (G, Kmax)   their positions, -1 on padding

Worked example, bs = 4, no window. Sequence 0 decodes position 5 (table [7, 2]); sequence 1 pre-fills
positions 0..2 (table [4]). Packed: positions [5, 0, 1, 2], slot_mapping [2*4+1, 16, 17, 18] = [9, 16, 17, 18].
Group 0 (the decodes): q_index [[0]], q_pos [[5]], key_pos [[0 1 2 3 4 5]], key_slots [[28 29 30 31 8 9]].
Group 1 (sequence 1's chunk): q_index [[1 2 3]], q_pos [[0 1 2]], key_pos [[0 1 2]], key_slots [[16 17 18]].
Decodes with 6, 7, 3 and 12 keys fall in classes 3, 3, 2 and 4 (K.bit_length()): three groups.

A chunk that starts a sequence (position 0) and needs no window mask (n_s <= W) attends only to its own
keys, which are exactly the k / v just computed: "padded" then calls causal SDPA on them directly
(`self_causal`), with no gather and no mask (the flash kernel on CUDA).

Each layer first writes the new k / v at `slot_mapping`, then attends; the mask is always
`lmforge.models.attention.allowed_mask` on positions, so the causal / window rule lives in one place. Two
implementations compute the same function (a slow obvious reference beside each fast path,
tests/infer/engine/test_engine_paged_attention.py):

    "reference"  one dense (N, sum K_s) attention over the packed batch; a query sees only its own sequence's
                 keys (the sequence index acts as a document id). Explicit softmax; slow, obvious.
    "padded"     one SDPA call per group over (G, Qmax) queries and (G, Kmax) gathered keys.
    "varlen"     one variable-length (flash) attention call over the whole step, with its own flat metadata
                 (`PackedMetadata.varlen`, built by varlen.py's `build_varlen` instead of the groups).
NOTE: all three gather each sequence's keys out of the pool (a copy); a kernel that reads the blocks in place
(FlexAttention over the pool, a Triton paged kernel) is the faster path still to add for the GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.infer.engine.varlen import VarlenArgs, varlen_attention
from lmforge.infer.transfer import to_device
from lmforge.models.attention import allowed_mask, reference_attention, sdpa_attention
from lmforge.models.config import ModelConfig

PagedImpl = Literal["reference", "padded", "varlen"]


class PagedKVPool:
    """k and v blocks of every layer, preallocated once: ((NB + 1) * bs, Hkv, D) per layer.

    Blocks 0 .. NB - 1 are the block manager's; block NB is a spare "null" block that it never hands out:
    static-shape decode steps (decode_graphs.py) point their padding rows and keys at it.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, device, dtype: torch.dtype):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.null_slot = num_blocks * block_size  # first slot of the null block
        shape = ((num_blocks + 1) * block_size, config.n_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write of a shared block, block_manager.py)."""
        if not copies:
            return
        bs = self.block_size
        blocks = torch.tensor(copies).T  # (2, C): source blocks, destination blocks
        slots = to_device((blocks[:, :, None] * bs + torch.arange(bs)).flatten(1), self.k[0].device)  # (2, C * bs)
        for buf in (*self.k, *self.v):
            buf.index_copy_(0, slots[1], buf.index_select(0, slots[0]))

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return 2 * config.n_layers * block_size * config.n_kv_heads * config.head_dim * dtype.itemsize


@dataclass
class AttentionGroup:
    q_index: Tensor  # (G, Qmax)
    q_pos: Tensor  # (G, Qmax)
    key_slots: Tensor  # (G, Kmax)
    key_pos: Tensor  # (G, Kmax)
    self_causal: bool = False  # one chunk from position 0 within the window: plain causal over its own keys
    # The real (non-padding) queries, found once per step on the host so that no layer has to (boolean
    # indexing on the device would wait for it): row-major flat index into (G * Qmax) and packed index.
    src: Tensor | None = None  # (R,)
    dst: Tensor | None = None  # (R,)


@dataclass
class PackedMetadata:
    positions: Tensor  # (N,)
    slot_mapping: Tensor  # (N,)
    groups: list[AttentionGroup]
    varlen: VarlenArgs | None = None  # the "varlen" impl's metadata (its groups are empty)


def build_metadata(
    starts: list[int], lengths: list[int], tables: list[list[int]], block_size: int, window: int | None, device
) -> PackedMetadata:
    """Metadata for S sequences computing positions [starts[s], starts[s] + lengths[s]) with their block tables.

    Sequence s reads keys from position lo_s = max(0, start - W + 1) (0 without a window: older blocks of a
    window model may be freed) up to its last new token; the window mask then trims each query's view.
    """
    bs, N = block_size, sum(lengths)
    offsets = torch.tensor([0] + lengths[:-1]).cumsum(0).tolist()  # sequence s owns packed [offset_s, + n_s)
    positions = torch.empty(N, dtype=torch.long)
    slot_mapping = torch.empty(N, dtype=torch.long)
    lo_of = [max(0, a - window + 1) if window is not None else 0 for a in starts]
    classes: dict[int, list[int]] = {}
    for s, n in enumerate(lengths):
        if n == 1:
            classes.setdefault((starts[s] + 1 - lo_of[s]).bit_length(), []).append(s)
    rows = [classes[c] for c in sorted(classes)] + [[s] for s, n in enumerate(lengths) if n > 1]
    groups = []
    for members in rows:
        start = torch.tensor([starts[s] for s in members])  # (G,)
        n = torch.tensor([lengths[s] for s in members])  # (G,)
        offset = torch.tensor([offsets[s] for s in members])  # (G,)
        width = max(len(tables[s]) for s in members)
        table = torch.tensor([tables[s] + [-1] * (width - len(tables[s])) for s in members])  # (G, blocks)
        j = torch.arange(int(n.max()))[None]  # (1, Qmax)
        q_valid = j < n[:, None]  # (G, Qmax)
        q_pos = torch.where(q_valid, start[:, None] + j, -1)
        q_index = torch.where(q_valid, offset[:, None] + j, 0)
        positions[q_index[q_valid]] = q_pos[q_valid]
        slot_mapping[q_index[q_valid]] = _slots(table, q_pos, bs)[q_valid]
        lo = (start - window + 1).clamp(min=0) if window is not None else torch.zeros_like(start)
        span = start + n - lo  # (G,) keys per row
        i = torch.arange(int(span.max()))[None]  # (1, Kmax)
        k_valid = i < span[:, None]  # (G, Kmax)
        key_pos = torch.where(k_valid, lo[:, None] + i, -1)
        key_slots = torch.where(k_valid, _slots(table, key_pos, bs), 0)
        assert bool((key_slots[k_valid] >= 0).all()), "a key lies in a freed block"
        first = members[0]
        self_causal = len(members) == 1 and starts[first] == 0 and (window is None or lengths[first] <= window)
        src, dst = q_valid.flatten().nonzero().squeeze(1), q_index[q_valid]
        tensors = (to_device(t, device) for t in (q_index, q_pos, key_slots, key_pos))
        groups.append(AttentionGroup(*tensors, self_causal, to_device(src, device), to_device(dst, device)))
    assert bool((slot_mapping >= 0).all()), "a new token has no block"
    return PackedMetadata(to_device(positions, device), to_device(slot_mapping, device), groups)


def _slots(table: Tensor, pos: Tensor, bs: int) -> Tensor:
    """slot(p) = table[g, p // bs] * bs + p % bs for positions pos (G, k) of rows with tables (G, blocks);
    negative where the block is missing or freed (and for padding positions, which the caller masks)."""
    blocks = table.gather(1, pos.clamp(min=0) // bs)  # (G, k)
    return torch.where(blocks >= 0, blocks * bs + pos.clamp(min=0) % bs, -1)


class PagedAttention:
    """The `KVCache` view of one step: write new k / v into the pool, then attend with `impl`.

    decode_kernel: for "padded", an attention for groups of one query per row used instead of gather + SDPA,
    called as `decode_kernel(q (G, H, D), kp, vp, key_slots (G, K), allowed (G, K)) -> (G, H, D)`:
    `gathered_decode_attention`, compiled (decode_graphs.py).
    """

    def __init__(self, pool: PagedKVPool, meta: PackedMetadata, window: int | None, impl: PagedImpl = "padded",
                 decode_kernel: Callable[..., Tensor] | None = None):
        if impl not in ("reference", "padded", "varlen"):
            raise ValueError(f"paged attention impl must be 'reference', 'padded' or 'varlen', got {impl!r}")
        if (impl == "varlen") != (meta.varlen is not None):
            raise ValueError("the 'varlen' impl takes metadata from build_varlen, the others from build_metadata")
        self.pool, self.meta, self.window, self.impl = pool, meta, window, impl
        self.decode_kernel = decode_kernel
        # one mask per group for the whole step, shared by every layer: (G, 1, Qmax, Kmax)
        self.masks = [
            None if g.self_causal or impl != "padded" else allowed_mask(g.q_pos, g.key_pos, window).unsqueeze(1)
            for g in meta.groups
        ]

    def attend(self, layer_id: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (1, H, N, D), k / v (1, Hkv, N, D) -> (1, H, N, D)."""
        kp, vp = self.pool.k[layer_id], self.pool.v[layer_id]  # ((NB + 1) * bs, Hkv, D)
        kp.index_copy_(0, self.meta.slot_mapping, k[0].transpose(0, 1))  # (N, Hkv, D) into their slots
        vp.index_copy_(0, self.meta.slot_mapping, v[0].transpose(0, 1))
        if self.impl == "reference":
            return _reference(q, kp, vp, self.meta, self.window)
        if self.impl == "varlen":
            a = self.meta.varlen
            out = varlen_attention(q[0].transpose(0, 1), kp[a.key_slots], vp[a.key_slots], a, self.window)  # (N, H, D)
            return out.transpose(0, 1)[None]
        return _padded(q, k, v, kp, vp, self.meta, self.masks, self.decode_kernel)


def _reference(q: Tensor, kp: Tensor, vp: Tensor, m: PackedMetadata, window: int | None) -> Tensor:
    """Dense attention of all N queries over every sequence's keys; the sequence index is a document id."""
    q_seq = torch.empty_like(m.positions)  # (N,) which sequence (group row) each packed query belongs to
    k_slots, k_pos, k_seq, row = [], [], [], 0
    for g in m.groups:
        q_valid, k_valid = g.q_pos >= 0, g.key_pos >= 0  # (G, Qmax), (G, Kmax)
        ids = row + torch.arange(g.q_pos.shape[0], device=q.device)[:, None]  # (G, 1)
        q_seq[g.q_index[q_valid]] = ids.expand_as(g.q_pos)[q_valid]
        k_slots.append(g.key_slots[k_valid])
        k_pos.append(g.key_pos[k_valid])
        k_seq.append(ids.expand_as(g.key_pos)[k_valid])
        row += g.q_pos.shape[0]
    slots = torch.cat(k_slots)  # (K,)
    keys = kp[slots].permute(1, 0, 2)[None]  # (K, Hkv, D) -> (1, Hkv, K, D)
    values = vp[slots].permute(1, 0, 2)[None]
    mask = allowed_mask(m.positions, torch.cat(k_pos), window, q_seq, torch.cat(k_seq))  # (N, K)
    return reference_attention(q, keys, values, mask)  # (1, H, N, D)


def _padded(q: Tensor, k: Tensor, v: Tensor, kp: Tensor, vp: Tensor, m: PackedMetadata, masks: list,
            decode_kernel: Callable[..., Tensor] | None = None) -> Tensor:
    """Per group, batched SDPA: queries (G, H, Qmax, D) over gathered keys (G, Hkv, Kmax, D)."""
    out = torch.empty_like(q[0].transpose(0, 1))  # (N, H, D)
    for g, mask in zip(m.groups, masks):
        if g.self_causal:  # the chunk's own keys, in order: packed indices q_index[0] = [a, a + n)
            idx = g.q_index[0]
            res = sdpa_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx], is_causal=True)  # (1, H, n, D)
            out[idx] = res[0].transpose(0, 1)
            continue
        qs = q[0][:, g.q_index].permute(1, 0, 2, 3)  # (H, G, Qmax, D) -> (G, H, Qmax, D)
        if decode_kernel is not None and qs.shape[2] == 1:  # one query per row: no copy of the keys
            res = decode_kernel(qs[:, :, 0], kp, vp, g.key_slots, mask[:, 0, 0])  # (G, H, D)
            out[g.dst] = res[g.src]
            continue
        keys = kp[g.key_slots].permute(0, 2, 1, 3)  # (G, Kmax, Hkv, D) -> (G, Hkv, Kmax, D)
        values = vp[g.key_slots].permute(0, 2, 1, 3)
        G, H, Qmax, D = qs.shape
        Hkv = keys.shape[1]
        if Qmax == 1 and H != Hkv:
            # Decodes under GQA: the n_rep query heads of kv head j become n_rep "query positions" of head j
            # (query head h uses kv head h // n_rep), so SDPA runs without enable_gqa, which on CUDA would
            # push a masked call onto the math kernel and copy every key n_rep times.
            grouped = qs.reshape(G, Hkv, H // Hkv, D)  # (G, Hkv, n_rep, D)
            res = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask).reshape(G, H, 1, D)
        else:
            # NOTE: a padding query row has no allowed key and may come back NaN; it is dropped right below.
            res = sdpa_attention(qs, keys, values, mask=mask)  # (G, H, Qmax, D)
        out[g.dst] = res.transpose(1, 2).reshape(G * Qmax, H, D)[g.src]  # real queries only, no host sync
    return out.transpose(0, 1)[None]  # (1, H, N, D)


def gathered_decode_attention(q: Tensor, kp: Tensor, vp: Tensor, key_slots: Tensor, allowed: Tensor) -> Tensor:
    """Decode attention reading keys out of the pool by slot: one query per row.

    q (G, H, D), kp / vp (S, Hkv, D) the pool, key_slots (G, K), allowed (G, K) bool (each row has at least one
    allowed key) -> (G, H, D). Query head h reads kv head h // r, r = H / Hkv.

    NOTE: written as broadcast products and sums rather than matmuls, so that under torch.compile Inductor folds
    the gather `kp[key_slots]` into its reduction kernels and reads every key once, straight from the pool;
    gather + SDPA first copies (G, K, Hkv, D) keys and values out, which costs three times the bytes. Eager,
    it is plain (and memory-hungry) explicit attention, tested equal to the SDPA path.
    """
    G, H, D = q.shape
    Hkv = kp.shape[1]
    qg = q.view(G, 1, Hkv, H // Hkv, D).float()  # (G, 1, Hkv, r, D)
    keys = kp[key_slots].unsqueeze(3).float()  # (G, K, Hkv, 1, D)
    scores = (qg * keys).sum(-1) * D**-0.5  # (G, K, Hkv, r)
    scores = scores.masked_fill(~allowed[:, :, None, None], float("-inf"))
    probs = scores.softmax(dim=1)  # over the K keys
    values = vp[key_slots].unsqueeze(3).float()  # (G, K, Hkv, 1, D)
    out = (probs.unsqueeze(-1) * values).sum(1)  # (G, Hkv, r, D)
    return out.reshape(G, H, D).to(q.dtype)


__all__ = ["AttentionGroup", "gathered_decode_attention", "PackedMetadata", "PagedAttention", "PagedImpl", "PagedKVPool", "build_metadata"]
