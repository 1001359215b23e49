"""On CUDA, the engine's speed paths against their references: n-way forks through CUDA-graph decode steps,
overlap on real CUDA streams (the same outputs as one step at a time), fused projections, sampling inside the
decode graphs, the Inductor-compiled decode step (float32 equal, bf16 gap printed) and the Triton paged decode
kernel. Run on the device machine (`pytest -m gpu tests/infer`); skipped elsewhere."""

import pytest
import torch

from engine_helpers import assert_same_outputs, forced_fork_logits, forced_logits, mixed_workload, random_seq, serve
from infer_helpers import tiny_model
from lmforge.infer.engine import LLMEngine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

KW = {"block_size": 4, "num_blocks": 256, "max_num_batched_tokens": 16, "max_num_seqs": 8, "check_invariants": True}


def _cuda(preset, dtype=torch.float32):
    model = tiny_model(preset)
    cuda = type(model)(model.config).cuda().eval()
    cuda.load_state_dict(model.state_dict())
    return cuda.to(dtype)


@pytest.mark.parametrize("preset", ["tiny", "tiny-swa"])
def test_forks_on_cuda_graph_steps_equal_separate_requests(preset):
    """Forked requests (copy-on-write on the GPU pool) decode through CUDA graphs: teacher-forced logits equal
    the packed path's for separate requests of the same sequences."""
    torch._dynamo.reset()
    model = _cuda(preset)
    prompt = random_seq(13, 3)
    conts = [random_seq(n, 10 + n) for n in (20, 25, 18)]
    engine = LLMEngine(model, decode_path="cuda_graph", decode_attention="fused", overlap=False, **KW)
    ours = forced_fork_logits(engine, prompt, conts)
    assert engine.runner.decode.steps > 10
    theirs = forced_logits(LLMEngine(model, decode_path="packed", **KW), [prompt + c for c in conts], [13] * 3)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decode_path", ["cuda_graph", "packed"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-swa"])
