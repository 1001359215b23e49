"""`generate` / `generate_stream`: batching, finish reasons, streaming, stop strings, bad input."""

import pytest
import torch

from infer_helpers import full_logits, tiny_model
from lmforge.infer.generate import GenerationError, generate, generate_stream
from lmforge.infer.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


def _prompts(lengths, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _assert_greedy_matches_full_recomputation(model, prompt, generated, gap=1e-4):
    """Teacher-forced check: each generated token is the argmax of a cache-free forward over everything
    before it, wherever the top-2 logit gap is clear of numerical ties."""
    logits = full_logits(model, prompt + generated)[len(prompt) - 1 : -1]  # (n, V): predicting each token
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > gap
    assert clear.float().mean() > 0.8  # the check is not vacuous
    assert (logits.argmax(-1) == torch.tensor(generated))[clear].all()


@pytest.mark.parametrize("preset", ["tiny", "tiny-swa", "tiny-moe"])
def test_greedy_batch_of_mixed_lengths(preset):
    model = tiny_model(preset)
    prompts = _prompts([3, 17, 9])  # tiny-swa: W = 8, so the rolling buffer is used and wraps
    results = generate(model, None, prompts, GREEDY)
    for prompt, r in zip(prompts, results):
        assert r.finish_reason == "length" and len(r.token_ids) == 12 and r.text is None
        _assert_greedy_matches_full_recomputation(model, prompt, r.token_ids)
        (alone,) = generate(model, None, [prompt], GREEDY)
        assert alone.token_ids == r.token_ids


@pytest.mark.parametrize("chunk", [1, 5, 8, 20])
def test_prefill_chunk_size_does_not_change_greedy_output(chunk):
    model = tiny_model("tiny-swa")
    prompts = _prompts([20, 11], seed=1)
    reference = generate(model, None, prompts, GREEDY, prefill_chunk=64)
    assert [r.token_ids for r in generate(model, None, prompts, GREEDY, prefill_chunk=chunk)] == [
        r.token_ids for r in reference
    ]


def test_sliding_window_model_generates_past_max_seq_len():
    model = tiny_model("tiny-swa", max_seq_len=16)
    prompt = _prompts([12], seed=2)[0]
    (r,) = generate(model, None, [prompt], SamplingParams(temperature=0, max_new_tokens=40))
    assert len(r.token_ids) == 40 and r.finish_reason == "length"
    _assert_greedy_matches_full_recomputation(model, prompt, r.token_ids)


def test_full_attention_model_stops_at_its_context():
    model = tiny_model("tiny", max_seq_len=16)
    results = generate(model, None, _prompts([12, 4], seed=3), SamplingParams(temperature=0, max_new_tokens=40))
    assert [len(r.token_ids) for r in results] == [4, 12]  # prompt + output = 16 for both
    assert [r.finish_reason for r in results] == ["length", "length"]


@pytest.mark.parametrize("preset", ["tiny", "tiny-swa"])
def test_rows_that_finish_early_do_not_disturb_the_others(preset):
    """Generation runs one decode step ahead of the host: a row that finishes must go on feeding its last
    position (inside the cache, even at a full context) and leave the other rows' logits untouched."""
    model = tiny_model(preset, max_seq_len=24)
    prompts = _prompts([20, 5, 9], seed=4)
    params = [SamplingParams(temperature=0, max_new_tokens=n, logprobs=True) for n in (4, 15, 2)]
    results = generate(model, None, prompts, params)
    assert [len(r.token_ids) for r in results] == [4, 15, 2]
    for prompt, p, r in zip(prompts, params, results):
        (alone,) = generate(model, None, [prompt], p)
        assert alone.token_ids == r.token_ids
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(alone.logprobs), rtol=1e-5, atol=1e-5)


def test_stop_tokens_and_eos_end_a_sequence():
    model = tiny_model("tiny")
    prompt = _prompts([6], seed=4)[0]
    (free,) = generate(model, None, [prompt], GREEDY)
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    (r,) = generate(model, None, [prompt], SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[stop_at]))
    assert r.finish_reason == "stop" and r.token_ids == free.token_ids[: first + 1]
    (r,) = generate(model, None, [prompt], GREEDY, eos_id=stop_at)
    assert r.finish_reason == "stop" and r.token_ids == free.token_ids[: first + 1]
    (r,) = generate(model, None, [prompt], SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True), eos_id=stop_at)
    assert r.token_ids == free.token_ids


