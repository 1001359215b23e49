"""The engine's gates on tiny random models, comparing teacher-forced logits (<= 1e-5), not greedy tokens."""

import asyncio

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_helpers import forced_logits, random_seq, random_traffic
from helpers import unit_scale_
from infer_helpers import assert_logits_close, cached_logits, full_logits, tiny_model
from lmforge import ModelConfig, Transformer
from lmforge.infer.engine import LLMEngine, RefusalReason, RequestRefused
from lmforge.infer.sampling import SamplingParams


def _engine(model, **kw):
    kw = {"block_size": 4, "num_blocks": 256, "max_num_batched_tokens": 16, "max_num_seqs": 8,
          "check_invariants": True, **kw}
    return LLMEngine(model, **kw)


def _random_model(config, seed):
    """Like infer_helpers.tiny_model: unit-scale weights, so that a wrong key shows far above 1e-5."""
    torch.manual_seed(seed)
    return unit_scale_(Transformer(config).eval())


def _mixed(n_seqs=7, seed=0):
    """Sequences of mixed prompt and output lengths."""
    g = torch.Generator().manual_seed(seed)
    seqs, prompts = [], []
    for b in range(n_seqs):
        P = int(torch.randint(1, 30, (1,), generator=g))
        O = int(torch.randint(1, 12, (1,), generator=g))
        seqs.append(random_seq(P + O, seed * 100 + b))
        prompts.append(P)
    return seqs, prompts


@pytest.mark.parametrize("preset", ["tiny", "tiny-swa", "tiny-moe"])
@pytest.mark.parametrize("attention", ["reference", "padded", "varlen"])
def test_concurrent_requests_equal_each_request_alone(preset, attention):
    """Many mixed-length requests share the steps (chunked pre-fill next to decodes); every request's logits
    equal the model's own without any cache, hence also those of the request run alone."""
    model = tiny_model(preset)
    seqs, prompts = _mixed()
    batched = forced_logits(_engine(model, attention=attention), seqs, prompts)
    for seq, P, ours in zip(seqs, prompts, batched):
        assert_logits_close(ours, full_logits(model, seq)[P - 1 : -1])
    alone = forced_logits(_engine(model, attention=attention), seqs[2:3], prompts[2:3])[0]
    assert_logits_close(batched[2], alone)


def test_paged_cache_equals_contiguous_cache():
    model = tiny_model("tiny")
    seq = random_seq(30, 5)
    (contiguous,), _ = cached_logits(model, [seq], [12], chunk=5, kind="contiguous")
    (paged,) = forced_logits(_engine(model), [seq], [12])
    assert_logits_close(paged, contiguous[11:-1])


@pytest.mark.parametrize("preset, num_blocks", [("tiny", 12), ("tiny-swa", 8)])
def test_preemption_and_resume_give_the_same_logits(preset, num_blocks):
    """Four requests of up to 26 tokens (7 blocks of 4; a window model holds at most 6) in a pool too small
    for all of them at once: requests are preempted, recomputed, and still give the model's logits."""
    model = tiny_model(preset)
    seqs, prompts = [random_seq(26 - b, 60 + b) for b in range(4)], [6, 5, 7, 6]
    engine = _engine(model, num_blocks=num_blocks, max_num_batched_tokens=12, max_num_seqs=4)
    ours = forced_logits(engine, seqs, prompts)
    assert engine.counters.preemptions > 0, "the pool was meant to be too small for all at once"
    for seq, P, logits in zip(seqs, prompts, ours):
        assert_logits_close(logits, full_logits(model, seq)[P - 1 : -1])


