"""The attention probe reads the weights the model used: P v through wo gives every attention module's own output
(GQA, a sliding window, experts); the masses equal hand values; it refuses forwards it cannot read."""

import pytest
import torch
from helpers import unit_scale_
from stage_helpers import probe_reconstructions

from lmforge import ModelConfig, Transformer
from lmforge.align.attention_probe import AttentionProbe, ProbeError, attention_mass
from lmforge.models.transformer import Attention


@pytest.mark.parametrize("preset", ["tiny", "tiny-swa", "tiny-moe"])
def test_recomputed_weights_reproduce_each_attention_output(preset):
    """tiny-swa's window (8) is shorter than the 40 tokens: a probe that ignored it would fail here."""
    torch.manual_seed(0)
    model = unit_scale_(Transformer(ModelConfig.from_name(preset))).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 40))
    seen = probe_reconstructions(model, tokens)
    assert len(seen) == model.config.n_layers
    for recomputed, output, probs in seen:
        torch.testing.assert_close(recomputed, output, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
        assert (probs.triu(1) == 0).all()  # causal: nothing on later keys
        if model.config.sliding_window:
            assert (probs.tril(-model.config.sliding_window) == 0).all()  # nothing beyond the window


def test_attention_mass_by_hand():
    """With wq = 0 every score is 0, so each query spreads its attention evenly over the keys it may see: the
    mass on a key set K at query position q is |K within 0..q| / (q + 1), in every layer and head."""
    torch.manual_seed(0)
    model = unit_scale_(Transformer(ModelConfig.from_name("tiny"))).eval()
    for m in model.modules():
        if isinstance(m, Attention):
            torch.nn.init.zeros_(m.wq.weight)
    tokens = torch.randint(0, 512, (1, 12))
    keys = torch.zeros(12, dtype=torch.bool)
    keys[2:5] = True  # positions 2, 3, 4
    queries = torch.tensor([0, 3, 7, 11])
    mass = attention_mass(model, tokens, queries, keys)
    assert mass.shape == (2, 4, 4)
    expected = torch.tensor([0 / 1, 2 / 4, 3 / 8, 3 / 12]).expand(2, 4, 4)
    torch.testing.assert_close(mass, expected)
    every = attention_mass(model, tokens, queries, torch.ones(12, dtype=torch.bool))
    torch.testing.assert_close(every, torch.ones(2, 4, 4))


def test_attention_mass_sums_the_weights_the_model_used():
    torch.manual_seed(1)
    model = unit_scale_(Transformer(ModelConfig.from_name("tiny"))).eval()
    tokens = torch.randint(0, 512, (1, 30))
    keys = torch.rand(30) < 0.3
    queries = torch.tensor([5, 17, 29])
    probs = {}
    with AttentionProbe(model, queries, lambda layer, p: probs.__setitem__(layer, p)), torch.no_grad():
        model(tokens)
    mass = attention_mass(model, tokens, queries, keys)
    for layer in range(2):
        torch.testing.assert_close(mass[layer], probs[layer][0][..., keys].sum(-1))
    assert not any(m._forward_hooks for m in model.modules())  # the probe's hooks are gone after use


def test_the_probe_refuses_what_it_cannot_read():
    model = Transformer(ModelConfig.from_name("tiny")).eval()
    tokens = torch.randint(0, 512, (1, 8))
    with AttentionProbe(model, torch.tensor([1]), lambda *a: None), pytest.raises(ProbeError, match="document"):
        model(tokens, document_ids=torch.zeros(1, 8, dtype=torch.long))
    with AttentionProbe(model, torch.tensor([1]), lambda *a: None), pytest.raises(ProbeError, match="positions"):
        model(tokens, positions=torch.arange(8)[None] + 3)
    with pytest.raises(ProbeError, match="one sequence"):
        attention_mass(model, torch.randint(0, 512, (2, 8)), torch.tensor([1]), torch.ones(8, dtype=torch.bool))