class Letters:
    """A fake tokenizer: id i decodes to two letters, so any stop string longer than 2 spans tokens."""

    eos_id = None

    def decode(self, ids):
        return "".join(chr(97 + i % 26) + chr(97 + i // 26 % 26) for i in ids)


def test_stop_string_spanning_tokens_through_generate():
    model, tok = tiny_model("tiny"), Letters()
    prompt = _prompts([5], seed=5)[0]
    (free,) = generate(model, tok, [prompt], GREEDY)
    assert free.text == tok.decode(free.token_ids)
    stop = free.text[5:9]  # starts inside token 2, ends inside token 4
    (r,) = generate(model, tok, [prompt], SamplingParams(temperature=0, max_new_tokens=12, stop=[stop]))
    cut = free.text.index(stop)
    assert r.finish_reason == "stop" and r.text == free.text[:cut]
    assert r.token_ids == free.token_ids[: (cut + len(stop) + 1) // 2]  # up to the token completing the stop


def test_stream_events_and_collected_results_agree():
    model, tok = tiny_model("tiny"), Letters()
    prompts = _prompts([4, 9], seed=6)
    params = [SamplingParams(temperature=0, max_new_tokens=5, logprobs=True, top_logprobs=3),
              SamplingParams(temperature=0, max_new_tokens=8)]
    events = list(generate_stream(model, tok, prompts, params))
    results = generate(model, tok, prompts, params)
    for b, r in enumerate(results):
        mine = [e for e in events if e.index == b]
        assert [e.token_id for e in mine] == r.token_ids
        assert "".join(e.text for e in mine) == r.text == tok.decode(r.token_ids)
        assert [e.finish_reason for e in mine] == [None] * (len(mine) - 1) + ["length"]
    assert len(results[0].token_ids) == 5 and len(results[1].token_ids) == 8
    assert results[1].logprobs is None and all(e.logprob is None for e in events if e.index == 1)
    # log-probs of the model's distribution, teacher-forced without a cache
    logp = full_logits(model, prompts[0] + results[0].token_ids)[len(prompts[0]) - 1 : -1].log_softmax(-1)
    expected = logp.gather(1, torch.tensor(results[0].token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(results[0].logprobs), expected, atol=1e-5, rtol=0)
    top_ids = [[i for i, _ in step] for step in results[0].top_logprobs]
    assert top_ids == logp.topk(3, dim=-1).indices.tolist()


def test_mixed_sampling_params_per_row_match_each_request_alone():
    model = tiny_model("tiny")
    prompts = _prompts([7, 7, 10], seed=7)
    params = [SamplingParams(temperature=0, max_new_tokens=10),
              SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_new_tokens=10),
              SamplingParams(temperature=0.7, top_k=20, seed=12, max_new_tokens=6, repetition_penalty=1.3)]
    together = generate(model, None, prompts, params)
    for prompt, p, r in zip(prompts, params, together):
        (alone,) = generate(model, None, [prompt], p)
        assert alone.token_ids == r.token_ids
    again = generate(model, None, prompts, params)
    assert [r.token_ids for r in again] == [r.token_ids for r in together]


@pytest.mark.parametrize(
    "prompts,message",
    [
        ([], "non-empty list"),
        ([[5, 6], []], "prompt 1 is empty"),
        ([5, 6], "prompt 0 is int, not a list of token ids"),
        ([[5, 512]], r"prompt 0 has token id 512 outside the vocabulary \[0, 512\)"),
        ([[1] * 256], r"prompt 0 has 256 tokens, but the model's context \(max_seq_len\) is 256"),
    ],
)
def test_bad_prompts_are_clear_errors(prompts, message):
    with pytest.raises(GenerationError, match=message):
        list(generate_stream(tiny_model("tiny"), None, prompts, GREEDY))
    with pytest.raises(GenerationError, match=message):
        generate(tiny_model("tiny"), None, prompts, GREEDY)
    assert issubclass(GenerationError, ValueError)


def test_other_bad_requests():
    model = tiny_model("tiny")
    with pytest.raises(GenerationError, match="stop strings need a tokenizer"):
        generate(model, None, [[1, 2]], SamplingParams(stop=["x"]))
    with pytest.raises(GenerationError, match="2 SamplingParams for 1 prompts"):
        generate(model, None, [[1, 2]], [GREEDY, GREEDY])
    with pytest.raises(GenerationError, match="prefill_chunk must be >= 1"):
        generate(model, None, [[1, 2]], GREEDY, prefill_chunk=0)
    # a sliding-window model takes prompts longer than max_seq_len
    (r,) = generate(tiny_model("tiny-swa", max_seq_len=16), None, [[3] * 40], SamplingParams(temperature=0, max_new_tokens=2))
    assert len(r.token_ids) == 2
