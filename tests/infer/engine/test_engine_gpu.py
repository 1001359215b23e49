"""On CUDA: the engine's CUDA-graph decode steps give the packed path's teacher-forced logits, for dense,
sliding-window and MoE models, with SDPA or the compiled in-place decode attention; the flash varlen kernel of
packed steps equals its reference loop, and bf16 engines using it stay as close to float32 as the padded path.
Run on the device machine (`pytest -m gpu tests/infer`); skipped elsewhere."""

import pytest
import torch

from engine_helpers import forced_logits, random_seq
from infer_helpers import tiny_model
from lmforge.infer.engine import LLMEngine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-swa", "tiny-moe"])
def test_cuda_graph_decode_equals_the_packed_path(preset, attention):
    """"fused" compiles gathered_decode_attention with dynamic shapes: one compile serves every bucket."""
    torch._dynamo.reset()
    model = tiny_model(preset)
    cuda = type(model)(model.config).cuda().eval()
    cuda.load_state_dict(model.state_dict())
    seqs, prompts = [random_seq(70 + 3 * b, 40 + b) for b in range(5)], [3, 17, 9, 25, 1]
    kw = {"block_size": 4, "num_blocks": 256, "max_num_batched_tokens": 16, "max_num_seqs": 8,
          "check_invariants": True}
    graphs = LLMEngine(cuda, decode_path="cuda_graph", decode_attention=attention, **kw)
    ours = forced_logits(graphs, seqs, prompts)
    theirs = forced_logits(LLMEngine(cuda, decode_path="packed", **kw), seqs, prompts)
    assert graphs.runner.decode.steps > 30 and all(s.graph is not None for s in graphs.runner.decode.shapes.values())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 5])
def test_varlen_flash_kernel_equals_the_reference(window):
    """PyTorch's flash varlen kernel (bf16, GQA 8 / 2 heads) against the explicit loop, on a step that mixes a
    pre-fill from position 0, a chunk that continues a cached prompt, and decodes."""
    from lmforge.infer.engine.varlen import VarlenArgs, varlen_attention, varlen_reference

    n, K = [9, 4, 1, 1, 1], [9, 13, 20, 3, 7]  # new tokens and keys per sequence (window: keys = last W)
    if window is not None:
        K = [min(k, window + m - 1) for k, m in zip(K, n)]
    cu_q = torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, *torch.tensor(K).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(sum(n), 8, 64, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(sum(K), 2, 64, device="cuda", generator=g).bfloat16() for _ in range(2))
    args = VarlenArgs(torch.empty(0, device="cuda"), cu_q, cu_k, max(n), max(K))
    ours = varlen_attention(q, k, v, args, window).float()
    ref = varlen_reference(q.float(), k.float(), v.float(), cu_q.tolist(), cu_k.tolist(), window)
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(ours, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("preset", ["tiny", "tiny-swa"])
def test_varlen_engine_in_bf16_is_as_close_to_float32_as_the_padded_path(preset):
    """bf16 engines (chunked pre-fill next to decodes, every step packed): the varlen path's logits are as
    close to the float32 model's as the padded path's are."""
    model = tiny_model(preset)
    fp32 = type(model)(model.config).cuda().eval()
    fp32.load_state_dict(model.state_dict())
    bf16 = type(model)(model.config).cuda().eval()
    bf16.load_state_dict(model.state_dict())
    bf16.bfloat16()
    seqs, prompts = [random_seq(30 + 5 * b, 60 + b) for b in range(5)], [3, 17, 9, 25, 1]
    kw = {"block_size": 4, "num_blocks": 256, "max_num_batched_tokens": 16, "max_num_seqs": 8,
          "check_invariants": True, "decode_path": "packed"}
    exact = forced_logits(LLMEngine(fp32, attention="padded", **kw), seqs, prompts)
    varlen_engine = LLMEngine(bf16, **kw)
    assert varlen_engine.runner.impl == "varlen"  # the default on CUDA in bf16
    varlen = forced_logits(varlen_engine, seqs, prompts)
    padded = forced_logits(LLMEngine(bf16, attention="padded", **kw), seqs, prompts)
    scale = max(e.abs().max().item() for e in exact)
    err_varlen = max((a.float() - e).abs().max().item() for a, e in zip(varlen, exact))
    err_padded = max((a.float() - e).abs().max().item() for a, e in zip(padded, exact))
    assert err_padded < 0.1 * scale  # bf16 noise, not a wrong key
    assert err_varlen <= 1.5 * err_padded + 1e-3 * scale, (err_varlen, err_padded, scale)
