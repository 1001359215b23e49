"""LoRA adapters on tiny random models: exact at initialisation, merged weights give the adapter forward's
logits, only adapters train, save -> load is exact, bad folders and other bases end with one clear line.

Tolerance for merged vs adapter logits: 1e-5 of the largest logit. Merging moves each weight by one float32
rounding (W + s B A is summed once instead of in the forward), which shifts unit-scale logits by ~1e-6; a
wrong scale, transpose or expert packing moves them by O(1).
"""

import json

import pytest
import torch

from helpers import unit_scale_

pytest.importorskip("peft")

from lmforge import ModelConfig, Transformer  # noqa: E402
from lmforge.io import OutputExistsError  # noqa: E402
from lmforge.lora import (  # noqa: E402
    LoraConfig, LoraError, apply_lora, base_state_dict, is_lora, load_lora, lora_shapes, lora_state_dict, merge_lora,
    read_lora, save_lora, set_lora_state_dict,
)
from lmforge.models.checkpoint import load_model, save_model  # noqa: E402

PRESETS = ["tiny", "tiny-swa", "tiny-moe"]
CFG = LoraConfig(rank=4, alpha=8.0)  # all seven targets


def base_model(preset: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return unit_scale_(Transformer(ModelConfig.from_name(preset))).eval()


def randomize_adapters_(model, seed: int = 1, std: float = 0.1):
    """Non-zero B (and new A) so that the adapters change the function: what merge and export must carry."""
    g = torch.Generator().manual_seed(seed)
    set_lora_state_dict(model, {k: torch.randn(v.shape, generator=g) * std for k, v in lora_state_dict(model).items()})
    return model


def tokens(T: int = 20, B: int = 2):  # longer than tiny-swa's window (8)
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(2))


def assert_logits_close(ours, theirs):
    scale = theirs.abs().max()
    assert scale > 1.0
    assert (ours - theirs).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("preset", PRESETS)
def test_at_initialisation_the_logits_are_the_base_logits_exactly(preset):
    model = base_model(preset)
    with torch.no_grad():
        before = model(tokens())
        apply_lora(model, CFG)
        after = model(tokens())
    assert torch.equal(before, after)
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in lora_state_dict(model).items() if k.endswith("lora_B"))


@pytest.mark.parametrize("preset", PRESETS)
def test_merged_weights_give_the_adapter_forward_logits(preset):
    model = randomize_adapters_(apply_lora(base_model(preset), CFG))
    with torch.no_grad():
        adapted = model(tokens())
        merged = merge_lora(model)
        assert type(merged) is Transformer and not is_lora(merged)
        assert not any("lora" in name for name in merged.state_dict())
        assert_logits_close(merged(tokens()), adapted)
        # the adapters matter: the merged model is far from its base
        assert (adapted - base_model(preset)(tokens())).abs().max() > 0.1


