"""Fused projections (lmforge.infer.fuse): one (q | k | v) and one (w1 | w3) product per layer, the parameters
views of the fused tensors. Fused logits equal unfused (<= 1e-5), names and state dict are unchanged, no
second copy of the weights exists, training through a fused model gets the same gradients, and
`load_weights` of an unfused state dict equals a fresh fused load (the gate)."""

import types

import pytest
import torch

from engine_helpers import forced_logits, random_seq
from helpers import unit_scale_
from infer_helpers import assert_logits_close, full_logits, tiny_model
from lmforge import Transformer
from lmforge.infer.engine import LLMEngine
from lmforge.infer.fuse import fuse_projections, is_fused, unfuse_projections
from lmforge.parallel import apply_tensor_parallel


def _copy(model: Transformer) -> Transformer:
    clone = Transformer(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def _storage_bytes(model) -> int:
    """Bytes of the distinct storages behind the parameters and buffers (a second copy would count twice)."""
    tensors = [*model.parameters(), *model.buffers()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize("preset", ["tiny", "tiny-swa", "tiny-moe"])
def test_fused_logits_equal_unfused_and_nothing_else_changes(preset):
    model = tiny_model(preset)
    fused = _copy(model)
    before = _storage_bytes(fused)
    assert fuse_projections(fused) and is_fused(fused)
    assert _storage_bytes(fused) == before  # the fused tensors hold the only copy
    layer = fused.layers[0]
    assert layer.attention.wq.weight.untyped_storage().data_ptr() == layer.attention.wqkv.untyped_storage().data_ptr()
    assert (getattr(layer.feed_forward, "w13", None) is not None) == (preset != "tiny-moe")  # MoE experts stay
    assert fused.state_dict().keys() == model.state_dict().keys()
    for (name, a), b in zip(fused.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    seq = torch.tensor([random_seq(40, 1)])
    with torch.no_grad():
        assert_logits_close(fused(seq)[0], model(seq)[0])


def test_training_through_a_fused_model_is_unchanged():
    """With gradients on, the fused model computes its parameters' own products: same loss, same gradients."""
    model = tiny_model("tiny")
    plain, fused = _copy(model), _copy(model)
    fuse_projections(fused)
    seq = torch.tensor([random_seq(24, 2)])
    grads = []
    for m in (plain, fused):
        loss = torch.nn.functional.cross_entropy(m(seq[:, :-1])[0], seq[0, 1:])
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6, msg=name)
    a = fused.layers[0].attention
    with torch.no_grad():  # an in-place update by name reaches the fused tensor
        a.wk.weight.add_(1.0)
    q_rows, k_rows = a.wq.weight.shape[0], a.wk.weight.shape[0]
    assert torch.equal(a.wqkv[q_rows : q_rows + k_rows], a.wk.weight)
    torch.testing.assert_close(a.wqkv[q_rows : q_rows + k_rows] - 1.0, plain.layers[0].attention.wk.weight,
                               rtol=0, atol=1e-6)


def test_load_weights_of_an_unfused_state_dict_equals_a_fresh_fused_load():
    """The gate: an engine on a fused model takes new weights by name (an unfused state dict) and computes
    what a fresh fused engine on those weights computes (<= 1e-5), which is the unfused model's."""
    old = tiny_model("tiny")
    torch.manual_seed(11)
    new = unit_scale_(Transformer(old.config).eval())
    kw = {"block_size": 4, "num_blocks": 256, "max_num_batched_tokens": 16, "max_num_seqs": 8, "check_invariants": True,
          "fuse_projections": True}
    updated = LLMEngine(_copy(old), **kw)
    assert is_fused(updated.model)
    updated.load_weights(new.state_dict())
    fresh = LLMEngine(_copy(new), **kw)
    seqs, prompts = [random_seq(30, 40 + b) for b in range(3)], [5, 11, 2]
    ours, theirs = forced_logits(updated, seqs, prompts), forced_logits(fresh, seqs, prompts)
    for seq, P, a, b in zip(seqs, prompts, ours, theirs):
        assert_logits_close(a, b)
        assert_logits_close(a, full_logits(new, seq)[P - 1 : -1])
    for layer, ref in zip(updated.model.layers, new.layers):  # the views still alias the fused tensors
        a = ref.attention
        assert torch.equal(layer.attention.wqkv, torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]))
        f = ref.feed_forward
        assert torch.equal(layer.feed_forward.w13, torch.cat([f.w1.weight, f.w3.weight]))


def test_unfuse_and_tensor_parallelism():
    model = _copy(tiny_model("tiny"))
    assert LLMEngine(model, num_blocks=64).model.layers[0].attention.wqkv is None  # the CPU default: unfused
    fuse_projections(model)
    with pytest.raises(ValueError, match="fused"):
        apply_tensor_parallel(model, types.SimpleNamespace(size=lambda: 2))
    unfuse_projections(model)
    assert not is_fused(model)
    a = model.layers[0].attention
    assert a.wq.weight.untyped_storage().data_ptr() != a.wk.weight.untyped_storage().data_ptr()
    assert not fuse_projections(types.SimpleNamespace(tp_degree=2, layers=[]))  # tensor-parallel: skipped
