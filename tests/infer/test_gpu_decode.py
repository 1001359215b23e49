"""On CUDA: the graph-captured and compiled decode steps equal the eager step, for the contiguous cache, the
rolling buffer and an MoE model. Run on the device machine (`pytest -m gpu tests/infer`); skipped elsewhere."""

import pytest
import torch

from infer_helpers import tiny_model
from lmforge.infer.cache import make_cache
from lmforge.infer.decode_step import DecodeStep
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cuda_model(preset):
    model = tiny_model(preset)
    clone = type(model)(model.config).cuda().eval()
    clone.load_state_dict(model.state_dict())
    return clone


@pytest.mark.parametrize("mode", ["cuda_graph", "compile", "compile+cuda_graph"])
@pytest.mark.parametrize("preset,kind", [("tiny", "contiguous"), ("tiny-swa", "rolling"), ("tiny-moe", "contiguous")])
def test_graph_decode_equals_eager(mode, preset, kind):
    torch._dynamo.reset()
    model = _cuda_model(preset)
    B, P, steps = 3, 11, 30  # tiny-swa: W = 8, so the rolling buffer wraps several times
    seqs = torch.randint(3, 512, (B, P + steps), device="cuda")
    pos0 = torch.arange(P, device="cuda").expand(B, P)
    caches = [make_cache(model.config, B, P + steps + 1, kind=kind, device="cuda") for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(seqs[:, :P], pos0, cache=cache.prefill(pos0))
    eager, fast = DecodeStep(model, caches[0], "eager"), DecodeStep(model, caches[1], mode)
    for t in range(P, P + steps):
        tok, pos = seqs[:, t : t + 1], torch.full((B, 1), t, device="cuda")
        a, b = eager(tok, pos).clone(), fast(tok, pos).clone()
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["cuda_graph", "compile"])
def test_generate_with_graph_decode_gives_the_eager_tokens(mode):
    torch._dynamo.reset()
    model = _cuda_model("tiny-swa")
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (5, 19, 12)]
    params = SamplingParams(temperature=0, max_new_tokens=24)
    eager = generate(model, None, prompts, params)
    fast = generate(model, None, prompts, params, decode_mode=mode)
    assert [r.token_ids for r in fast] == [r.token_ids for r in eager]


@pytest.mark.parametrize("mode", ["cuda_graph", "compile"])
def test_generate_keeps_its_step_across_calls(mode):
    """A second generate() of the same shapes (other prompts) reuses the kept step: the same CUDA graph, no new
    Dynamo graph, and still the eager tokens."""
    torch._dynamo.reset()
    model = _cuda_model("tiny")
    params = SamplingParams(temperature=0, max_new_tokens=20)
    first = [torch.randint(3, 512, (n,)).tolist() for n in (7, 12)]
    second = [torch.randint(3, 512, (n,)).tolist() for n in (9, 4)]
    generate(model, None, first, params, decode_mode=mode)
    step = model._lmforge_kept_decode.step
    graph, graphs = step.graph, torch._dynamo.utils.counters["stats"]["unique_graphs"]
    fast = generate(model, None, second, params, decode_mode=mode)
    assert model._lmforge_kept_decode.step is step and step.graph is graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert [r.token_ids for r in fast] == [r.token_ids for r in generate(model, None, second, params)]


@pytest.mark.parametrize("mode", ["cuda_graph", "compile", "compile+cuda_graph"])
def test_seeded_sampling_inside_the_graph_gives_the_eager_tokens(mode):
    """The gate: the decode step samples inside its graph (counter-based noise, static sampling batch); in
    float32 its seeded tokens equal eager generate()'s, with penalties, filters and log-probs, over two calls
    (the second reloads the kept step's batch)."""
    torch._dynamo.reset()
    model = _cuda_model("tiny-swa")
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s, max_new_tokens=24, logprobs=True, top_logprobs=2,
                             repetition_penalty=1.2) for s in (1, 2, 3)]
    for call in range(2):
        prompts = [torch.randint(3, 512, (n,)).tolist() for n in (5, 19, 12)]
        eager = generate(model, None, prompts, params)
        fast = generate(model, None, prompts, params, decode_mode=mode)
        assert [r.token_ids for r in fast] == [r.token_ids for r in eager], call
        for a, b in zip(fast, eager):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    assert len({tuple(r.token_ids) for r in fast}) == 3
