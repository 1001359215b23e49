"""Sampling: parameter validation, filters on hand-built distributions, penalty formulas, seeds."""

import math

import pytest
import torch

from lmforge.infer.sampling import (
    SamplingBatch,
    SamplingParams,
    SamplingParamsError,
    apply_penalties,
    min_p_filter,
    sample,
    top_k_top_p_filter,
)

PROBS = [0.1, 0.5, 0.25, 0.15]


def _logits(probs=PROBS, rows=1):
    return torch.tensor(probs).log().repeat(rows, 1)


def _kept(logits):
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("temperature", -0.1, r"temperature must be >= 0 \(0 = greedy\), got -0.1"),
        ("temperature", float("nan"), "temperature must be a finite number"),
        ("top_k", -1, r"top_k must be >= 0 \(0 = off\), got -1"),
        ("top_k", 2.5, "top_k must be an integer"),
        ("top_p", 0.0, r"top_p must be in \(0, 1\] \(1 = off\), got 0.0"),
        ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
        ("min_p", -0.5, r"min_p must be in \[0, 1\] \(0 = off\)"),
        ("repetition_penalty", 0.0, r"repetition_penalty must be > 0 \(1 = off\), got 0.0"),
        ("frequency_penalty", 2.5, r"frequency_penalty must be in \[-2, 2\]"),
        ("presence_penalty", -3, r"presence_penalty must be in \[-2, 2\]"),
        ("seed", -1, r"seed must be None or an integer in \[0, 2\*\*63\)"),
        ("stop", ["ok", ""], "stop must be a list of non-empty strings"),
        ("stop_token_ids", [2, -1], "stop_token_ids must be a list of integers >= 0"),
        ("max_new_tokens", 0, "max_new_tokens must be >= 1, got 0"),
        ("top_logprobs", 21, r"top_logprobs must be in \[0, 20\], got 21"),
    ],
)
def test_invalid_values_name_the_field_and_range(field, value, message):
    kwargs = {field: value, "logprobs": True} if field == "top_logprobs" else {field: value}
    with pytest.raises(SamplingParamsError, match=message):
        SamplingParams(**kwargs)
    assert issubclass(SamplingParamsError, ValueError)


def test_top_logprobs_needs_logprobs_and_a_single_stop_string_is_a_list():
    with pytest.raises(SamplingParamsError, match="top_logprobs must be 0 unless logprobs=True"):
        SamplingParams(top_logprobs=3)
    assert SamplingParams(stop="###").stop == ["###"]


def test_top_k():
    assert _kept(top_k_top_p_filter(_logits(), torch.tensor([2]), None)) == {1, 2}
    assert _kept(top_k_top_p_filter(_logits(), torch.tensor([1]), None)) == {1}
    assert _kept(top_k_top_p_filter(_logits(), torch.tensor([0]), None)) == {0, 1, 2, 3}  # 0 = off
    assert _kept(top_k_top_p_filter(_logits(), torch.tensor([9]), None)) == {0, 1, 2, 3}  # k > V


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # sorted 0.5, 0.25, 0.15, 0.1; mass before each: 0, 0.5, 0.75, 0.9
    assert _kept(top_k_top_p_filter(_logits(), None, torch.tensor([0.3]))) == {1}
    assert _kept(top_k_top_p_filter(_logits(), None, torch.tensor([0.7]))) == {1, 2}
    assert _kept(top_k_top_p_filter(_logits(), None, torch.tensor([0.8]))) == {1, 2, 3}
    assert _kept(top_k_top_p_filter(_logits(), None, torch.tensor([1.0]))) == {0, 1, 2, 3}
    # after top-k = 3 the distribution is renormalised: 0.5/0.9, 0.25/0.9, 0.15/0.9 = 0.56, 0.28, 0.17
    assert _kept(top_k_top_p_filter(_logits(), torch.tensor([3]), torch.tensor([0.8]))) == {1, 2}


def test_min_p_is_relative_to_the_top_probability():
    logits = _logits([0.6, 0.3, 0.06, 0.04])
    assert _kept(min_p_filter(logits, torch.tensor([0.15]))) == {0, 1}  # threshold 0.09
    assert _kept(min_p_filter(logits, torch.tensor([0.05]))) == {0, 1, 2, 3}  # threshold 0.03
    assert _kept(min_p_filter(logits, torch.tensor([0.0]))) == {0, 1, 2, 3}


def test_filters_apply_per_row():
    logits = _logits(rows=3)
    out = top_k_top_p_filter(logits, torch.tensor([1, 0, 3]), torch.tensor([1.0, 0.7, 1.0]))
    assert [set(torch.isfinite(r).nonzero().flatten().tolist()) for r in out] == [{1}, {1, 2}, {1, 2, 3}]