def test_shared_prefixes_are_computed_once_and_stay_correct():
    model = tiny_model("tiny")
    system = random_seq(13, 7)  # a shared "system prompt" of 3 full blocks + 1 token
    seqs = [system + random_seq(6 + b, 20 + b) for b in range(4)]
    prompts = [len(system) + 2] * 4
    engine = _engine(model, max_num_batched_tokens=64)
    first = forced_logits(engine, seqs[:1], prompts[:1])  # fills the prefix cache
    rest = forced_logits(engine, seqs[1:], prompts[1:])
    assert engine.counters.prefix_cache_hit_blocks >= 3 * 3
    for seq, P, logits in zip(seqs, prompts, first + rest):
        assert_logits_close(logits, full_logits(model, seq)[P - 1 : -1])
    # A prompt of exactly 4 blocks that is wholly cached: 3 blocks are shared, its last block recomputed.
    seq = seqs[0][:16] + random_seq(5, 99)
    hits = engine.counters.prefix_cache_hit_blocks
    again = forced_logits(engine, [seqs[0][:16] + seqs[0][16:17], seq], [16, 16])
    assert engine.counters.prefix_cache_hit_blocks >= hits + 3
    assert_logits_close(again[1], full_logits(model, seq)[15:-1])


def test_greedy_generation_matches_the_model():
    model = tiny_model("tiny")
    prompts = [random_seq(n, n) for n in (3, 11, 6)]
    outs = _engine(model).generate(prompts, SamplingParams(temperature=0, max_new_tokens=6))
    for prompt, out in zip(prompts, outs):
        seq = list(prompt)
        for _ in range(6):
            seq.append(int(full_logits(model, seq)[-1].argmax()))
        assert out == seq[len(prompt) :]


def test_seeded_sampling_is_the_same_alone_and_batched():
    model = tiny_model("tiny")
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_new_tokens=10, repetition_penalty=1.3)
    prompt = random_seq(9, 3)
    alone = _engine(model).generate([prompt], params)[0]
    others = [random_seq(n, 40 + n) for n in (4, 17, 2)]
    mixed = [SamplingParams(max_new_tokens=7), params] + [SamplingParams(max_new_tokens=5)] * 2
    batched = _engine(model).generate([others[0], prompt, *others[1:]], mixed)
    assert batched[1] == alone and len(alone) == 10


def test_abort_frees_every_block_at_any_time():
    model = tiny_model("tiny")
    engine = _engine(model)
    ids = [engine.add_request(random_seq(n, n), SamplingParams(max_new_tokens=50)) for n in (5, 25, 9)]
    engine.step()
    assert engine.abort(ids[1])  # mid pre-fill
    engine.step()
    engine.step()
    assert engine.abort(ids[0])  # decoding
    assert engine.abort(ids[2]) and not engine.abort(ids[2])
    assert engine.counters.kv_blocks_used == 0 and not engine.has_unfinished()
    engine.block_manager.check_invariants([])
    waiting = engine.add_request([1, 2, 3])
    assert engine.abort(waiting) and engine.counters.aborted == 4


