"""`lmforge eval gatt`: adherence by turn equals a hand count on a stub; the instruction's token span and the
positions that generate each answer are the right tokens (on ids, two tokenizers); with uniform attention the
measured weight on the instruction is the uniform share; the verb runs end to end under the output rule."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import one_torch_thread  # noqa: F401  (an autouse fixture: the engine decodes on one thread)
from stage_helpers import Recorder

from lmforge.align.eval_gatt import (
    answer_queries,
    common_turns,
    eval_dialogues,
    eval_record,
    headline,
    instruction_attention,
    measure,
    text_token_span,
)
from lmforge.align.gatt_data import GATT_SAMPLING
from lmforge.align.world.folder import open_world
from lmforge.align.world.instructions import apply, instruction_text, with_instructions
from lmforge.cli import main
from lmforge.infer.sampling import SamplingParams
from lmforge.models.transformer import Attention
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import encode_chat


def _answered(d, turns, answer="It is so."):
    """Dialogue `d`'s first `turns` turns, each answered `answer`, the instruction as the system message."""
    messages = [m for u in d.users[:turns] for m in ({"role": "user", "content": u},
                                                     {"role": "assistant", "content": answer})]
    return with_instructions(messages, d.specs, "system")


CONFIGS = Path(__file__).parents[2] / "configs" / "world"


def test_the_demo_context_holds_8_turns_and_a_4096_context_20(stage_world):
    """T of the shipped eval_gatt.yaml's dialogues with 64-token answers: >= 8 in the demo's 1024-token context
    (configs/world/pretrain.yaml), all 20 in 4096 (the GPU test). The test world's tokenizer has 600 pieces, the
    demo's 2048, whose longer pieces encode the same words in fewer tokens: the demo's T is, if anything, larger."""
    shipped = yaml.safe_load((CONFIGS / "eval_gatt.yaml").read_text())
    context = yaml.safe_load((CONFIGS / "pretrain.yaml").read_text())["model"]["max_seq_len"]
    dialogues = eval_dialogues(open_world(stage_world.world), shipped["dialogues"], shipped["max_turns"])
    tok, new = stage_world.tokenizer, GATT_SAMPLING.max_new_tokens
    assert context == 1024 and shipped["max_turns"] == 20 and new == 64
    assert common_turns(tok, dialogues, new, context) >= 8
    assert common_turns(tok, dialogues, new, 4096) == 20
    assert common_turns(tok, dialogues, new, 512) < 8  # the bound binds: a context half as long holds fewer


def test_adherence_by_turn_equals_a_hand_count(stage_world):
    """Dialogue i follows its instructions up to turn 4 - i, then forgets: by turn 4/4, 3/4, 2/4, 1/4."""
    dialogues = eval_dialogues(open_world(stage_world.world), 4, 5)
    records = [eval_record(d, 4) for d in dialogues]
    by_first = {r["messages"][1]["content"]: (i, dialogues[i]) for i, r in enumerate(records)}

    def reply(dialogue):
        i, d = by_first[dialogue[1]["content"]]
        t = sum(m["role"] == "user" for m in dialogue)
        reference = d.meta["turns"][t - 1]["reference"]
        return apply(d.specs, reference) if t <= 4 - i else reference

    stub = Recorder(reply)
    figures, answers = measure(None, None, records, stub, SamplingParams(temperature=0, max_new_tokens=8), 16)
    assert figures["adherence"] == {"1": 1.0, "2": 0.75, "3": 0.5, "4": 0.25}
    assert figures["task_accuracy"] == {str(t): 1.0 for t in range(1, 5)}  # every answer solves its task
    assert figures["adherence_turns_3_to_T"] == headline(figures["adherence"]) == (0.5 + 0.25) / 2
    assert "attention" not in figures  # no model, no attention
    assert all(s[0]["role"] == "system" and s[0]["content"] == instruction_text(records[0]["meta"]["instructions"])
               for s in stub.seen[:1])  # the instruction once, as the system message
    assert sum("capital" in m["content"] for s in stub.seen for m in s[1:] if m["role"] == "user") == 0
    assert headline({"1": 1.0, "2": 0.5}) is None