def test_merge_follows_the_formula_on_one_projection_and_one_expert():
    """W' = W + (alpha / r) B A, computed by hand for wk of layer 0 and expert 2's w2 of an MoE layer 1."""
    for preset, name, base_key in (("tiny", "layers.0.attention.wk", "layers.0.attention.wk.weight"),
                                   ("tiny-moe", "layers.1.feed_forward.w2", "layers.1.feed_forward.w2")):
        model = randomize_adapters_(apply_lora(base_model(preset), LoraConfig(rank=3, alpha=6.0)))
        W = base_model(preset).state_dict()[base_key]
        A, B = lora_state_dict(model)[f"{name}.lora_A"], lora_state_dict(model)[f"{name}.lora_B"]
        merged = merge_lora(model).state_dict()[base_key]
        if W.dim() == 3:  # expert 2 of the stack: (E, d, f) weights, (E, r, f) A, (E, d, r) B
            W, A, B, merged = W[2], A[2], B[2], merged[2]
        expected = W + 2.0 * sum(torch.outer(B[:, k], A[k]) for k in range(3))  # s = 6 / 3, rank-one terms
        torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_our_merge_equals_peft_merge(preset):
    """peft's own `merge()` of every layer (its packing of the experts' factors) gives our merged weights."""
    model = randomize_adapters_(apply_lora(base_model(preset), CFG))
    ours = merge_lora(model).state_dict()
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    for name, theirs in base_state_dict(model.state_dict()).items():
        torch.testing.assert_close(ours[name], theirs, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_only_adapters_train_and_the_base_stays_bit_identical(preset):
    model = apply_lora(base_model(preset), LoraConfig(rank=4, alpha=8.0, dropout=0.0 if preset == "tiny-moe" else 0.1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == len(lora_shapes(model.config, model.lora_config))
    base_before = {k: v.clone() for k, v in base_state_dict(model.state_dict()).items()}
    lora_before = lora_state_dict(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    x = tokens(12)
    for _ in range(3):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        opt.step()
        opt.zero_grad()
    for name, value in base_state_dict(model.state_dict()).items():
        assert torch.equal(value, base_before[name]), name
    after = lora_state_dict(model)
    assert all(not torch.equal(after[k], lora_before[k]) for k in after)  # every A and B moved


def test_dtype_policy_bf16_base_float32_adapters():
    model = base_model("tiny").to(torch.bfloat16)
    apply_lora(model, CFG)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if ".lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if ".lora_" not in n} == {torch.bfloat16}
    randomize_adapters_(model)
    assert model(tokens()).dtype == torch.bfloat16
    assert merge_lora(model).output.weight.dtype == torch.bfloat16  # merged in float32, stored in the base dtype


def test_adapter_state_dict_layout_and_our_names():
    model = apply_lora(base_model("tiny-moe"), LoraConfig(rank=3, targets=("wk", "w2")))
    shapes = {k: tuple(v.shape) for k, v in lora_state_dict(model).items()}
    # tiny-moe: d 64, Hkv 2 x D 16, 4 experts of width 96
    assert shapes == {
        **{f"layers.{i}.attention.wk.lora_A": (3, 64) for i in range(2)},
        **{f"layers.{i}.attention.wk.lora_B": (32, 3) for i in range(2)},
        **{f"layers.{i}.feed_forward.w2.lora_A": (4, 3, 96) for i in range(2)},
        **{f"layers.{i}.feed_forward.w2.lora_B": (4, 64, 3) for i in range(2)},
    }
    assert shapes == lora_shapes(model.config, model.lora_config)


def test_save_then_load_is_exact(tmp_path):
    model = randomize_adapters_(apply_lora(base_model("tiny-moe"), CFG, base_path="models/base"))
    save_lora(model, tmp_path / "adapter")
    record = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert record["format"] == "lmforge-lora/1" and record["base"]["path"] == "models/base"
    assert record["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": list(CFG.targets)}
    assert record["tensors"]["layers.0.feed_forward.w1.lora_A"] == [4, 4, 64]
    assert (tmp_path / "adapter" / ".lmforge-output").is_file()

    fresh = load_lora(base_model("tiny-moe"), tmp_path / "adapter")  # a plain base: adapters are added
    assert fresh.lora_config == CFG
    for name, value in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(fresh)[name], value), name
    with torch.no_grad():
        assert torch.equal(fresh(tokens()), model(tokens()))


def test_the_fingerprint_is_the_same_for_a_bf16_copy_and_differs_for_other_weights(tmp_path):
    """Adapters trained on the bf16 copy of a base on the GPU load onto its float32 file, and only onto it."""
    from lmforge.lora import base_fingerprint

    base = base_model("tiny")
    fp32 = base_fingerprint(base.state_dict())
    assert base_fingerprint({k: v.to(torch.bfloat16) for k, v in base.state_dict().items()}) == fp32
    assert base_fingerprint(base_model("tiny", seed=1).state_dict()) != fp32
    nudged = {k: v.clone() for k, v in base.state_dict().items()}
    nudged["layers.1.feed_forward.w2.weight"][0, 0] += 1.0  # an element the sample reads (the first)
    assert base_fingerprint(nudged) != fp32
    save_lora(randomize_adapters_(apply_lora(base_model("tiny").to(torch.bfloat16), CFG)), tmp_path / "adapter")
    assert is_lora(load_lora(base_model("tiny"), tmp_path / "adapter"))


def test_save_follows_the_output_rule(tmp_path):
    model = apply_lora(base_model("tiny"), CFG)
    save_lora(model, tmp_path / "a")
    with pytest.raises(OutputExistsError, match="--overwrite true"):
        save_lora(model, tmp_path / "a")
    save_lora(model, tmp_path / "a", overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="lmforge did not write it"):
        save_lora(model, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "adapter"
    save_lora(randomize_adapters_(apply_lora(base_model("tiny"), CFG)), path)
    return path


def _one_line_error(match: str, fn, *args):
    with pytest.raises(LoraError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)


def test_a_different_base_is_refused_with_one_line(saved):
    _one_line_error(r"different base model: n_layers 2 \(model: 3\)", load_lora,
                    Transformer(ModelConfig.from_name("tiny", n_layers=3)), saved)
    _one_line_error("other base weights.*fingerprint", load_lora, base_model("tiny", seed=5), saved)
    _one_line_error("holds adapters for", load_lora, apply_lora(base_model("tiny"), LoraConfig(rank=2)), saved)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_adapter_folders_end_with_one_line(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _one_line_error("is not a folder", read_lora, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    _one_line_error("has no config.json", read_lora, tmp_path / "empty")
    bad_json = _copy(saved, tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{not json")
    _one_line_error("is not valid JSON", read_lora, bad_json)
    model_folder = tmp_path / "model"
    save_model(base_model("tiny"), model_folder)
    _one_line_error("format 'lmforge/1' is not 'lmforge-lora/1'", read_lora, model_folder)
    bad_cfg = _copy(saved, tmp_path / "bad_cfg")
    record = json.loads((bad_cfg / "config.json").read_text())
    record["lora"]["targets"] = ["wq", "attn"]
    (bad_cfg / "config.json").write_text(json.dumps(record))
    _one_line_error("not a valid adapter config.*lora.targets", read_lora, bad_cfg)
    no_weights = _copy(saved, tmp_path / "no_weights")
    (no_weights / "adapter.safetensors").unlink()
    _one_line_error("has no adapter.safetensors", read_lora, no_weights)
    truncated = _copy(saved, tmp_path / "truncated")
    (truncated / "adapter.safetensors").write_bytes((saved / "adapter.safetensors").read_bytes()[:100])
    _one_line_error("not a readable safetensors file", read_lora, truncated)
    wrong = _copy(saved, tmp_path / "wrong")
    state = load_file(wrong / "adapter.safetensors")
    del state["layers.1.feed_forward.w3.lora_B"]
    state["layers.0.attention.wq.lora_A"] = torch.zeros(5, 64)
    state["layers.0.extra"] = torch.zeros(1)
    save_file(state, wrong / "adapter.safetensors")
    _one_line_error(r"missing layers.1.feed_forward.w3.lora_B; unexpected layers.0.extra; mis-shaped "
                    r"layers.0.attention.wq.lora_A \(5, 64\) instead of \(4, 64\)", read_lora, wrong)


def test_config_validation():
    with pytest.raises(LoraError, match="lora.targets"):
        LoraConfig(rank=4, targets=("wq", "q_proj"))
    with pytest.raises(LoraError, match="lora.rank"):
        LoraConfig(rank=-1)
    with pytest.raises(LoraError, match="lora.rank is 0"):
        apply_lora(base_model("tiny"), LoraConfig())
    with pytest.raises(LoraError, match="dropout must be 0 when the experts"):
        apply_lora(base_model("tiny-moe"), LoraConfig(rank=4, dropout=0.1))
    with pytest.raises(LoraError, match="already has LoRA adapters"):
        apply_lora(apply_lora(base_model("tiny"), CFG), CFG)
    with torch.device("meta"):
        meta = Transformer(ModelConfig.from_name("tiny"))
    with pytest.raises(LoraError, match="needs the loaded single-device base"):
        apply_lora(meta, CFG)
    # an MoE model's attention alone takes dropout
    assert is_lora(apply_lora(base_model("tiny-moe"), LoraConfig(rank=4, dropout=0.1, targets=("wq", "wv"))))


def test_lora_options_parse_from_the_command_line():
    """The training verbs take the config as `--lora.*` (jsonargparse reads the dataclass and its docstring)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--lora", type=LoraConfig, default=LoraConfig())
    cfg = parser.instantiate(parser.parse_args(["--lora.rank", "16", "--lora.targets", "[wq, wv]"])).lora
    assert cfg == LoraConfig(rank=16, alpha=16.0, targets=("wq", "wv"))
    assert "Scale numerator" in parser.format_help() or "alpha" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--lora.targets", "[wq, q_proj]"])


def test_loaded_base_in_our_format_round_trips_with_its_adapter(tmp_path):
    """The flow of a run: base folder -> load -> apply -> save adapters; later load both -> same logits."""
    save_model(base_model("tiny-swa"), tmp_path / "base")
    model = randomize_adapters_(apply_lora(load_model(tmp_path / "base"), CFG, base_path=tmp_path / "base"))
    save_lora(model, tmp_path / "adapter")
    from lmforge.lora import load_lora_model

    again = load_lora_model(tmp_path / "adapter")  # the recorded base folder
    with torch.no_grad():
        assert torch.equal(again(tokens()), model(tokens()))


def test_the_engine_serves_the_merged_model_with_the_adapter_models_greedy_tokens():
    """LLMEngine (paged cache, chunked pre-fill, batching) on the merged model against greedy decoding of the
    adapter model by full recomputation; prompt plus output run past tiny-swa's window (8)."""
    from lmforge.infer.engine import LLMEngine
    from lmforge.infer.sampling import SamplingParams

    model = randomize_adapters_(apply_lora(base_model("tiny-swa"), CFG))
    engine = LLMEngine(merge_lora(model).eval(), block_size=4, num_blocks=64, max_num_batched_tokens=16,
                       max_num_seqs=4, check_invariants=True)
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 11)]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=6))
    for prompt, out in zip(prompts, outs):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert out == seq[len(prompt):]