def test_sliding_window_blocks_stay_bounded_over_long_generations():
    model = tiny_model("tiny-swa")  # W = 8
    engine = _engine(model, max_num_batched_tokens=16)
    seq = random_seq(240, 9)  # 30 times the window
    peak = []

    def record(engine, step):
        peak.append(max((sum(b >= 0 for b in s.block_table) for s in engine.scheduler.running), default=0))

    (ours,) = forced_logits(engine, [seq], [20], before_step=record)
    assert max(peak) <= -(-(8 - 1 + 16) // 4) + 1
    assert_logits_close(ours, full_logits(model, seq)[19:-1])


def test_score_equals_the_models_log_softmax():
    model = tiny_model("tiny-moe")
    seqs = [random_seq(n, n) for n in (2, 17, 40, 9)]
    engine = _engine(model)
    scores = engine.score(seqs, max_tokens_per_forward=50)  # forces several packed forwards
    for seq, ours in zip(seqs, scores):
        logp = full_logits(model, seq).log_softmax(-1)[:-1]  # (T - 1, V)
        expected = logp.gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
        assert ours.shape == (len(seq) - 1,)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def _old_copy_and_new(seed):
    """The tiny model, a copy of it for the engine to update in place, and another random model."""
    old = tiny_model("tiny")
    model = Transformer(old.config).eval()
    model.load_state_dict(old.state_dict())
    return old, model, _random_model(old.config, seed=seed)


def test_weight_update_changes_outputs_to_the_new_models():
    old, model, new = _old_copy_and_new(seed=7)
    engine = _engine(model)
    seq = random_seq(20, 4)
    rid = engine.add_request(seq[:8], SamplingParams(temperature=0, max_new_tokens=30))
    engine.step()  # part-way: this request's cached K/V belong to the old weights
    engine.load_weights(new)
    engine.abort(rid)
    (after,) = forced_logits(engine, [seq], [8])
    assert_logits_close(after, full_logits(new, seq)[7:-1])
    assert (after - full_logits(old, seq)[7:-1]).abs().max() > 1.0
    with pytest.raises(ValueError, match="missing"):
        engine.load_weights({"output.weight": new.output.weight})


def test_weight_update_mid_generation_recomputes_with_new_weights():
    old, model, new = _old_copy_and_new(seed=8)
    engine = _engine(model)
    seq = random_seq(20, 4)

    def swap(engine, step):
        if step == 3:
            engine.load_weights(new.state_dict())

    logits = forced_logits(engine, [seq], [8], before_step=swap)[0]
    # Steps 0..2 (pre-fill of 8 tokens, then 2 decodes) gave 3 rows with the old weights; every later row
    # is the new model's, with no stale old-weight keys mixed in (the request was recomputed).
    assert_logits_close(logits[:3], full_logits(old, seq)[7:10])
    assert_logits_close(logits[3:], full_logits(new, seq)[10:-1])


def test_streams_run_concurrently_and_leaving_early_aborts():
    model = tiny_model("tiny")
    engine = _engine(model)
    prompts = [random_seq(n, n) for n in (3, 12, 7)]
    expected = _engine(model).generate(prompts, SamplingParams(temperature=0, max_new_tokens=5))

    async def consume(prompt, stop_after=None):
        tokens = []
        async for out in engine.stream(prompt, SamplingParams(temperature=0, max_new_tokens=5)):
            tokens += out.new_token_ids
            if stop_after is not None and len(tokens) >= stop_after:
                break
        return tokens

    async def main():
        return await asyncio.gather(*(consume(p) for p in prompts), consume(random_seq(4, 1), stop_after=2))

    *results, early = asyncio.run(main())
    assert results == expected and len(early) == 2
    assert engine.counters.aborted == 1 and engine.counters.kv_blocks_used == 0


def test_load_hundreds_of_small_requests_none_lost_or_duplicated():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=64)).eval()
    engine = LLMEngine(model, block_size=4, num_blocks=40, max_num_batched_tokens=32, max_num_seqs=16,
                       max_waiting=50, check_invariants=True)
    g = torch.Generator().manual_seed(0)
    accepted: dict[str, int] = {}
    received: dict[str, list[int]] = {}
    finished: list[str] = []
    refused = 0
    for i in range(400):
        n_out = int(torch.randint(1, 6, (1,), generator=g))
        prompt = torch.randint(0, 64, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist()
        try:
            rid = engine.add_request(prompt, SamplingParams(max_new_tokens=n_out, ignore_eos=True, seed=i))
            accepted[rid] = n_out
        except RequestRefused as e:
            assert e.reason is RefusalReason.QUEUE_FULL
            refused += 1
        if i % 8 == 0:  # requests arrive faster than they are served
            for out in engine.step():
                received.setdefault(out.request_id, []).extend(out.new_token_ids)
                finished += [out.request_id] if out.finished else []
    while engine.has_unfinished():
        for out in engine.step():
            received.setdefault(out.request_id, []).extend(out.new_token_ids)
            finished += [out.request_id] if out.finished else []
    assert refused > 0 and len(accepted) > 100
    assert engine.counters.refused == {"queue_full": refused}
    assert sorted(finished) == sorted(accepted)  # each accepted request finished exactly once
    assert {rid: len(t) for rid, t in received.items()} == accepted
    assert engine.counters.kv_blocks_used == 0 and engine.counters.finished == len(accepted)


def test_finish_reasons_stop_length_and_context():
    model = tiny_model("tiny")  # max_seq_len 256, no window
    prompt = random_seq(5, 11)
    greedy = _engine(model).generate([prompt], SamplingParams(temperature=0, max_new_tokens=4))[0]
    engine = _engine(model, eos_id=greedy[2])
    stop = engine.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=10))
    ignore = engine.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    by_id = {}
    while engine.has_unfinished():
        for out in engine.step():
            by_id.setdefault(out.request_id, []).append(out)
    assert [o.new_token_ids[0] for o in by_id[stop]] == greedy[:3] and by_id[stop][-1].finish_reason == "stop"
    assert len(by_id[ignore]) == 4 and by_id[ignore][-1].finish_reason == "length"
    long = _engine(model, num_blocks=80)
    rid = long.add_request(random_seq(250, 12), SamplingParams(max_new_tokens=100, ignore_eos=True))
    outs = []
    while long.has_unfinished():
        outs += [o for o in long.step() if o.request_id == rid]
    assert len(outs) == 6 and outs[-1].finish_reason == "length"  # 250 + 6 = the 256-token context
    with pytest.raises(ValueError, match="context"):
        long.add_request(random_seq(256, 13))


