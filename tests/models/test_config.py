import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.models.config import PRESETS, REAL_PRESETS, ConfigError, MoEConfig

# The papers' exact parameter counts for these shapes (embedding and output counted separately, norms included).
REFERENCE_COUNTS = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "mistral-7b": 7_241_732_096,
    "mistral-7b-v0.2": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
}


@pytest.mark.parametrize("name", REAL_PRESETS)
def test_preset_parameter_count_matches_reference(name):
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name(name))
    assert model.num_parameters() == REFERENCE_COUNTS[name]


def test_mixtral_active_parameter_count():
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name("mixtral-8x7b"))
    assert model.num_parameters(active=True) == 12_879_925_248


def test_every_real_preset_is_tested():
    assert set(REAL_PRESETS) == set(REFERENCE_COUNTS)
    assert {"tiny", "tiny-swa", "tiny-moe"} <= set(PRESETS)


def test_preset_facts():
    assert ModelConfig.from_name("mistral-7b").sliding_window == 4096
    assert ModelConfig.from_name("mixtral-8x7b").rope_theta == 1e6
    assert ModelConfig.from_name("mixtral-8x7b").moe == MoEConfig(num_experts=8, top_k=2, aux_loss_coef=0.02)
    assert ModelConfig.from_name("llama2-70b").n_rep == 8
    assert ModelConfig.from_name("llama2-7b").head_dim == 128


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown model preset 'llama-7b'.*llama2-7b.*mixtral-8x7b"):
        ModelConfig.from_name("llama-7b")


def test_from_name_does_not_share_state():
    a = ModelConfig.from_name("tiny", dim=128)
    assert a.dim == 128 and ModelConfig.from_name("tiny").dim == 64


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
        (dict(dim=65, n_heads=4), "divisible by n_heads"),
        (dict(dim=12, n_heads=4), "even"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(n_layers=0), "n_layers"),
        (dict(moe=dict(num_experts=2, top_k=3)), "top_k"),
    ],
)
def test_inconsistent_config_is_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**dict(dim=64, n_heads=4, ffn_dim=8, vocab_size=16), **kwargs})


def test_dict_round_trip_and_format_tag():
    cfg = ModelConfig.from_name("tiny-moe")
    data = cfg.to_dict()
    assert data["format"] == "lmforge/1"
    assert ModelConfig.from_dict(data) == cfg
    with pytest.raises(ConfigError, match="unknown model config keys \\['hidden'\\]"):
        ModelConfig.from_dict({**data, "hidden": 1})
    with pytest.raises(ConfigError, match="format"):
        ModelConfig.from_dict({**data, "format": "lmforge/9"})
