"""The vLLM-ready export (issue 15, item 5): generation_config.json, and the model package knows no text."""

import ast
import json
from pathlib import Path

import pytest
import torch

from helpers import tiny_tokenizer_path
from lmforge import ModelConfig, Tokenizer, Transformer
from lmforge.cli import VERBS, main
from lmforge.export import export_hf
from lmforge.models.checkpoint import load_model, save_model
from lmforge.models.convert import hf_generation_config

MODELS = Path(__file__).parents[1] / "src" / "lmforge" / "models"


def _imports(path: Path) -> set[str]:
    """Every lmforge module that `path` imports, at the top or inside a function (`from lmforge.models
    import convert` counts as lmforge.models.convert)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("lmforge")}


def test_the_model_package_imports_no_text_and_has_no_cycle():
    """models/convert.py imported the tokenizer's exporter, and checkpoint.py and convert.py imported each
    other; the export of a model with its tokenizer lives above the package, in lmforge.export."""
    files = sorted(MODELS.glob("*.py"))
    graph = {f"lmforge.models.{f.stem}": _imports(f) for f in files}
    assert len(graph) >= 6  # config, transformer, attention, moe, checkpoint, convert, files, ...
    for module, imported in graph.items():
        assert not {m for m in imported if m.startswith(("lmforge.tokenizer", "lmforge.data", "lmforge.export"))}, module
    assert "lmforge.models.convert" in graph["lmforge.models.checkpoint"]
    assert not {m for m in graph["lmforge.models.convert"] if m.startswith("lmforge.models.checkpoint")}

    def reaches(start: str, goal: str, seen: set) -> bool:
        for m in graph.get(start, ()):
            if m == goal or (m not in seen and reaches(m, goal, seen | {m})):
                return True
        return False

    assert [m for m in graph if reaches(m, m, set())] == []
    assert VERBS["convert"] == "lmforge.export:convert"


def test_generation_config_is_written_and_read_by_transformers(tmp_path, capsys):
    """`convert --to hf` writes generation_config.json with the tokenizer's <s> and </s>; transformers reads it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-swa"))
    save_model(model, tmp_path / "ours", tokenizer_path=tiny_tokenizer_path())
    main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"])
    hf = tmp_path / "hf"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "tokenizer.model"} <= {p.name for p in hf.iterdir()}
    tok = Tokenizer(tiny_tokenizer_path())
    assert json.loads((hf / "generation_config.json").read_text()) == {"bos_token_id": tok.bos_id,
                                                                       "eos_token_id": tok.eos_id}
    generation = transformers.GenerationConfig.from_pretrained(hf)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, None)
    config = json.loads((hf / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2) and config["sliding_window"] == model.config.sliding_window == 8
    back = load_model(hf)
    assert torch.equal(back.layers[0].attention.wq.weight, model.layers[0].attention.wq.weight)


def test_generation_config_pad_only_if_the_tokenizer_has_one(tmp_path):
    assert hf_generation_config() == {"bos_token_id": 1, "eos_token_id": 2}
    assert hf_generation_config(pad_id=-1) == {"bos_token_id": 1, "eos_token_id": 2}  # SentencePiece's "none"
    assert hf_generation_config(1, 2, pad_id=0) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    export_hf(Transformer(ModelConfig.from_name("tiny")), tmp_path / "no-tokenizer")
    assert json.loads((tmp_path / "no-tokenizer" / "generation_config.json").read_text()) == hf_generation_config()
