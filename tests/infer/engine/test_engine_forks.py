"""K samples of one prompt (`LLMEngine.add_samples`): the prompt is pre-filled once, the K requests share its
blocks (copy-on-write for the last, partly filled one), and every request computes what it would alone:
teacher-forced logits equal the model's (<= 1e-5), seeded outputs equal K separate requests with the derived
seeds, and preemption and abort keep the block manager's invariants."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_helpers import forced_fork_logits, random_seq, random_traffic
from infer_helpers import assert_logits_close, full_logits, tiny_model
from lmforge.infer.engine import LLMEngine, RequestRefused
from lmforge.infer.engine.block_manager import BlockManager
from lmforge.infer.engine.sequence import Sequence
from lmforge.infer.sampling import SamplingParams


def _engine(model, **kw):
    kw = {"block_size": 4, "num_blocks": 256, "max_num_batched_tokens": 16, "max_num_seqs": 8,
          "check_invariants": True, **kw}
    return LLMEngine(model, **kw)


def _run(engine, ids):
    """Step to the end; per request id: (tokens, log-probs, finish reason)."""
    got = {i: ([], [], None) for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens, logprobs, _ = got[out.request_id]
            tokens += out.new_token_ids
            logprobs += out.new_logprobs or []
            got[out.request_id] = (tokens, logprobs, out.finish_reason)
    return [got[i] for i in ids]


def _forked(num_blocks: int, prompt_len: int, k: int) -> tuple[BlockManager, list[Sequence]]:
    """A block manager (block size 4) whose computed prompt of prompt_len tokens was forked k ways and freed;
    each fork has one new output token to compute."""
    bm = BlockManager(num_blocks, 4)
    prompt = Sequence(list(range(prompt_len)), SamplingParams())
    assert bm.admit(prompt, [], prompt_len)
    prompt.num_computed_tokens = prompt_len
    bm.on_computed(prompt)
    forks = [Sequence(list(range(prompt_len)), SamplingParams(), output_ids=[1]) for _ in range(k)]
    for f in forks:
        bm.fork(prompt, f)
    bm.free_seq(prompt)
    return bm, forks


def test_fork_and_copy_on_write_worked_example():
    """block_manager.py's example: a 6-token prompt in two blocks forked three ways; the partly filled block
    is copied for the first two writers and written in place by the last."""
    bm, forks = _forked(16, 6, 3)
    first, last = forks[0].block_table
    assert [bm.ref[first], bm.ref[last]] == [3, 3] and bm.num_used_blocks == 2
    assert all(bm.append(f, 1) for f in forks)
    assert [f.block_table[0] for f in forks] == [first] * 3
    assert forks[2].block_table[1] == last and {forks[0].block_table[1], forks[1].block_table[1]}.isdisjoint({last})
    assert bm.take_copies() == [(last, forks[0].block_table[1]), (last, forks[1].block_table[1])]
    assert bm.take_copies() == [] and bm.ref[first] == 3 and bm.ref[last] == 1
    bm.check_invariants(forks)


def test_a_fork_at_a_block_boundary_copies_nothing():
    bm, forks = _forked(16, 8, 2)
    assert all(bm.append(f, 1) for f in forks)
    assert bm.take_copies() == [] and forks[0].block_table[:2] == forks[1].block_table[:2]
    bm.check_invariants(forks)


def test_copy_on_write_needs_a_free_block():
    bm, forks = _forked(2, 6, 2)  # the prompt's two blocks are the whole pool
    assert not bm.append(forks[0], 1) and forks[0].block_table == forks[1].block_table  # no change
    bm.free_seq(forks[1])
    assert bm.append(forks[0], 1) and bm.take_copies() == []  # the last holder writes in place
    bm.check_invariants([forks[0]])


@pytest.mark.parametrize("preset", ["tiny", "tiny-swa", "tiny-moe"])
@pytest.mark.parametrize("prompt_len", [13, 16])  # the last prompt block partly filled, or full
def test_forks_compute_the_models_logits(preset, prompt_len):
    """Four choices forced to different continuations: a write into the shared, partly filled block by one
    choice would show in the others' logits. tiny-swa (W = 8) frees shared blocks behind the window."""
    model = tiny_model(preset)
    prompt = random_seq(prompt_len, 3)
    continuations = [random_seq(n, 10 + n) for n in (9, 14, 5, 11)]
    engine = _engine(model)
    ours = forced_fork_logits(engine, prompt, continuations)
    for cont, logits in zip(continuations, ours):
        assert_logits_close(logits, full_logits(model, prompt + cont)[prompt_len - 1 : -1])
    # pre-fill once (prompt_len), then every choice computes its own tokens but the last
    assert engine.counters.computed_tokens == prompt_len + sum(len(c) - 1 for c in continuations)


@pytest.mark.parametrize("prompt_len", [1, 6])
def test_forks_on_the_static_decode_path(prompt_len):
    """decode_path="eager" (decode_graphs.py, the GPU's path at static shapes): a one-token prompt's only
    chunk is a decode-shaped step whose single logits row goes to every fork."""
    model = tiny_model("tiny")
    prompt = random_seq(prompt_len, 4)
    continuations = [random_seq(n, 50 + n) for n in (7, 3, 9)]
    engine = _engine(model, decode_path="eager")
    ours = forced_fork_logits(engine, prompt, continuations)
    assert engine.runner.decode.steps > 5
    for cont, logits in zip(continuations, ours):
        assert_logits_close(logits, full_logits(model, prompt + cont)[prompt_len - 1 : -1])


