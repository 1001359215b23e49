"""The fused linear cross-entropy equals the reference chunked cross-entropy and plain F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.train.linear_ce import linear_cross_entropy
from lmforge.train.losses import chunked_cross_entropy


def _plain(h, w, t, m):
    logits = (h @ w.T).float()
    return F.cross_entropy(logits[m], t[m], reduction="sum")


@pytest.mark.parametrize("chunk", [7, 16, 1000])
def test_value_and_gradients_match_reference(chunk):
    B, T, d, V = 3, 21, 16, 50
    h = torch.randn(B, T, d, requires_grad=True)
    w = torch.randn(V, d, requires_grad=True)
    t = torch.randint(0, V, (B, T))
    m = torch.rand(B, T) < 0.6
    upstream = 1.7  # the loss is scaled (e.g. by 1 / n_tokens) before backward
    ref = _plain(h, w, t, m)
    g_ref = torch.autograd.grad(ref * upstream, (h, w))
    for fn in (linear_cross_entropy, chunked_cross_entropy):
        out = fn(h, w, t, m, chunk)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-4)
        for a, b in zip(torch.autograd.grad(out * upstream, (h, w)), g_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_get_no_gradient():
    h = torch.randn(1, 6, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    m = torch.tensor([[True, False, True, False, False, True]])
    loss = linear_cross_entropy(h, w, torch.randint(0, 11, (1, 6)), m, chunk=4)
    (gh,) = torch.autograd.grad(loss, h)
    assert gh[0, ~m[0]].abs().max() == 0 and gh[0, m[0]].abs().min() > 0


def test_autocast_runs_products_in_bf16_and_returns_fp32_grads():
    h = torch.randn(2, 9, 16, requires_grad=True)
    w = torch.randn(30, 16, requires_grad=True)
    t, m = torch.randint(0, 30, (2, 9)), torch.ones(2, 9, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(h, w, t, m, chunk=8)
    gh, gw = torch.autograd.grad(out, (h, w))
    assert out.dtype == torch.float32 and gh.dtype == torch.float32 and gw.dtype == torch.float32
    ref = _plain(h.bfloat16().float(), w.bfloat16().float(), t, m)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=0.0)
