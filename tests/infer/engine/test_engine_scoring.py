"""`LLMEngine.score()`: every position equals log_softmax of the model's own logits, top-k equals torch.topk."""

import copy

import pytest
import torch

from engine_helpers import random_seq
from infer_helpers import full_logits, tiny_model
from lmforge.infer.engine import LLMEngine
from lmforge.infer.engine.scoring import score_batches


def _engine(model):
    return LLMEngine(model, block_size=4, num_blocks=64, max_num_batched_tokens=16, max_num_seqs=8)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-swa"])
@pytest.mark.parametrize("max_tokens", [8192, 60])
def test_score_and_top_k_equal_the_models_log_softmax(preset, max_tokens):
    # tiny-swa: window 8, so sequences of up to 70 tokens cross it many times; max_tokens 60: several forwards,
    # one sequence (70 tokens) longer than the budget, alone in its pass
    model = tiny_model(preset)
    seqs = [random_seq(n, n) for n in (2, 17, 70, 9, 33, 3)]
    engine = _engine(model)
    plain = engine.score(seqs, max_tokens_per_forward=max_tokens)
    scored = engine.score(seqs, max_tokens_per_forward=max_tokens, top_k=5)
    for seq, lp, s in zip(seqs, plain, scored):
        logp = full_logits(model, seq).log_softmax(-1)[:-1]  # (T - 1, V), the model without any batching
        expected = logp.gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
        assert lp.shape == (len(seq) - 1,) and lp.dtype == torch.float32
        torch.testing.assert_close(lp, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(s.logprobs, lp, rtol=0, atol=0)  # top_k changes nothing else
        values, ids = logp.topk(5, dim=-1)
        assert s.top_ids.shape == (len(seq) - 1, 5) and torch.equal(s.top_ids, ids)
        torch.testing.assert_close(s.top_logprobs, values, rtol=0, atol=1e-5)


def test_a_greedy_next_token_has_exactly_the_top_1_value():
    # lm-evaluation-harness decides "greedy" with token_logprob == max(top_logprobs): equality must be exact
    model = tiny_model("tiny")
    seq = random_seq(40, 3)
    logits = full_logits(model, seq)
    for t in range(0, 39, 3):  # make every third next token the argmax of its position
        seq[t + 1] = int(logits[t].argmax())
        logits = full_logits(model, seq)
    (s,) = _engine(model).score([seq], top_k=1)
    greedy = torch.tensor(seq[1:]) == s.top_ids[:, 0]
    assert greedy.sum() >= 13
    assert torch.equal(s.logprobs[greedy], s.top_logprobs[greedy, 0])  # bit for bit
    assert (s.logprobs[~greedy] < s.top_logprobs[~greedy, 0]).all()


def test_score_batches_worked_example_and_budget():
    assert score_batches([5, 2, 9, 3, 8], 20) == [[1, 3], [0, 4], [2]]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 50, (200,), generator=g).tolist()
    batches = score_batches(lengths, 100)
    assert sorted(i for b in batches for i in b) == list(range(200))  # each sequence exactly once
    assert max(len(b) for b in batches) > 2  # batched, not one by one
    for b in batches:
        padded, real = len(b) * max(lengths[i] for i in b), sum(lengths[i] for i in b)
        assert len(b) == 1 or (padded <= 100 and padded - real <= 0.25 * padded)


@pytest.mark.parametrize("kwargs, message", [
    ({"sequences": [[1]]}, "sequence 0 has 1 tokens"),
    ({"sequences": [[1, 2], [1, 600]]}, "sequence 1 has token id 600"),
    ({"sequences": [[1, 2]], "top_k": -1}, "top_k must be"),
    ({"sequences": [[1, 2]], "top_k": 513}, "top_k must be"),
    ({"sequences": [list(range(3, 260))]}, "more than the context 256"),
    ({"sequences": [[1, 2]], "max_tokens_per_forward": 0}, "max_tokens_per_forward must be >= 1"),
])
def test_score_refuses_bad_input_with_one_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _engine(tiny_model("tiny")).score(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_score_on_cuda_equals_the_cpu_model_in_float32_and_reports_the_bf16_gap():
    cpu = tiny_model("tiny")
    seqs = [random_seq(n, n) for n in (5, 64, 200, 31)]
    reference = [full_logits(cpu, s).log_softmax(-1)[:-1] for s in seqs]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, None)):
        model = copy.deepcopy(cpu).to("cuda", dtype)  # NOTE: never move the cached model itself
        scored = LLMEngine(model, block_size=16, num_blocks=64).score(seqs, top_k=4)
        gap = 0.0
        for seq, s, logp in zip(seqs, scored, reference):
            expected = logp.gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
            gap = max(gap, (s.logprobs - expected).abs().max().item())
            if tol is not None:
                assert torch.equal(s.top_ids, logp.topk(4, dim=-1).indices)
        print(f"score on cuda, {dtype}: max |log-prob - cpu float32| = {gap:.3g}")
        if tol is not None:
            assert gap <= tol
        else:
            assert gap < 0.5  # bf16 weights: a reported gap, loosely bounded