def test_overlap_on_cuda_streams_gives_the_same_outputs(preset, decode_path):
    """The mixed workload of test_engine_overlap.py (greedy, seeded, penalties, forks, eos, stop ids, abort,
    preemption) in float32: overlap on and off give the same tokens, finish reasons and log-probs."""
    torch._dynamo.reset()
    model = _cuda(preset)
    reqs = mixed_workload()
    probe = serve(LLMEngine(model, decode_path=decode_path, overlap=False, **KW), reqs)
    eos = probe["r0"][0][3]
    runs = {}
    for overlap in (False, True):
        engine = LLMEngine(model, decode_path=decode_path, overlap=overlap, eos_id=eos,
                           **{**KW, "num_blocks": 24 if preset == "tiny" else 18}, watermark_blocks=0)
        runs[overlap] = serve(engine, reqs, abort=("r8", 4))
        assert engine.counters.preemptions > 0
    assert_same_outputs(runs[True], runs[False])


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_fused_projections_on_cuda(preset):
    """Teacher-forced logits of engines on fused and unfused copies (CUDA-graph decode steps, packed pre-fill):
    equal in float32; in bf16 the fused engine is as close to float32 as the unfused one (gap printed)."""
    torch._dynamo.reset()
    seqs, prompts = [random_seq(40 + 3 * b, 60 + b) for b in range(4)], [3, 17, 9, 25]
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        for fused in (False, True):
            engine = LLMEngine(_cuda(preset, dtype), fuse_projections=fused, **KW)
            assert (engine.model.layers[0].attention.wqkv is not None) == fused
            logits[dtype, fused] = forced_logits(engine, seqs, prompts)
    for a, b in zip(logits[torch.float32, True], logits[torch.float32, False]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    exact = logits[torch.float32, False]
    gap = {f: max((x.float() - e).abs().max().item() for x, e in zip(logits[torch.bfloat16, f], exact))
           for f in (False, True)}
    print(f"bf16 max |logit - fp32|: unfused {gap[False]:.4f}, fused {gap[True]:.4f}")
    assert gap[True] <= 1.5 * gap[False] + 1e-2


@pytest.mark.parametrize("preset, decode_path", [("tiny", "cuda_graph"), ("tiny-moe", "cuda_graph"),
                                                 ("tiny-swa", "compile")])  # (compiles cost time: one)
def test_sampling_inside_decode_graphs_gives_the_packed_paths_outputs(preset, decode_path):
    """The gate on the engine: decode steps sample inside their CUDA graphs ("compile": forward and sampling
    compiled by Inductor first). In float32 the mixed workload's tokens, finish reasons and log-probs equal the
    packed path's, which samples its logits eagerly; with overlap on."""
    torch._dynamo.reset()
    model = _cuda(preset)
    reqs = mixed_workload()
    eos = serve(LLMEngine(model, decode_path="packed", **KW), reqs)["r0"][0][3]
    kw = {**KW, "num_blocks": 24 if preset != "tiny-swa" else 18, "eos_id": eos, "watermark_blocks": 0}
    graphs = LLMEngine(model, decode_path=decode_path, overlap=True, **kw)
    ours = serve(graphs, reqs, abort=("r8", 4))
    theirs = serve(LLMEngine(model, decode_path="packed", overlap=False, **kw), reqs, abort=("r8", 4))
    decode = graphs.runner.decode
    assert decode.steps > 20 and decode.mode == "cuda_graph"  # no capture fell back
    assert all(s.sampling_graphs for s in decode.shapes.values() if s.graph is None)
    assert_same_outputs(ours, theirs)


@pytest.mark.parametrize("preset", ["tiny"])
def test_compiled_decode_steps_compute_the_packed_paths_logits(preset):
    """decode_path="compile": teacher-forced logits equal the packed path's in float32; in bf16 the compiled
    steps are as close to float32 as the CUDA-graph steps (gap printed)."""
    torch._dynamo.reset()
    seqs, prompts = [random_seq(70 + 3 * b, 40 + b) for b in range(5)], [3, 17, 9, 25, 1]
    exact = forced_logits(LLMEngine(_cuda(preset), decode_path="packed", **KW), seqs, prompts)
    compiled = LLMEngine(_cuda(preset), decode_path="compile", **KW)
    for a, b in zip(forced_logits(compiled, seqs, prompts), exact):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert compiled.runner.decode.steps > 30 and compiled.runner.decode.mode == "cuda_graph"
    gap = {}
    for path in ("cuda_graph", "compile"):
        torch._dynamo.reset()
        logits = forced_logits(LLMEngine(_cuda(preset, torch.bfloat16), decode_path=path, **KW), seqs, prompts)
        gap[path] = max((x.float() - e).abs().max().item() for x, e in zip(logits, exact))
    print(f"bf16 max |logit - fp32|: {gap}")
    assert gap["compile"] <= 1.5 * gap["cuda_graph"] + 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G, H, Hkv, K", [(1, 32, 32, 384), (64, 32, 32, 512), (7, 32, 8, 4096), (256, 32, 8, 256)])
def test_triton_paged_decode_kernel_on_cuda(G, H, Hkv, K, dtype):
    """The Triton kernel against the reference at Llama-2-7B / Mistral-7B head shapes (D = 128), compiled for
    the GPU; float32 to 1e-4, bf16 within bf16 noise of the float32 reference."""
    from lmforge.infer.engine.paged_attention import gathered_decode_attention
    from lmforge.infer.engine.triton_decode import paged_decode_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    S, D = 70_000, 128
    q = torch.randn(G, H, D, device="cuda", generator=g)
    kp, vp = (torch.randn(S, Hkv, D, device="cuda", generator=g) for _ in range(2))
    slots = torch.randint(0, S, (G, K), device="cuda", generator=g)
    lengths = torch.randint(1, K + 1, (G, 1), device="cuda", generator=g)
    allowed = torch.arange(K, device="cuda")[None] < lengths  # a prefix of each row, as a bucket's tail
    reference = gathered_decode_attention(q, kp, vp, slots, allowed)
    ours = paged_decode_attention(q.to(dtype), kp.to(dtype), vp.to(dtype), slots, allowed).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(ours, reference, atol=tol, rtol=tol)


@pytest.mark.parametrize("decode_path", ["cuda_graph", "compile"])
def test_engine_with_the_triton_kernel_equals_the_packed_path(decode_path):
    """decode_attention="triton" in captured (and compiled) decode steps: teacher-forced logits equal the
    packed path's in float32; sampled outputs of the mixed workload equal too."""
    torch._dynamo.reset()
    model = _cuda("tiny-swa")
    seqs, prompts = [random_seq(70 + 3 * b, 40 + b) for b in range(5)], [3, 17, 9, 25, 1]
    triton_engine = LLMEngine(model, decode_path=decode_path, decode_attention="triton", **KW)
    ours = forced_logits(triton_engine, seqs, prompts)
    theirs = forced_logits(LLMEngine(model, decode_path="packed", **KW), seqs, prompts)
    assert triton_engine.runner.decode.mode == "cuda_graph" and triton_engine.runner.decode.steps > 30
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if decode_path == "cuda_graph":  # (sampling with it: once, without a compile)
        reqs = mixed_workload()
        runs = [serve(LLMEngine(model, decode_path=p, decode_attention=a, **KW), reqs)
                for p, a in ((decode_path, "triton"), ("packed", None))]
        assert_same_outputs(*runs)
