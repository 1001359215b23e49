"""Our safetensors folder: round trip, sharding, clear errors, atomic writes; Meta .pth import."""

import json

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.models.checkpoint import CheckpointError, load_model, save_model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("preset", ["tiny", "tiny-swa", "tiny-moe"])
def test_round_trip(preset, tmp_path):
    model = Transformer(ModelConfig.from_name(preset))
    save_model(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["format"] == "lmforge/1"
    back = load_model(tmp_path / "m")
    assert back.config == model.config and _same(model, back)


def test_sharded_round_trip_and_dtype(tmp_path):
    model = Transformer(ModelConfig.from_name("tiny"))
    save_model(model, tmp_path / "m", max_shard_bytes=100_000)
    files = sorted(p.name for p in (tmp_path / "m").iterdir() if p.name != ".lmforge-output")
    assert "model.safetensors.index.json" in files and "model-00001-of-" in files[1]
    assert _same(model, load_model(tmp_path / "m"))
    half = load_model(tmp_path / "m", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_tokenizer_is_copied(tmp_path):
    (tmp_path / "tok.model").write_bytes(b"not really a model")
    save_model(Transformer(ModelConfig.from_name("tiny")), tmp_path / "m", tokenizer_path=tmp_path / "tok.model")
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == b"not really a model"


def test_mismatched_tensors_are_listed(tmp_path):
    save_model(Transformer(ModelConfig.from_name("tiny")), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["ffn_dim"] = 100
    cfg["n_layers"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "m")
    text = str(err.value)
    assert "missing tensors: ['layers.2." in text
    assert "mis-shaped tensors" in text and "layers.0.feed_forward.w1.weight: checkpoint (176, 64) vs model (100, 64)" in text


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import lmforge.models.files as ckpt

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(Transformer(ModelConfig.from_name("tiny")), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_previous_complete_folder(tmp_path, monkeypatch):
    import lmforge.models.files as ckpt

    model = Transformer(ModelConfig.from_name("tiny"))
    save_model(model, tmp_path / "m")
    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_model(Transformer(ModelConfig.from_name("tiny")), tmp_path / "m", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert _same(model, load_model(tmp_path / "m"))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_meta_consolidated_import(tmp_path):
    """A Meta-layout folder (params.json + two model-parallel shards) loads to the same model."""
    cfg = ModelConfig.from_name("tiny", vocab_size=64)
    model = Transformer(cfg)
    state = model.state_dict()
    dim0 = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
    dim1 = ("wo.weight", "w2.weight", "tok_embeddings.weight")
    shards = [{}, {}]
    for name, t in state.items():
        dim = 0 if name.endswith(dim0) else 1 if name.endswith(dim1) else None
        parts = t.chunk(2, dim=dim) if dim is not None else (t, t)
        for s, p in zip(shards, parts):
            s[name] = p.clone()
    shards[0]["rope.freqs"] = torch.zeros(4)
    for i, s in enumerate(shards):
        torch.save(s, tmp_path / f"consolidated.{i:02d}.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "norm_eps": 1e-5,
              "multiple_of": 16, "max_seq_len": 256}
    (tmp_path / "params.json").write_text(json.dumps(params))
    back = load_model(tmp_path)
    assert back.config == cfg and _same(model, back)


def test_meta_mixtral_experts_are_stacked(tmp_path):
    cfg = ModelConfig.from_name("tiny-moe", vocab_size=64)
    model = Transformer(cfg)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith(("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")):
            base, w = name.rsplit(".", 1)
            state.update({f"{base}.experts.{e}.{w}.weight": t[e] for e in range(t.shape[0])})
        else:
            state[name] = t
    torch.save(state, tmp_path / "consolidated.00.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64, "norm_eps": 1e-5,
              "max_seq_len": 256, "moe": {"num_experts": 4, "num_experts_per_tok": 2}}
    (tmp_path / "params.json").write_text(json.dumps(params))
    back = load_model(tmp_path)
    assert back.config.moe.num_experts == 4 and _same(model, back)


def test_saved_folder_has_ordinary_permissions(tmp_path):
    import os
    import stat

    save_model(Transformer(ModelConfig.from_name("tiny")), tmp_path / "m")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o777 & ~umask
