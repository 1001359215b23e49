"""Scheduler: token budget, chunked pre-fill mixed with decode, admission limits, preemption, abort."""

import pytest

from lmforge.infer.engine.block_manager import BlockManager
from lmforge.infer.engine.scheduler import RefusalReason, RequestRefused, Scheduler, SchedulerConfig
from lmforge.infer.engine.sequence import FinishReason, Sequence, SequenceStatus
from lmforge.infer.sampling import SamplingParams


def _sched(num_blocks=64, bs=4, budget=8, max_seqs=4, max_waiting=10, window=None):
    cfg = SchedulerConfig(budget, max_seqs, max_waiting, check_invariants=True)
    return Scheduler(cfg, BlockManager(num_blocks, bs, window), max_seq_len=256)


def _seq(n, max_new=4):
    return Sequence(list(range(1, n + 1)), SamplingParams(max_new_tokens=max_new))


def _run(s, out):
    """Play the runner + engine: advance computed tokens, append a token to every sampling sequence."""
    s.step_done(out)
    for c in out.chunks:
        if c.samples:
            c.seq.output_ids.append(0)


def test_budget_chunks_a_long_prompt_and_mixes_it_with_decodes():
    s = _sched(budget=8)
    short, long = _seq(2), _seq(20)
    s.add(short)
    s.add(long)
    out = s.schedule()
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(short, 2), (long, 6)]
    assert out.chunks[0].samples and not out.chunks[1].samples
    _run(s, out)
    out = s.schedule()  # the decode of `short` (1 token) and the next chunk of `long` (7 tokens)
    assert [(c.seq, c.num_tokens, c.start) for c in out.chunks] == [(short, 1, 2), (long, 7, 6)]
    _run(s, out)
    out = s.schedule()
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(short, 1), (long, 7)]
    assert out.chunks[1].samples  # 6 + 7 + 7 = 20: the prompt is done, its first token is sampled


def test_max_num_seqs_bounds_admission():
    s = _sched(budget=8, max_seqs=2)
    seqs = [_seq(1) for _ in range(3)]
    for q in seqs:
        s.add(q)
    out = s.schedule()
    assert [c.seq for c in out.chunks] == seqs[:2] and list(s.waiting) == seqs[2:]


def test_queue_limit_and_capacity_refusals_carry_reasons():
    s = _sched(num_blocks=4, max_waiting=2)
    s.add(_seq(3))
    s.add(_seq(3))
    with pytest.raises(RequestRefused) as err:
        s.add(_seq(3))
    assert err.value.reason is RefusalReason.QUEUE_FULL and err.value.reason.http_status == 429
    s2 = _sched(num_blocks=4)
    with pytest.raises(RequestRefused) as err:
        s2.add(_seq(10, max_new=10))  # 20 tokens need 5 blocks of 4; there are 4
    assert err.value.reason is RefusalReason.EXCEEDS_KV_CAPACITY and err.value.reason.http_status == 503


def test_preemption_by_recompute_when_blocks_run_out():
    s = _sched(num_blocks=4, bs=4, budget=16)
    a, b = _seq(7, max_new=9), _seq(7, max_new=9)
    s.add(a)
    s.add(b)
    _run(s, s.schedule())  # both pre-filled: 2 blocks each, the pool is full
    assert s.bm.num_free_blocks == 0
    _run(s, s.schedule())  # both decode position 7, still in their second block
    out = s.schedule()  # a needs a third block for position 8: b (the newest) is preempted
    assert out.preempted == [b] and [c.seq for c in out.chunks] == [a]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and not b.block_table
    assert b.num_to_compute == 9 and s.num_preemptions == 1  # prompt + its 2 outputs, recomputed later
    assert s.waiting[0] is b


def test_abort_frees_blocks_at_once():
    s = _sched()
    a, b = _seq(9), _seq(5)
    s.add(a)
    s.add(b)
    _run(s, s.schedule())
    s.finish(a, FinishReason.ABORT)
    assert a.is_finished and a.finish_reason is FinishReason.ABORT and not a.block_table
    s.bm.check_invariants(s.running)
    s.finish(b, FinishReason.ABORT)
    assert s.bm.num_used_blocks == 0 and not s.running
