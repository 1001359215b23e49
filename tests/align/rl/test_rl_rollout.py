"""Rollouts through LLMEngine and the trainer's log-probabilities of them: the engine's log-probs of the sampled
tokens equal the trainer's forward (<= 1e-5, fp32); padding and batching change nothing; answers depend on
their seed only; after load_weights the engine samples from the updated policy; filtered sampling is refused."""

import dataclasses

import pytest
import torch
from helpers import unit_scale_

from lmforge import ModelConfig, Transformer
from lmforge.align.rollout import (
    RolloutConfig,
    RolloutConfigError,
    Sample,
    batch_of,
    make_engine,
    response_logprobs,
    rollout,
    sync_engine,
)
from lmforge.infer.sampling import SamplingParams

PROMPTS = [[1, 5, 9, 13], [1, 7, 2 + 40, 8, 11, 30, 31], [1, 100], [1, 3, 4, 5, 6, 7, 8, 9, 10]]


def policy(seed=0):
    torch.manual_seed(seed)
    return unit_scale_(Transformer(ModelConfig.from_name("tiny"))).eval()


def test_the_batch_layout_worked_example():
    b = batch_of([Sample(0, 0, [1, 5, 9], [7, 2], "stop"), Sample(1, 0, [1, 5, 9, 4, 4], [3], "length")])
    assert b.tokens.tolist() == [[1, 5, 9, 7, 2, 0], [1, 5, 9, 4, 4, 3]]
    assert b.index.tolist() == [[2, 3], [4, 4]] and b.targets.tolist() == [[7, 2], [3, 0]]
    assert b.mask.tolist() == [[True, True], [True, False]]
    one = b.rows([1])  # trimmed to its own longest row and answer
    assert one.tokens.tolist() == [[1, 5, 9, 4, 4, 3]] and one.index.tolist() == [[4]] and one.targets.tolist() == [[3]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_equal_the_trainers_forward(temperature):
    """The engine's log-probs are of the raw logits whatever the temperature: they equal the trainer's
    log_softmax(logits / 1) of the same tokens; the trainer's log_softmax(logits / T) is another number at T != 1."""
    model = policy()
    engine = make_engine(model, eos_id=2, batch_size=4, max_prompts=16)
    params = SamplingParams(temperature=temperature, max_new_tokens=12, logprobs=True, seed=3)
    samples = rollout(engine, PROMPTS, params, n=2)
    assert [(s.prompt, s.choice) for s in samples] == [(b, k) for b in range(4) for k in range(2)]
    batch = batch_of(samples)
    with torch.no_grad():
        raw, _ = response_logprobs(model, batch, 1.0)
        scaled, _ = response_logprobs(model, batch, temperature)
    engine_lp = torch.zeros_like(raw)
    for b, s in enumerate(samples):
        engine_lp[b, : len(s.engine_logprobs)] = torch.tensor(s.engine_logprobs)
    torch.testing.assert_close(raw, engine_lp, rtol=0, atol=1e-5)
    assert batch.mask.sum() > 40 and (raw - engine_lp).abs().max() < 1e-5
    assert ((scaled - raw).abs().max() > 1e-2) == (temperature != 1.0)


def test_padding_and_batching_change_no_logprob():
    model = policy()
    samples = rollout(make_engine(model, 2, 4, 16), PROMPTS, SamplingParams(max_new_tokens=10, seed=1))
    batch = batch_of(samples)
    with torch.no_grad():
        together, entropy = response_logprobs(model, batch, 0.9, with_entropy=True)
        for b in range(len(samples)):
            alone, ent_alone = response_logprobs(model, batch_of([samples[b]]), 0.9, with_entropy=True)
            n = int(batch.mask[b].sum())
            torch.testing.assert_close(together[b, :n], alone[0, :n], rtol=0, atol=1e-5)
            torch.testing.assert_close(entropy[b, :n], ent_alone[0, :n], rtol=0, atol=1e-5)
    assert (together[~batch.mask] == 0).all() and (entropy[batch.mask] > 0).all()


def test_an_answer_depends_on_its_seed_only():
    model = policy()
    engine = make_engine(model, 2, 4, 16)
    params = SamplingParams(max_new_tokens=10, seed=0)
    together = rollout(engine, PROMPTS, params, n=2, seeds=[100, 200, 300, 400])
    alone = rollout(engine, [PROMPTS[2]], params, n=2, seeds=[300])
    assert [s.response_ids for s in alone] == [s.response_ids for s in together[4:6]]
    assert together[4].response_ids != together[5].response_ids  # choice 1 is seeded 301
    # n answers share one pre-fill (add_samples) and are the answers of n separate requests seeded seed + k
    single = rollout(engine, [PROMPTS[2]], params, n=1, seeds=[301])
    assert single[0].response_ids == together[5].response_ids
    again = rollout(engine, PROMPTS, params, n=2, seeds=[100, 200, 300, 400])
    assert [s.response_ids for s in again] == [s.response_ids for s in together]


def test_after_load_weights_the_engine_samples_from_the_updated_policy():
    old, new = policy(0), policy(1)  # the "update": other weights of the same shapes
    engine = make_engine(old, 2, 4, 16)
    params = SamplingParams(max_new_tokens=12, logprobs=True, seed=5)
    before = rollout(engine, PROMPTS, params)
    sync_engine(engine, new)
    after = rollout(engine, PROMPTS, params)
    assert [s.response_ids for s in before] != [s.response_ids for s in after]
    with torch.no_grad():
        for model, samples in ((old, before), (new, after)):
            lp, _ = response_logprobs(model, batch_of(samples), 1.0)
            engine_lp = torch.tensor([x for s in samples for x in s.engine_logprobs])
            torch.testing.assert_close(lp[batch_of(samples).mask], engine_lp, rtol=0, atol=1e-5)
    # and greedy decoding of the engine is the new model's own greedy continuation
    greedy = rollout(engine, PROMPTS[:1], SamplingParams(temperature=1e-4, max_new_tokens=6, seed=0))[0].response_ids
    ids = list(PROMPTS[0])
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(new(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == ids[len(PROMPTS[0]) :]


@pytest.mark.parametrize("field,value", [("top_k", 5), ("top_p", 0.9), ("min_p", 0.1), ("repetition_penalty", 1.2),
                                         ("frequency_penalty", 0.5), ("presence_penalty", 0.5), ("temperature", 0.0)])
def test_filters_and_penalties_are_refused(field, value):
    with pytest.raises(RolloutConfigError, match=f"rollout.{field}"):
        RolloutConfig(**{field: value})
    engine = make_engine(policy(), 2, 4, 16)
    with pytest.raises(RolloutConfigError, match=field):
        rollout(engine, PROMPTS, dataclasses.replace(SamplingParams(seed=0), **{field: value}))


def test_rollouts_run_with_the_garbage_collector_paused_and_restore_it(monkeypatch):
    """`collect` (PPO's and GRPO's rollouts) pauses Python's cyclic collector while the engine runs and leaves
    it as it found it, on or off, also when the rollout raises."""
    import gc

    from lmforge.align import rl_iteration

    seen = []

    def fake_rollout(*args, **kwargs):
        seen.append(gc.isenabled())
        return [Sample(0, 0, [1], [5], "stop")]

    class Tok:
        def decode(self, ids):
            return " answer "

    monkeypatch.setattr(rl_iteration, "rollout", fake_rollout)

    class Plan:  # what collect reads of an IterationPlan
        prompts, n, seeds = [0], 1, [7]

    was = gc.isenabled()
    try:
        gc.enable()
        samples, texts = rl_iteration.collect(None, Tok(), [[1]], Plan(), RolloutConfig())
        assert seen == [False] and gc.isenabled() and texts == ["answer"]
        gc.disable()
        rl_iteration.collect(None, Tok(), [[1]], Plan(), RolloutConfig())
        assert seen == [False, False] and not gc.isenabled()  # off before: still off
        gc.enable()
        monkeypatch.setattr(rl_iteration, "rollout", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            rl_iteration.collect(None, Tok(), [[1]], Plan(), RolloutConfig())
        assert gc.isenabled()
    finally:
        gc.enable() if was else gc.disable()