def test_penalties_worked_example():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    prompt = torch.tensor([[True, False, False]])
    counts = torch.tensor([[0, 2, 0]])
    out = apply_penalties(logits, prompt, counts, torch.tensor([2.0]), torch.tensor([0.1]), torch.tensor([0.5]))
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.7, 0.5]]))
    # without the repetition penalty (no prompt mask), only frequency and presence
    out = apply_penalties(logits, None, counts, torch.tensor([1.0]), torch.tensor([0.1]), torch.tensor([0.5]))
    torch.testing.assert_close(out, torch.tensor([[2.0, -1.7, 0.5]]))


def test_penalties_follow_generated_tokens():
    params = SamplingParams(temperature=0, presence_penalty=2.0)
    batch = SamplingBatch([params], [[0]], 3, "cpu")
    logits = torch.tensor([[3.0, 2.0, 0.5]])
    assert sample(logits, batch).tokens.item() == 0  # first pick: the best logit
    assert sample(logits, batch).tokens.item() == 1  # 0 was generated: 3 - 2 < 2
    assert sample(logits, batch).tokens.item() == 0  # both penalised: 1 vs 0
    rep = SamplingBatch([SamplingParams(temperature=0, repetition_penalty=4.0)], [[0]], 3, "cpu")
    assert sample(logits, rep).tokens.item() == 1  # 0 is in the prompt: 3 / 4 < 2


def _frequencies(params, logits, n=4000):
    batch = SamplingBatch([params] * n, [[0]] * n, logits.shape[-1], "cpu")
    tokens = sample(logits.repeat(n, 1), batch).tokens
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / n


def test_sampling_follows_the_distribution_and_temperature():
    torch.manual_seed(0)
    logits = _logits()
    # 4000 draws: the standard error of a frequency is at most 0.008, so 0.03 is about four of them
    torch.testing.assert_close(_frequencies(SamplingParams(temperature=1.0), logits), torch.tensor(PROBS), atol=0.03, rtol=0)
    sharp = torch.tensor(PROBS) ** 2 / (torch.tensor(PROBS) ** 2).sum()  # temperature 0.5: p^2, renormalised
    torch.testing.assert_close(_frequencies(SamplingParams(temperature=0.5), logits), sharp, atol=0.03, rtol=0)
    freq = _frequencies(SamplingParams(top_k=2), logits)
    assert freq[0] == 0 and freq[3] == 0
    torch.testing.assert_close(freq[1:3], torch.tensor([2 / 3, 1 / 3]), atol=0.03, rtol=0)


def test_greedy_and_sampled_rows_in_one_batch():
    logits = _logits(rows=3)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(temperature=0, top_k=3)]
    tokens = sample(logits, SamplingBatch(params, [[0]] * 3, 4, "cpu")).tokens
    assert tokens.tolist() == [1, 1, 1]


def test_seeds_are_reproducible_and_independent_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)

    def draws(params_list, row, steps=20):
        batch = SamplingBatch(params_list, [[0]] * len(params_list), 50, "cpu")
        return [sample(logits.repeat(len(params_list), 1), batch).tokens[row].item() for _ in range(steps)]

    alone = draws([SamplingParams(seed=7)], 0)
    assert draws([SamplingParams(seed=7)], 0) == alone
    assert draws([SamplingParams(), SamplingParams(seed=7), SamplingParams(seed=8)], 1) == alone
    assert draws([SamplingParams(seed=8)], 0) != alone
    assert len(set(alone)) > 3  # really sampling, not a constant


def test_logprobs_are_the_models_and_top_logprobs_sorted():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    params = SamplingParams(temperature=0, logprobs=True, top_logprobs=2, repetition_penalty=1.5)
    out = sample(logits, SamplingBatch([params], [[1]], 4, "cpu"))
    logp = logits.log_softmax(-1)
    # token 1 is in the prompt: 3 / 1.5 = 2 ties with token 2, argmax picks the first; log-probs stay raw
    assert out.tokens.tolist() == [1]
    assert math.isclose(out.logprobs.item(), logp[0, 1].item(), rel_tol=1e-6)
    assert out.top_ids.tolist() == [[1, 2]]
    torch.testing.assert_close(out.top_logprobs, logp[:, [1, 2]])


def test_given_generators_are_used_and_counted():
    params = [SamplingParams(seed=1), SamplingParams()]
    with pytest.raises(ValueError, match="1 generators for 2 rows"):
        SamplingBatch(params, [[0], [0]], 8, "cpu", generators=[None])
    logits = torch.zeros(2, 1000)  # uniform: the token is the generator's draw

    def first_token(seed: int) -> int:
        batch = SamplingBatch(params, [[0], [0]], 1000, "cpu", [torch.Generator().manual_seed(seed), None])
        return int(sample(logits, batch).tokens[0])

    assert first_token(5) == first_token(5)
    assert len({first_token(seed) for seed in range(5)}) > 1  # the given generator decides, not params' seed 1
