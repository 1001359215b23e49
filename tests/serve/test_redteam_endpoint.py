"""`lmforge redteam` gives the same violation rate on the same prompts through the local model and through our
server (greedy): the same answers, word for word, and so the same report, in one run with both as targets."""

import json

from helpers import WORLD_SMALL
from lmforge.align.redteam import redteam
from lmforge.align.world.build import build_world
from lmforge.align.world.records import WorldSizes
from lmforge.infer.sampling import SamplingParams
from lmforge.models.checkpoint import save_model
from serve_helpers import MODEL, tiny_model


def test_redteam_in_process_equals_through_the_server(server, tokenizer_path, tmp_path):
    build_world(tmp_path / "world", seed=0, sizes=WorldSizes(**WORLD_SMALL))
    save_model(tiny_model(), tmp_path / "model", tokenizer_path=tokenizer_path)  # the served model's weights
    # NOTE: prompt + max_new_tokens must fit the tiny model's 256-token context (the server refuses more).
    report = redteam(models=tmp_path / "model", endpoint=f"{server}/v1", names=["local", "served"],
                     world=tmp_path / "world", per_cell=1, lookalikes=2, served_model=MODEL, device="cpu",
                     sampling=SamplingParams(temperature=0, max_new_tokens=24), out_dir=tmp_path / "rt")
    local, served = report["targets"]["local"], report["targets"]["served"]
    assert local["target"] == str(tmp_path / "model") and served["target"] == f"{server}/v1"
    assert local["attacks"] == 25 and local["harmless"] == 10
    drop = ("target",)
    assert {k: v for k, v in local.items() if k not in drop} == {k: v for k, v in served.items() if k not in drop}
    rows = [json.loads(line) for line in (tmp_path / "rt" / "answers.jsonl").read_text().splitlines()]
    by_target = {t: [r["answer"] for r in rows if r["target"] == t] for t in ("local", "served")}
    assert len(by_target["local"]) == 35 and by_target["local"] == by_target["served"]
    assert any(a.strip() for a in by_target["local"])  # the model does answer something
