"""Paged attention: the docstrings' worked examples, and the padded and varlen paths against the dense reference."""

import pytest
import torch

from lmforge.infer.engine.paged_attention import PackedMetadata, PagedAttention, PagedKVPool, build_metadata
from lmforge.infer.engine.varlen import build_varlen
from lmforge.models import ModelConfig


def test_metadata_worked_example():
    m = build_metadata([5, 0], [1, 3], [[7, 2], [4]], block_size=4, window=None, device="cpu")
    assert m.positions.tolist() == [5, 0, 1, 2]
    assert m.slot_mapping.tolist() == [9, 16, 17, 18]
    decodes, chunk = m.groups
    assert decodes.q_index.tolist() == [[0]] and decodes.q_pos.tolist() == [[5]]
    assert decodes.key_pos.tolist() == [[0, 1, 2, 3, 4, 5]] and decodes.key_slots.tolist() == [[28, 29, 30, 31, 8, 9]]
    assert chunk.q_index.tolist() == [[1, 2, 3]] and chunk.q_pos.tolist() == [[0, 1, 2]]
    assert chunk.key_pos.tolist() == [[0, 1, 2]] and chunk.key_slots.tolist() == [[16, 17, 18]]


def test_metadata_groups_decodes_by_key_count_class():
    # Keys per decode: 3 (class 2), 7 and 6 (class 3); sequence 1 pre-fills 2 tokens from position 0.
    m = build_metadata([2, 0, 6, 5], [1, 2, 1, 1], [[3], [1], [5, 0], [2, 6]], block_size=4, window=None, device="cpu")
    short, long, chunk = m.groups
    assert short.q_index.tolist() == [[0]] and short.key_slots.tolist() == [[12, 13, 14]]
    assert long.q_index.tolist() == [[3], [4]]
    assert long.key_pos.tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, -1]]
    assert long.key_slots.tolist() == [[20, 21, 22, 23, 0, 1, 2], [8, 9, 10, 11, 24, 25, 0]]
    assert chunk.q_index.tolist() == [[1, 2]] and chunk.self_causal and not long.self_causal


def test_metadata_reads_only_the_window():
    # W = 3, sequence at positions 9..10 (table with blocks 0..1 freed): keys from position 7 on.
    m = build_metadata([9], [2], [[-1, 3, 5]], block_size=4, window=3, device="cpu")
    assert m.groups[0].key_pos.tolist() == [[7, 8, 9, 10]]
    assert m.groups[0].key_slots.tolist() == [[15, 20, 21, 22]]


def test_varlen_metadata_worked_example():
    positions, slot_mapping, a = build_varlen([5, 0], [1, 3], [[7, 2], [4]], block_size=4, window=None, device="cpu")
    assert positions.tolist() == [5, 0, 1, 2] and slot_mapping.tolist() == [9, 16, 17, 18]
    assert a.key_slots.tolist() == [28, 29, 30, 31, 8, 9, 16, 17, 18]
    assert a.cu_q.tolist() == [0, 1, 4] and a.cu_k.tolist() == [0, 6, 9] and (a.max_q, a.max_k) == (3, 6)
    assert a.cu_q.dtype == torch.int32


def test_varlen_metadata_reads_only_the_window():
    # as test_metadata_reads_only_the_window, next to a decode at position 1 (table [6])
    positions, slot_mapping, a = build_varlen([9, 1], [2, 1], [[-1, 3, 5], [6]], block_size=4, window=3, device="cpu")
    assert positions.tolist() == [9, 10, 1] and slot_mapping.tolist() == [21, 22, 25]
    assert a.key_slots.tolist() == [15, 20, 21, 22, 24, 25] and a.cu_k.tolist() == [0, 4, 6]
    with pytest.raises(AssertionError, match="freed block"):
        build_varlen([9], [2], [[-1, 3, 5]], block_size=4, window=7, device="cpu")  # would read position 3
    with pytest.raises(AssertionError, match="has none"):
        build_varlen([9], [4], [[-1, 3, 5]], block_size=4, window=3, device="cpu")  # position 12 has no block


def _metadata(impl, starts, lengths, tables, bs, window):
    if impl == "varlen":
        positions, slot_mapping, varlen = build_varlen(starts, lengths, tables, bs, window, "cpu")
        return PackedMetadata(positions, slot_mapping, [], varlen)
    return build_metadata(starts, lengths, tables, bs, window, "cpu")


@pytest.mark.parametrize("window", [None, 4])
def test_padded_and_varlen_equal_reference(window):
    config = ModelConfig.from_name("tiny", sliding_window=window)
    bs, H, Hkv, D = 4, config.n_heads, config.n_kv_heads, config.head_dim
    starts, lengths = [0, 7, 13, 2, 4], [5, 1, 6, 1, 3]
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(32, generator=g).tolist()  # scattered blocks
    tables, used = [], 0
    for s, n in zip(starts, lengths):
        k = -(-(s + n) // bs)
        tables.append(perm[used : used + k])
        used += k
    N = sum(lengths)
    outs = []
    for impl in ("reference", "padded", "varlen"):
        pool = PagedKVPool(config, 32, bs, "cpu", torch.float32)
        torch.manual_seed(1)
        for t in (*pool.k, *pool.v):
            t.normal_()
        meta = _metadata(impl, starts, lengths, tables, bs, window)
        q = torch.randn(1, H, N, D, generator=torch.Generator().manual_seed(2))
        k = torch.randn(1, Hkv, N, D, generator=torch.Generator().manual_seed(3))
        v = torch.randn(1, Hkv, N, D, generator=torch.Generator().manual_seed(4))
        outs.append(PagedAttention(pool, meta, window, impl).attend(0, q, k, v))
        assert torch.equal(pool.k[0][meta.slot_mapping], k[0].transpose(0, 1))  # new keys were written
    assert outs[0].abs().max() > 0.1
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-5)