@pytest.mark.parametrize("which", ["world", "random-words"])
def test_the_instruction_span_is_the_instruction_on_ids(stage_world, tokenizer_512, which):
    """The 512-piece random-word tokenizer has no capitals: the instruction's upper-case letters are byte
    pieces, whose offsets count one byte each."""
    tok = stage_world.tokenizer if which == "world" else Tokenizer(tokenizer_512)
    for d in eval_dialogues(open_world(stage_world.world), 6, 3):
        text = instruction_text(d.specs)
        for placement in ("system", "user"):
            messages = [m for u in d.users for m in ({"role": "user", "content": u},
                                                     {"role": "assistant", "content": "Yes."})]
            messages = with_instructions(messages, d.specs, placement)
            ids = encode_chat(tok, messages).ids
            start, end = text_token_span(tok, messages, text)
            assert tok.decode(ids[start:end]).strip() == text
            assert text not in tok.decode(ids[start + 1 : end]) and text not in tok.decode(ids[start : end - 1])


def test_the_queries_are_the_positions_that_generate_each_answer(stage_world):
    tok = stage_world.tokenizer
    d = eval_dialogues(open_world(stage_world.world), 1, 3)[0]
    messages = [m for t, u in enumerate(d.users) for m in ({"role": "user", "content": u},
                                                          {"role": "assistant", "content": f"Answer number {t}."})]
    ids = encode_chat(tok, messages).ids
    queries = answer_queries(tok, messages)
    assert len(queries) == 3 and all(b[0] > a[-1] for a, b in zip(queries, queries[1:]))
    for t, qs in enumerate(queries):
        predicted = [ids[q + 1] for q in qs]  # what each query position predicts
        assert predicted[-1] == tok.eos_id and tok.decode(predicted[:-1]).strip() == f"Answer number {t}."
        assert qs == list(range(qs[0], qs[-1] + 1))


def test_uniform_attention_gives_the_uniform_share(stage_world):
    """wq = 0: every query attends evenly, so the weight on the instruction is exactly the uniform share."""
    model = type(stage_world.model)(stage_world.model.config).eval()
    model.load_state_dict(stage_world.model.state_dict())
    for m in model.modules():
        if isinstance(m, Attention):
            torch.nn.init.zeros_(m.wq.weight)
    d = eval_dialogues(open_world(stage_world.world), 1, 3)[0]
    record = eval_record(d, 3)
    got = instruction_attention(model, stage_world.tokenizer, record, ["One.", "Two two.", "Three three three."])
    assert list(got) == ["1", "2", "3"]
    for t, cell in got.items():
        assert cell["mass"] == pytest.approx(cell["uniform"], rel=1e-5) and len(cell["by_layer"]) == 2
    assert got["1"]["uniform"] > got["2"]["uniform"] > got["3"]["uniform"]  # the context grows, the share falls
    real = instruction_attention(stage_world.model, stage_world.tokenizer, record, ["One.", "Two two.", "Three."])
    assert all(0 < c["mass"] < 1 for c in real.values())


def test_verb_end_to_end(stage_world, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", "gatt", f"[{stage_world.model_dir},{stage_world.model_dir}]", "--names", "[before,after]",
            "--world", str(stage_world.world), "--out_dir", str(out), "--dialogues", "3", "--max_turns", "3",
            "--attention_dialogues", "2", "--sampling.max_new_tokens", "8", "--progress", "false", "--device", "cpu"]
    main(args)
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["turns"] == 3 and report["dialogues"] == 3 and list(report["models"]) == ["before", "after"]
    before, after = report["models"]["before"], report["models"]["after"]
    assert {k: v for k, v in before.items()} == after  # the same model twice: the same figures
    assert list(before["adherence"]) == ["1", "2", "3"] and before["attention_dialogues"] == 2
    assert set(before["attention"]["3"]) == {"mass", "uniform", "by_layer"}
    assert (out / "adherence.png").stat().st_size > 0 and "3..T" in printed
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["answer"]) == 3 for r in rows)
    with pytest.raises(SystemExit):  # an earlier output: replaced only with --overwrite true
        main(args)
    assert "--overwrite true" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(args[:3] + args[5:] + ["--turns", "60", "--overwrite", "true"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "its context holds" in err and "not 60" in err and len(err.splitlines()) == 1
