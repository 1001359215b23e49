"""Attention backends agree, and the sliding window admits exactly min(i + 1, W) keys."""

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.models.attention import allowed_mask, causal_attention


def _qkv(B=2, H=4, Hkv=2, T=13, D=8):
    return torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)


@pytest.mark.parametrize("W", [1, 3, 8, 13, 100])
def test_window_mask_counts_keys(W):
    pos = torch.arange(20)
    mask = allowed_mask(pos, pos, W)
    counts = mask.sum(-1)
    assert counts.tolist() == [min(i + 1, W) for i in range(20)]
    # the admitted keys are the W most recent, ending at the query itself
    i = 15
    assert mask[i].nonzero().flatten().tolist() == list(range(max(0, i - W + 1), i + 1))


def test_negative_key_positions_are_empty_slots():
    mask = allowed_mask(torch.tensor([5]), torch.tensor([-1, 3, 5, 6]), None)
    assert mask.tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_sdpa_equals_reference(window, docs, Hkv):
    q, k, v = _qkv(Hkv=Hkv)
    document_ids = torch.tensor([[0] * 5 + [1] * 8, [0] * 13]) if docs else None
    ref = causal_attention(q, k, v, window=window, document_ids=document_ids, backend="reference")
    fast = causal_attention(q, k, v, window=window, document_ids=document_ids, backend="sdpa")
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_document_mask_isolates_documents():
    q, k, v = _qkv(B=1)
    docs = torch.tensor([[0] * 6 + [1] * 7])
    out = causal_attention(q, k, v, document_ids=docs, backend="reference")
    alone = causal_attention(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], backend="reference")
    torch.testing.assert_close(out[:, :, 6:], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_model_window_boundary(backend):
    """Through the real model (one layer): the output at position i depends on token i - W + 1, not i - W."""
    W, T = 4, 12
    cfg = ModelConfig.from_name("tiny-swa", sliding_window=W, n_layers=1)
    model = Transformer(cfg).eval()
    for layer in model.layers:
        layer.attention.backend = backend
    tokens = torch.randint(0, cfg.vocab_size, (1, T))
    i = 9
    with torch.no_grad():
        base = model(tokens)[0, i]
        changed_outside = tokens.clone()
        changed_outside[0, i - W] = (tokens[0, i - W] + 1) % cfg.vocab_size
        changed_inside = tokens.clone()
        changed_inside[0, i - W + 1] = (tokens[0, i - W + 1] + 1) % cfg.vocab_size
        assert torch.equal(model(changed_outside)[0, i], base)
        assert not torch.allclose(model(changed_inside)[0, i], base)


def test_model_backends_agree_with_window_and_docs():
    cfg = ModelConfig.from_name("tiny-swa", sliding_window=5)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    docs = torch.cumsum(torch.rand(2, 17) < 0.2, dim=1)
    outs = {}
    for backend in ("reference", "sdpa"):
        for layer in model.layers:
            layer.attention.backend = backend
        with torch.no_grad():
            outs[backend] = model(tokens, document_ids=docs)
    torch.testing.assert_close(outs["sdpa"], outs["reference"], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention path runs on CUDA")
@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("docs", [False, True])
def test_flex_equals_reference_on_cuda(window, docs):
    q, k, v = (t.cuda() for t in _qkv(B=2, H=8, Hkv=2, T=256, D=64))
    document_ids = torch.cumsum(torch.rand(2, 256, device="cuda") < 0.01, dim=1) if docs else None
    for t in (q, k, v):
        t.requires_grad_(True)
    ref = causal_attention(q, k, v, window=window, document_ids=document_ids, backend="reference")
    flex = causal_attention(q, k, v, window=window, document_ids=document_ids, backend="flex")
    torch.testing.assert_close(flex, ref, rtol=2e-4, atol=2e-4)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    grads_flex = torch.autograd.grad(flex, (q, k, v), g)
    for a, b in zip(grads_flex, grads_ref):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
