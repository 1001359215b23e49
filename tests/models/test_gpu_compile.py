"""On CUDA: torch.compile(fullgraph=True) compiles the dense and sliding-window forward and the MoE block,
and the compiled result equals eager. Run on the device machine (`pytest -m gpu`); skipped elsewhere."""

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.models.moe import MoE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _bf16_close(a: torch.Tensor, b: torch.Tensor) -> float:
    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert err < 2e-2, err
    return err


@pytest.mark.parametrize("preset", ["tiny", "tiny-swa"])
def test_compiled_forward_fullgraph(preset):
    torch._dynamo.reset()
    cfg = ModelConfig.from_name(preset, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, sliding_window=(
        64 if preset == "tiny-swa" else None))
    model = Transformer(cfg).cuda().to(torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda")
    eager = model(tokens)
    compiled = torch.compile(model, fullgraph=True)
    _bf16_close(compiled(tokens), eager)
    # backward through the compiled graph, too
    compiled(tokens).float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_compiled_moe_block_fullgraph():
    torch._dynamo.reset()
    cfg = ModelConfig.from_name("tiny-moe")
    moe = MoE(256, 512, cfg.moe).cuda().to(torch.bfloat16)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=256**-0.5)
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    y_eager, aux_eager = moe(x)
    moe.impl = "loop"
    y_loop, _ = moe(x)
    moe.impl = "grouped"
    compiled = torch.compile(moe, fullgraph=True)
    y, aux = compiled(x)
    _bf16_close(y, y_eager)
    _bf16_close(y_eager, y_loop)
    torch.testing.assert_close(aux.load_balance, aux_eager.load_balance, rtol=1e-3, atol=1e-4)
    y.float().square().mean().backward()
    assert torch.isfinite(moe.w1.grad).all() and moe.w1.grad.abs().sum() > 0