def test_logprobs_are_the_models():
    model = tiny_model("tiny")
    seq = random_seq(9, 14)
    engine = _engine(model)
    rid = engine.add_request(seq, SamplingParams(temperature=0, max_new_tokens=3, logprobs=True, top_logprobs=2))
    outs = [o for _ in range(5) for o in engine.step()]
    full = list(seq)
    for o in outs:
        logp = full_logits(model, full)[-1].log_softmax(-1)
        token = o.new_token_ids[0]
        assert abs(o.new_logprobs[0] - logp[token].item()) < 1e-5
        assert [t for t, _ in o.new_top_logprobs[0]] == logp.topk(2).indices.tolist()
        full.append(token)
    assert outs[-1].request_id == rid and outs[-1].finished


def test_capacity_refusal_and_bad_requests():
    engine = _engine(tiny_model("tiny"), num_blocks=4)
    with pytest.raises(RequestRefused) as err:
        engine.add_request(random_seq(10, 1), SamplingParams(max_new_tokens=20))  # 30 tokens > 4 blocks of 4
    assert err.value.reason is RefusalReason.EXCEEDS_KV_CAPACITY
    assert engine.counters.refused == {"exceeds_kv_capacity": 1}
    for bad, match in (([], "empty"), ([512], "vocabulary"), ([1, -1], "vocabulary")):
        with pytest.raises(ValueError, match=match):
            engine.add_request(bad)
    with pytest.raises(ValueError, match="stop strings"):
        engine.add_request([1], SamplingParams(stop=["x"]))
    engine.add_request([1], SamplingParams(max_new_tokens=2), request_id="a")
    with pytest.raises(ValueError, match="in use"):
        engine.add_request([1], SamplingParams(max_new_tokens=2), request_id="a")


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "add", "step", "step", "abort"]), st.integers(1, 20)),
                min_size=5, max_size=40),
       st.sampled_from(["tiny", "tiny-swa"]), st.integers(6, 20))
def test_random_traffic_with_aborts_keeps_every_invariant(ops, preset, num_blocks):
    """Arrivals, steps and aborts in any order on a small pool (preemptions happen): the block manager's
    invariants hold after every step (check_invariants=True), and at the end every block is free."""
    engine = _engine(tiny_model(preset), num_blocks=num_blocks, max_num_batched_tokens=8, max_num_seqs=4)
    ids = random_traffic(engine, ops)
    assert engine.counters.kv_blocks_used == 0
    c = engine.counters
    assert c.finished + c.aborted == len(ids)


@pytest.mark.parametrize("n", [1, 3])
def test_generate_runs_more_prompts_than_the_queue_holds(n):
    """`generate` is offline: 12 prompts (36 requests at n = 3) through a queue of 4 give every prompt its
    outputs, the same as through a queue that holds them all (seeded sampling: outputs depend on the seed only)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=64)).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 64, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(12)]
    params = [SamplingParams(temperature=1.0, max_new_tokens=5, ignore_eos=True, seed=i) for i in range(12)]
    small = _engine(model, max_waiting=4).generate(prompts, params, n=n)
    large = _engine(model, max_waiting=1024).generate(prompts, params, n=n)
    assert len(small) == 12 * n and all(len(o) == 5 for o in small)
    assert small == large
    with pytest.raises(RequestRefused):  # a queue smaller than one prompt's n samples still refuses
        _engine(model, max_waiting=2).generate(prompts[:1], params[:1], n=3)