@pytest.mark.parametrize("preset", ["tiny", "tiny-swa"])
def test_n_samples_equal_separate_requests_with_derived_seeds(preset):
    """The gate: n = 4 with seed s gives the tokens, log-probs and finish reasons of 4 separate requests with
    seeds s .. s + 3, with the prompt computed once instead of 4 times."""
    model = tiny_model(preset)
    prompt = random_seq(11, 5)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=2**63 - 2, max_new_tokens=12, logprobs=True,
                            stop_token_ids=[7, 9, 11])
    shared = _engine(model, max_num_batched_tokens=64)
    ids = shared.add_samples(prompt, params, n=4, request_id="x")
    assert ids == ["x.0", "x.1", "x.2", "x.3"]
    ours = _run(shared, ids)
    alone = _engine(model, max_num_batched_tokens=64)  # all four pre-fill in one step: no prefix-cache hits
    seeds = [2**63 - 2, 2**63 - 1, 0, 1]  # mod 2**63
    theirs = _run(alone, [alone.add_request(prompt, SamplingParams(**{**vars(params), "seed": s})) for s in seeds])
    assert [(t, r) for t, _, r in ours] == [(t, r) for t, _, r in theirs]  # tokens and finish reasons
    for (_, a, _), (_, b, _) in zip(ours, theirs):  # log-probs: batches of other shapes round differently
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)
    assert len({tuple(t) for t, _, _ in ours}) == 4  # four different samples
    outputs = sum(len(t) for t, _, _ in ours)
    assert shared.counters.computed_tokens == len(prompt) + outputs - 4
    assert alone.counters.computed_tokens == 4 * len(prompt) + outputs - 4
    assert alone.counters.prefix_cache_hit_blocks == shared.counters.prefix_cache_hit_blocks == 0


def test_generate_with_n_is_prompt_major_and_greedy_choices_agree():
    model = tiny_model("tiny")
    prompts = [random_seq(n, n) for n in (3, 9)]
    greedy = SamplingParams(temperature=0, max_new_tokens=5)
    engine = _engine(model)
    outs = engine.generate(prompts, greedy, n=3)
    single = _engine(model).generate(prompts, greedy)
    assert outs == [single[0]] * 3 + [single[1]] * 3
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine.add_samples(prompts[0], greedy, n=9)
    with pytest.raises(ValueError, match="n must be"):
        engine.add_samples(prompts[0], greedy, n=0)
    engine.add_samples(prompts[0], greedy, n=2, request_id="a")
    with pytest.raises(ValueError, match="in use"):
        engine.add_samples(prompts[0], greedy, n=3, request_id="a")
    with pytest.raises(RequestRefused):
        _engine(model, max_waiting=3).add_samples(prompts[0], greedy, n=4)  # 4 requests > a queue of 3


def test_aborting_choices_before_and_after_the_fork():
    model = tiny_model("tiny")
    prompt = random_seq(30, 8)  # two pre-fill chunks of 16
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    expected = _engine(model).generate([prompt], params)[0]
    engine = _engine(model)
    ids = engine.add_samples(prompt, params, n=3)
    engine.step()  # first pre-fill chunk
    assert engine.abort(ids[0])  # before the fork: the others still get their samples
    outs = _run(engine, ids[1:])
    assert [t for t, _, _ in outs] == [expected, expected]
    assert engine.counters.kv_blocks_used == 0 and engine.counters.aborted == 1
    # every choice aborted before the fork: the prompt sequence ends with them, its blocks freed
    ids = engine.add_samples(prompt, params, n=2)
    engine.step()
    assert engine.counters.kv_blocks_used > 0
    assert engine.abort(ids[0]) and engine.abort(ids[1])
    assert engine.counters.kv_blocks_used == 0 and not engine.scheduler.running and not engine.has_unfinished()
    # after the fork: one choice aborted mid-decode, the other goes on
    ids = engine.add_samples(prompt, params, n=2)
    first = [t for _ in range(4) for out in engine.step() if out.request_id == ids[0] for t in out.new_token_ids]
    assert engine.abort(ids[1])
    assert 0 < len(first) < 6 and first + _run(engine, ids[:1])[0][0] == expected  # (prefix-cache hits)
    assert engine.counters.kv_blocks_used == 0


def test_preempted_forks_recompute_and_stay_correct():
    """A pool too small for four choices' outputs: choices are preempted after the fork, recomputed alone,
    and still compute the model's logits."""
    model = tiny_model("tiny")
    prompt = random_seq(10, 21)
    continuations = [random_seq(14, 30 + b) for b in range(4)]
    engine = _engine(model, num_blocks=12, watermark_blocks=0)
    ours = forced_fork_logits(engine, prompt, continuations)
    assert engine.counters.preemptions > 0
    for cont, logits in zip(continuations, ours):
        assert_logits_close(logits, full_logits(model, prompt + cont)[9:-1])


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "fork", "step", "step", "abort"]), st.integers(1, 20)),
                min_size=5, max_size=40),
       st.sampled_from(["tiny", "tiny-swa"]), st.integers(8, 24))
def test_random_traffic_with_forks_keeps_every_invariant(ops, preset, num_blocks):
    """Single requests and n-way requests arriving, stepping and being aborted in any order on a small pool:
    the invariants hold after every step, and at the end every block is free."""
    engine = _engine(tiny_model(preset), num_blocks=num_blocks, max_num_batched_tokens=8, max_num_seqs=4)
    ids = random_traffic(engine, ops)
    c = engine.counters
    assert c.kv_blocks_used == 0 and c.finished + c.aborted == len(ids)
