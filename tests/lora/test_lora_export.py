"""Exports of an adapter folder: the peft adapter on the Hugging Face export of the base gives our logits in
transformers + peft (Llama; Mistral with a window shorter than the input; Mixtral's attention), the merged
exports give the adapter model's logits, and `lmforge lora export` ends bad input with one line.

Tolerance: 1e-5 of the largest logit, as for the model's own Hugging Face parity (tests/models): the two
sides differ in summation order only; a missing rotary permutation of B, a wrong scale or name moves unit-scale
logits by O(1).
"""

import json
import logging

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from test_lora import CFG, assert_logits_close, base_model, randomize_adapters_, tokens  # noqa: E402

from lmforge.cli import main  # noqa: E402
from lmforge.lora import LoraConfig, apply_lora, read_lora, save_lora  # noqa: E402
from lmforge.lora_export import export_lora  # noqa: E402
from lmforge.models.checkpoint import load_model, save_model  # noqa: E402
from lmforge.models.convert import save_hf_folder  # noqa: E402


def _trained(tmp_path, preset, cfg=CFG):
    """A base folder in our format and an adapter folder trained on it (random non-zero adapters)."""
    save_model(base_model(preset), tmp_path / "base")
    model = randomize_adapters_(apply_lora(load_model(tmp_path / "base"), cfg, base_path=tmp_path / "base"))
    save_lora(model, tmp_path / "adapter")
    return model.eval()


@pytest.mark.parametrize("preset, cfg", [
    ("tiny", CFG),                                             # LlamaForCausalLM, GQA 4:2
    ("tiny-swa", CFG),                                         # MistralForCausalLM, window 8 < 23 tokens
    ("tiny-moe", LoraConfig(rank=4, alpha=8.0, targets=("wq", "wk", "wv", "wo"))),  # Mixtral, attention only
])
def test_peft_adapter_on_the_hf_base_gives_our_logits(preset, cfg, tmp_path, caplog):
    from peft import PeftModel

    ours = _trained(tmp_path, preset, cfg)
    save_hf_folder(load_model(tmp_path / "base"), tmp_path / "hf")
    main(["convert", str(tmp_path / "adapter"), str(tmp_path / "peft"), "--to", "peft"])  # = lmforge lora export
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8 and adapter_config["peft_type"] == "LORA"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    with caplog.at_level(logging.WARNING):
        hf = PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    assert not [r for r in caplog.records if any(w in r.getMessage().lower() for w in ("missing", "unexpected"))]
    x = tokens(23)
    with torch.no_grad():
        theirs = hf(x).logits
        assert_logits_close(ours(x), theirs)
        with hf.disable_adapter():  # the adapter was loaded and matters
            assert (hf(x).logits - theirs).abs().max() > 0.1


def test_peft_export_refuses_expert_adapters(tmp_path):
    _trained(tmp_path, "tiny-moe")
    with pytest.raises(ValueError, match="experts of an MoE layer, which do not export to peft"):
        export_lora(tmp_path / "adapter", tmp_path / "peft", to="peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("preset", ["tiny-swa", "tiny-moe"])
def test_merged_exports_give_the_adapter_logits(preset, tmp_path):
    ours = _trained(tmp_path, preset)
    (tmp_path / "base" / "tokenizer.model").write_bytes(b"not read")  # copied along with the merged model
    main(["lora", "export", str(tmp_path / "adapter"), str(tmp_path / "merged")])  # base: the recorded folder
    merged = load_model(tmp_path / "merged")
    assert (tmp_path / "merged" / "tokenizer.model").read_bytes() == b"not read"
    assert (tmp_path / "merged" / ".lmforge-output").is_file()
    (tmp_path / "base" / "tokenizer.model").unlink()  # the Hugging Face export would convert a real one
    x = tokens(23)
    with torch.no_grad():
        expected = ours(x)
        assert_logits_close(merged(x), expected)
        export_lora(tmp_path / "adapter", tmp_path / "merged-hf", to="hf", base=tmp_path / "base")
        assert json.loads((tmp_path / "merged-hf" / "config.json").read_text())["architectures"][0].endswith("CausalLM")
        assert_logits_close(load_model(tmp_path / "merged-hf")(x), expected)
        main(["convert", str(tmp_path / "adapter"), str(tmp_path / "converted")])  # convert takes adapter folders too
        assert_logits_close(load_model(tmp_path / "converted")(x), expected)


def test_export_errors_are_one_line(tmp_path, capsys):
    _trained(tmp_path, "tiny")
    other = tmp_path / "other"
    save_model(base_model("tiny", seed=9), other)
    for argv, message in [
        (["lora", "export", str(tmp_path / "nowhere"), str(tmp_path / "x")], "is not a folder"),
        (["lora", "export", str(tmp_path / "adapter"), str(tmp_path / "x"), "--base", str(other)],
         "was trained on other base weights"),
        (["lora", "export", str(tmp_path / "adapter"), str(tmp_path / "base")], "holds an earlier lmforge output"),
        (["convert", str(tmp_path / "base"), str(tmp_path / "x"), "--to", "peft"], "exports an adapter folder"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("lmforge: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
    assert read_lora(tmp_path / "adapter").lora == CFG
