"""Chunked cross-entropy equals the plain one (value and gradients); the token count normalises the loss."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.train.losses import chunked_cross_entropy, global_target_tokens

B, T, D, V = 3, 11, 16, 50


def plain(hidden, weight, targets, mask):
    logits = hidden @ weight.T  # (B, T, V), whole
    return F.cross_entropy(logits[mask], targets[mask], reduction="sum")


@pytest.mark.parametrize("chunk", [1, 7, 33, 1000])
def test_chunked_equals_plain_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, D, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False  # a row without any target
    ref = plain(hidden, weight, targets, mask)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    got = chunked_cross_entropy(hidden, weight, targets, mask, chunk)
    grads = torch.autograd.grad(got, (hidden, weight))
    # NOTE: fp32, the same terms summed in a different grouping (per chunk, then across chunks): a few ulp of
    # the total, far below 1e-6. The gradients (entries of size ~1-10) come from matrix products blocked
    # differently for a (chunk, V) and a (B*T, V) operand: about 1e-6 absolute, so 1e-5 bounds them while a
    # wrong scale, sign or dropped chunk would be off by O(1).
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not grads[0][1].any()  # a masked position gets no gradient


def test_targets_at_masked_positions_are_never_read():
    hidden, weight = torch.randn(1, 4, D), torch.randn(V, D)
    mask = torch.tensor([[True, False, True, False]])
    a = chunked_cross_entropy(hidden, weight, torch.tensor([[1, 2, 3, 4]]), mask, 2)
    b = chunked_cross_entropy(hidden, weight, torch.tensor([[1, 9, 3, 0]]), mask, 2)
    assert torch.equal(a, b)


def test_global_target_tokens_sums_every_micro_batch():
    masks = [torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.bool), torch.eye(5, dtype=torch.bool)]
    n = global_target_tokens(masks)
    assert n.dtype == torch.int64 and n.item() == 10 + 0 + 5
