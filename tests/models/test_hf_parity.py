"""Logit parity with Hugging Face transformers on tiny random models, through the real converter."""

import json
import logging

import pytest
import torch

from helpers import unit_scale_

transformers = pytest.importorskip("transformers")

from lmforge.models.checkpoint import CheckpointError, load_model, save_model  # noqa: E402
from lmforge.models.config import ConfigError  # noqa: E402
from lmforge.models.convert import save_hf_folder  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    return unit_scale_(model).eval()


def _hf_model(family: str):
    T = transformers
    if family == "llama-mha":
        return T.LlamaForCausalLM(T.LlamaConfig(**SMALL, num_key_value_heads=4))
    if family == "llama-gqa":
        return T.LlamaForCausalLM(T.LlamaConfig(**SMALL, num_key_value_heads=2, rope_theta=500.0))
    if family == "mistral-swa":
        return T.MistralForCausalLM(T.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=7))
    if family == "mixtral":
        return T.MixtralForCausalLM(
            T.MixtralConfig(**SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
        )
    raise ValueError(family)


FAMILIES = ["llama-mha", "llama-gqa", "mistral-swa", "mixtral"]


def _assert_logits_close(ours, theirs):
    scale = theirs.abs().max()
    assert scale > 1.0  # a meaningful comparison, not one between near-zero logits
    assert (ours - theirs).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_folder_to_lmforge(family, tmp_path):
    hf = _randomize(_hf_model(family))
    hf.config._attn_implementation = "eager"
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    tokens = torch.randint(0, 128, (2, 23))  # longer than the Mistral window (7)
    with torch.no_grad():
        _assert_logits_close(ours(tokens), hf(tokens).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_lmforge_to_hf_folder(family, tmp_path, caplog):
    hf = _randomize(_hf_model(family))
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    with torch.no_grad():
        for p in ours.parameters():  # new weights, so that the export is what is being tested
            p.add_(0.1 * torch.randn_like(p))
    save_hf_folder(ours, tmp_path / "export")
    cls = type(hf)
    with caplog.at_level(logging.WARNING):
        back, info = cls.from_pretrained(tmp_path / "export", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not [r for r in caplog.records if "weight" in r.getMessage().lower()]
    tokens = torch.randint(0, 128, (2, 23))
    with torch.no_grad():
        _assert_logits_close(ours(tokens), back.eval()(tokens).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_then_import_is_bit_exact(family, tmp_path):
    hf = _randomize(_hf_model(family))
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    save_hf_folder(ours, tmp_path / "export")
    again = load_model(tmp_path / "export")
    assert ours.config == again.config
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    save_model(again, tmp_path / "ours")
    third = load_model(tmp_path / "ours")
    for (name, a), (_, b) in zip(ours.state_dict().items(), third.state_dict().items()):
        assert torch.equal(a, b), name


def test_exported_config_keeps_what_vllm_reads(tmp_path):
    from lmforge import ModelConfig, Transformer

    def exported(preset):
        save_hf_folder(Transformer(ModelConfig.from_name(preset)), tmp_path / preset)
        return json.loads((tmp_path / preset / "config.json").read_text())

    swa, dense, moe = exported("tiny-swa"), exported("tiny"), exported("tiny-moe")
    assert swa["architectures"] == ["MistralForCausalLM"] and swa["sliding_window"] == 8
    assert dense["architectures"] == ["LlamaForCausalLM"] and "sliding_window" not in dense
    # Mistral-family folders always name their window, null when absent (vLLM and transformers read it)
    assert moe["architectures"] == ["MixtralForCausalLM"] and moe["sliding_window"] is None
    assert all(c["rope_theta"] == 10000.0 for c in (swa, dense, moe))  # top-level, where vLLM looks


def test_unsupported_architecture_names_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM"):
        load_model(tmp_path)


def test_hf_folder_with_wrong_tensors_lists_them(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _randomize(_hf_model("llama-gqa"))
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors.*layers.1.mlp.up_proj.*unexpected tensors.*extra"):
        load_model(tmp_path)
