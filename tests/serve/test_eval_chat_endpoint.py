"""`eval chat` gives the same figures in-process and through our server on the same prompts (greedy): the same
answers, word for word, and so the same report."""

import json

from helpers import WORLD_SMALL
from lmforge.align.eval_chat import eval_chat
from lmforge.align.world.build import build_world
from lmforge.align.world.records import WorldSizes
from lmforge.infer.sampling import SamplingParams
from lmforge.models.checkpoint import save_model
from serve_helpers import MODEL, tiny_model


def test_eval_chat_in_process_equals_through_the_server(server, tokenizer_path, tmp_path):
    world = tmp_path / "world"
    build_world(world, seed=0, sizes=WorldSizes(**WORLD_SMALL))
    # NOTE: prompt + max_new_tokens must fit the tiny model's 256-token context: the server refuses more (400, as
    # OpenAI's API does), where the engine alone would stop the answer at the context's end. A fact look-up of
    # difficulty 3 carries a card of six facts, over 256 tokens in the test's 512-piece tokenizer: left out.
    metas = [(line, json.loads(line)["meta"]) for line in (world / "eval_tasks.jsonl").read_text().splitlines()]
    tasks = [line for line, m in metas if (m["family"], m["difficulty"]) != ("facts", 3)]
    (world / "eval_tasks_short.jsonl").write_text("\n".join(tasks) + "\n")
    prompts = [world / f"{name}.jsonl" for name in ("eval_tasks_short", "eval_unsafe", "eval_lookalikes",
                                                     "eval_instructions")]
    save_model(tiny_model(), tmp_path / "model", tokenizer_path=tokenizer_path)  # the served model's weights
    common = dict(prompts=prompts, limit=4, progress=False, sampling=SamplingParams(temperature=0, max_new_tokens=24))
    local = eval_chat(tmp_path / "model", out=tmp_path / "local.json", **common)
    remote = eval_chat(MODEL, out=tmp_path / "remote.json", endpoint=f"{server}/v1", **common)
    answers = [[json.loads(line)["answer"] for line in (tmp_path / f"{n}.answers.jsonl").read_text().splitlines()]
               for n in ("local", "remote")]
    assert len(answers[0]) == 4 * 4 and answers[0] == answers[1]
    assert any(a for a in answers[0] if isinstance(a, str) and a.strip())  # the model does answer something
    drop = ("model",)
    assert {k: v for k, v in local.items() if k not in drop} == {k: v for k, v in remote.items() if k not in drop}
