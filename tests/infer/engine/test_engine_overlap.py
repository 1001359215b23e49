"""Overlap (`LLMEngine(overlap=True)`): each step is queued before the previous step's ids are read, its
pending tokens fed on the device. The gate: token ids, finish reasons and log-probs equal those with overlap
off, greedy and seeded, through end-of-sequence, stop ids, max_new_tokens, abort, preemption, penalties and
n-way forks. On the CPU every operation runs at once, so these tests check the book-keeping exactly; the GPU
test (test_engine_gpu_speed.py) runs the same comparison on CUDA streams."""

import pytest

from engine_helpers import assert_same_outputs, forced_logits, mixed_workload, random_seq, serve
from infer_helpers import assert_logits_close, full_logits, tiny_model
from lmforge.infer.engine import LLMEngine
from lmforge.infer.engine.sequence import PENDING
from lmforge.infer.sampling import SamplingParams


def _engine(model, **kw):
    kw = {"block_size": 4, "num_blocks": 256, "max_num_batched_tokens": 16, "max_num_seqs": 8,
          "check_invariants": True, **kw}
    return LLMEngine(model, **kw)


@pytest.mark.parametrize("preset, num_blocks", [("tiny", 24), ("tiny-swa", 18)])
def test_overlap_gives_the_outputs_of_steps_one_at_a_time(preset, num_blocks):
    model = tiny_model(preset)
    reqs = mixed_workload()
    # stop ids that really occur: tokens taken from a first run without any
    probe = serve(_engine(model), reqs)
    eos, stop = probe["r0"][0][3], probe["r5"][0][2]
    reqs = [(t, p, SamplingParams(**{**vars(s), "stop_token_ids": [stop]}), n) for t, p, s, n in reqs]
    runs = {}
    for overlap in (False, True):
        engine = _engine(model, num_blocks=num_blocks, eos_id=eos, overlap=overlap, watermark_blocks=0)
        runs[overlap] = serve(engine, reqs, abort=("r8", 4))
        runs[overlap, "preemptions"] = engine.counters.preemptions
    assert_same_outputs(runs[True], runs[False])
    reasons = [r for _, _, _, r in runs[True].values()]
    assert {"stop", "length", "abort"} <= set(reasons), reasons  # every way of finishing happened
    assert runs[True, "preemptions"] > 0 and runs[False, "preemptions"] > 0
    assert len(runs[True]["r8"][0]) == 4


def test_the_step_in_flight_feeds_its_tokens_on_the_device():
    """With overlap, a decode step's input token is still PENDING on the host when the step is prepared."""
    model = tiny_model("tiny")
    engine = _engine(model, overlap=True)
    engine.add_request(random_seq(5, 1), SamplingParams(temperature=0, max_new_tokens=4))
    assert engine.step() == []  # the pre-fill is queued; its token comes with the next call
    assert engine.scheduler.running[0].output_ids == [PENDING]
    first = engine.step()  # queues the first decode (fed the pending token), then reads the pre-fill's token
    assert [o.new_token_ids for o in first] == [engine.scheduler.running[0].output_ids[:1]]
    assert engine.scheduler.running[0].output_ids[1] == PENDING
    outs = first + [o for _ in range(4) for o in engine.step()]
    assert [o.num_output_tokens for o in outs] == [1, 2, 3, 4] and outs[-1].finish_reason == "length"
    expected = _engine(model).generate([random_seq(5, 1)], SamplingParams(temperature=0, max_new_tokens=4))[0]
    assert [t for o in outs for t in o.new_token_ids] == expected
    assert not engine.has_unfinished()


def test_a_stop_token_voids_the_token_in_flight():
    """The step after a stop token was already queued: its token for that request is dropped, the request's
    blocks are freed, and nothing more is reported for it."""
    model = tiny_model("tiny")
    prompt = random_seq(6, 2)
    greedy = SamplingParams(temperature=0, max_new_tokens=20)
    tokens = _engine(model).generate([prompt], greedy)[0]
    engine = _engine(model, eos_id=tokens[2], overlap=True)
    rid = engine.add_request(prompt, greedy)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.new_token_ids[0] for o in outs] == tokens[:3] and outs[-1].finish_reason == "stop"
    assert engine.counters.generation_tokens == 3 and engine.counters.kv_blocks_used == 0
    assert engine.counters.computed_tokens == 6 + 3  # the pre-fill, 2 decodes, and the one computed for nothing
    assert rid not in engine.seqs


def test_teacher_forcing_and_weight_updates_with_overlap_on():
    """`_forward` / `_advance` (teacher forcing) never leave a step in flight; `load_weights` resolves the one
    in flight first, so its outputs still come, and every later token uses the new weights."""
    model = tiny_model("tiny")
    seqs, prompts = [random_seq(20, 70 + b) for b in range(3)], [4, 9, 6]
    for seq, P, logits in zip(seqs, prompts, forced_logits(_engine(model, overlap=True), seqs, prompts)):
        assert_logits_close(logits, full_logits(model, seq)[P - 1 : -1])
    copy = type(model)(model.config).eval()
    copy.load_state_dict(model.state_dict())
    engine = _engine(copy, overlap=True)
    rid = engine.add_request(seqs[0][:5], SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True))
    engine.step()
    engine.load_weights(model.state_dict())  # the same weights: outputs must not change
    outs = [o for _ in range(5) for o in engine.step()]
    expected = _engine(model).generate([seqs[0][:5]], SamplingParams(temperature=0, max_new_tokens=3))[0]
    assert [t for o in outs for t in o.new_token_ids] == expected and outs[-1].request_id == rid
