"""On CUDA: the engine's CUDA-graph decode steps give the packed path's teacher-forced logits, for dense,
sliding-window and MoE models, with SDPA or the compiled in-place decode attention. Run on the device machine (`pytest -m gpu tests/infer`); skipped elsewhere."""

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
