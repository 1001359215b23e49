"""On CUDA: the temperature analysis runs model after model (each engine takes most of the free memory for its KV
cache, so the previous one must be freed first), repeats itself exactly from its seeds, and its greedy row is one
answer per prompt. Run on the device machine (`pytest -m gpu tests/analyze`); skipped elsewhere."""

import json

import pytest
import torch
from helpers import WORLD_SMALL, unit_scale_

from lmforge import ModelConfig, Transformer
from lmforge.align.world.build import build_world
from lmforge.align.world.records import WorldSizes
from lmforge.analyze.temperature import analyze_temperature
from lmforge.infer.sampling import SamplingParams
from lmforge.models.checkpoint import save_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_models_in_sequence_on_cuda_free_their_engines_and_repeat_exactly(tmp_path, tokenizer_512):
    build_world(tmp_path / "world", seed=0, sizes=WorldSizes(**WORLD_SMALL))
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = unit_scale_(Transformer(ModelConfig.from_name("tiny", max_seq_len=256)))
        save_model(model, tmp_path / f"m{seed}", tokenizer_path=tokenizer_512)
        models.append(str(tmp_path / f"m{seed}"))
    kw = dict(world=tmp_path / "world", temperatures=(0.0, 0.7, 1.2), samples=4, prompts=3,
              sampling=SamplingParams(max_new_tokens=16), device="cuda", progress=False)
    free_before = torch.cuda.mem_get_info()[0]
    first = analyze_temperature(models, out_dir=tmp_path / "a", **kw)
    assert torch.cuda.mem_get_info()[0] > 0.9 * free_before  # no engine's KV cache left behind
    again = analyze_temperature(models, out_dir=tmp_path / "b", **kw)
    assert again["results"] == first["results"]
    assert (tmp_path / "a" / "samples.jsonl").read_text() == (tmp_path / "b" / "samples.jsonl").read_text()
    rows = [json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    greedy: dict = {}
    for r in rows:
        if r["temperature"] == 0:
            greedy.setdefault((r["model"], r["set"], r["id"]), set()).add(r["answer"])
    assert len(greedy) == 3 * 2 * 3 and all(len(answers) == 1 for answers in greedy.values())
    assert (tmp_path / "a" / "temperature.png").stat().st_size > 0
