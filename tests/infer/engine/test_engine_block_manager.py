"""Block manager: slot arithmetic, reference counts, prefix sharing, sliding-window freeing, invariants."""

from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.infer.engine.block_manager import BlockManager
from lmforge.infer.engine.sequence import Sequence
from lmforge.infer.sampling import SamplingParams


def _seq(tokens):
    return Sequence(list(tokens), SamplingParams())


def _compute(bm, seq, n):
    """What a step does: allocate, then mark n more tokens computed."""
    assert bm.append(seq, n)
    seq.num_computed_tokens += n
    bm.on_computed(seq)


def test_slot_worked_example():
    bm = BlockManager(16, 4)
    seq = _seq(range(12))
    seq.block_table = [7, 2, 9]
    assert [bm.slot(seq, p) for p in (0, 5, 11)] == [28, 9, 39]
    seq.block_table, seq.num_computed_tokens = [7, 2], 5
    assert bm.blocks_to_add(seq, 4) == 1 and bm.blocks_to_add(seq, 3) == 0


def test_prefix_sharing_counts_references_and_survives_free():
    bm = BlockManager(8, 4)
    a = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.admit(a, bm.match_prefix(a), 9)
    a.num_computed_tokens = 9
    bm.on_computed(a)  # blocks 0 and 1 are full and computed: registered
    b = _seq([1, 2, 3, 4, 5, 6, 7, 8, 0, 0])
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:2]
    assert bm.admit(b, hits, 2) and b.num_computed_tokens == 8
    assert [bm.ref[x] for x in hits] == [2, 2]
    bm.check_invariants([a, b])
    bm.free_seq(a)
    assert [bm.ref[x] for x in hits] == [1, 1]
    bm.free_seq(b)
    assert bm.num_free_blocks == 8
    bm.check_invariants([])
    # Freed blocks keep their keys: a third sequence still finds them and takes them out of the free pool.
    c = _seq([1, 2, 3, 4, 5, 6, 7, 8, 5])
    assert bm.match_prefix(c) == hits
    assert bm.admit(c, bm.match_prefix(c), 1)
    assert bm.num_free_blocks == 8 - 3
    bm.check_invariants([c])


def test_prefix_lookup_leaves_the_last_token_to_compute():
    bm = BlockManager(8, 4)
    a = _seq(range(8))
    assert bm.admit(a, [], 8)
    a.num_computed_tokens = 8
    bm.on_computed(a)
    same = _seq(range(8))  # fully cached, but its last token's logits are needed: only block 0 is shared
    assert bm.match_prefix(same) == a.block_table[:1]


def test_eviction_of_a_cached_block_removes_its_key():
    bm = BlockManager(2, 4)
    a = _seq(range(5))
    assert bm.admit(a, [], 5)
    a.num_computed_tokens = 5
    bm.on_computed(a)
    bm.free_seq(a)
    other = _seq([9] * 8)
    assert bm.admit(other, bm.match_prefix(other), 8)  # takes both blocks, evicting a's cached block
    assert bm.match_prefix(_seq(range(5))) == [] and not bm.cached
    bm.check_invariants([other])


def test_admit_refuses_without_changing_anything():
    bm = BlockManager(3, 4)
    a = _seq(range(20))
    assert not bm.admit(a, [], 13)  # needs 4 blocks
    assert a.block_table == [] and bm.num_free_blocks == 3
    assert not bm.admit(a, [], 9, reserve=1)  # 3 blocks would leave 0 < 1 free
    assert bm.admit(a, [], 8, reserve=1)


def test_sliding_window_frees_blocks_and_bounds_them():
    W, bs = 8, 4
    bm = BlockManager(64, bs, window=W)
    seq = _seq(range(3))
    assert bm.admit(seq, [], 3)
    seq.num_computed_tokens = 3
    bm.on_computed(seq)
    for _ in range(200):  # decode 200 tokens
        seq.output_ids.append(0)
        _compute(bm, seq, 1)
        bm.check_invariants([seq])
        live = sum(b >= 0 for b in seq.block_table)
        assert live <= -(-(W - 1 + 1) // bs) + 1
    # Worked example of the docstring: c = 13 frees block 0 only.
    s2 = _seq(range(13))
    assert bm.admit(s2, [], 13)
    s2.num_computed_tokens = 13
    bm.on_computed(s2)
    assert [b >= 0 for b in s2.block_table] == [False, True, True, True]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(1, 9)), min_size=1, max_size=60),
       st.sampled_from([None, 5]))
def test_random_operations_keep_the_invariants(ops, window):
    """Admit / grow / free in any order, with shared prompts: the invariants hold after every operation."""
    bm = BlockManager(12, 3, window=window)
    live: list[Sequence] = []
    for op, which, n in ops:
        if op == 0:
            seq = _seq([which % 2] * 7 + [which])  # prompts share their first blocks
            hits = bm.match_prefix(seq)
            n = min(n, seq.num_tokens - len(hits) * 3)
            if bm.admit(seq, hits, n):
                seq.num_computed_tokens += n
                bm.on_computed(seq)
                live.append(seq)
        elif op in (1, 2) and live:
            seq = live[which % len(live)]
            seq.output_ids.extend([1] * n)
            if bm.append(seq, seq.num_to_compute):
                seq.num_computed_tokens = seq.num_tokens
                bm.on_computed(seq)
            else:
                del seq.output_ids[-n:]
        elif live:
            bm.free_seq(live.pop(which % len(live)))
        bm.check_invariants(live)
    for seq in live:
        bm.free_seq(seq)
    assert bm.num_free_blocks == 12
