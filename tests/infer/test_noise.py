"""Counter-based sampling noise (noise.py) and sampling as one graph: the 32-bit arithmetic against plain
Python integers, the variates' distribution and independence, and `sample` traced whole (fullgraph) with a
static batch giving the eager tokens for the same logits."""

import math

import pytest
import torch

from lmforge.infer.noise import _mul32, counter_log_exponential, mix32
from lmforge.infer.sampling import SamplingBatch, SamplingFlags, SamplingParams, sample


def _lowbias32(x: int) -> int:
    """The reference hash on Python integers."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_32_bit_arithmetic_matches_python_integers():
    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1] + torch.randint(0, 2**32, (200,)).tolist()
    t = torch.tensor(xs)
    for c in (0x7FEB352D, 0x846CA68B, 0xFFFFFFFF, 1):
        assert _mul32(t, c).tolist() == [(x * c) % 2**32 for x in xs]
    assert mix32(t).tolist() == [_lowbias32(x) for x in xs]


def test_noise_is_exponential_and_independent():
    V = 1 << 16
    seeds = torch.tensor([7, 7, 8, 2**63 - 1])
    counters = torch.tensor([0, 1, 0, 2**40])  # counters and seeds of any size: no overflow
    log_e = counter_log_exponential(seeds, counters, V)  # (4, V)
    assert log_e.shape == (4, V) and torch.isfinite(log_e).all()
    e = log_e.exp()
    for row in e:  # Exp(1): mean 1, P(E > 1) = 1/e; 65k draws: standard errors 0.004 and 0.002
        assert abs(row.mean().item() - 1) < 0.02 and abs((row > 1).float().mean().item() - math.exp(-1)) < 0.01
    u = 1 - torch.exp(-e)  # uniform on (0, 1): compare the empirical CDF (Kolmogorov-Smirnov distance)
    grid = torch.linspace(0, 1, 101)
    for row in u:
        cdf = (row[None, :] <= grid[:, None]).float().mean(1)
        assert (cdf - grid).abs().max() < 0.01  # 1.36 / sqrt(65k) = 0.005 at the 5% level
    corr = torch.corrcoef(u)
    assert (corr - torch.eye(4)).abs().max() < 0.02  # other counter, other seed: unrelated draws


def test_the_same_seed_and_counter_give_the_same_noise_at_any_row():
    a = counter_log_exponential(torch.tensor([5, 9]), torch.tensor([3, 0]), 100)
    b = counter_log_exponential(torch.tensor([1, 9, 5]), torch.tensor([0, 0, 3]), 100)
    assert torch.equal(a[0], b[2]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], a[1])


@pytest.mark.slow
def test_sampling_traced_as_one_graph_gives_the_eager_tokens():
    """The gate on the CPU: `sample` with a static batch, traced whole (fullgraph, as a CUDA graph or Inductor
    would hold it), gives the eager tokens, log-probs and counts for the same logits, step after step."""
    torch.manual_seed(0)
    B, V = 6, 300
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, seed=s, repetition_penalty=1.3,
                             frequency_penalty=0.2, logprobs=True, top_logprobs=3)
              for t, k, p, m, s in [(1.0, 0, 1.0, 0.0, 1), (0.7, 40, 0.9, 0.0, 2), (0.0, 0, 1.0, 0.0, None),
                                    (1.3, 0, 0.8, 0.05, 3), (1.0, 5, 1.0, 0.0, 2**62), (0.9, 0, 1.0, 0.1, 4)]]
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (3, 8, 1, 5, 2, 9)]
    flags = SamplingFlags.of(params)
    eager = SamplingBatch(params, prompts, V, "cpu", seeds=[11, 12, 13, 14, 15, 16])
    static = SamplingBatch.static(flags, B + 2, V, "cpu")  # two greedy padding rows, as a bucket would have
    static.load(params, prompts, seeds=[11, 12, 13, 14, 15, 16])
    compiled = torch.compile(sample, backend="aot_eager", fullgraph=True)
    for _ in range(5):
        logits = torch.randn(B, V) * 3
        ours = compiled(torch.cat([logits, torch.zeros(2, V)]), static)
        theirs = sample(logits, eager)
        assert torch.equal(ours.tokens[:B], theirs.tokens)
        torch.testing.assert_close(ours.logprobs[:B], theirs.logprobs, rtol=0, atol=1e-6)
        assert torch.equal(ours.top_ids[:B], theirs.top_ids)
    assert torch.equal(static.counters[:B], eager.counters) and torch.equal(static.output_counts[:B], eager.output_counts)
    assert len(set(theirs.tokens.tolist())) > 1
