"""`lmforge eval chat`: the report's numbers equal a hand count on a stub answerer with known answers; rollouts feed
the model its own answers; the engine answerer gives the tokens of plain greedy generation; the verb runs end to
end on a tiny random model and tokenizer."""

import json

import pytest
import torch
from helpers import WORLD_SMALL as SMALL
from helpers import one_torch_thread  # noqa: F401  (an autouse fixture: the engine decodes on one thread)
from helpers import unit_scale_

from lmforge import ModelConfig, Transformer
from lmforge.align.eval_chat import answer_prompts, engine_answerer, read_records, score_answers
from lmforge.align.world import oracle, safety
from lmforge.align.world.build import build_world
from lmforge.align.world.common import VERSION, stream
from lmforge.align.world.instructions import apply
from lmforge.align.world.records import World, WorldSizes, prompt_record
from lmforge.cli import main
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.models.checkpoint import save_model
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.tokenizer.chat import encode_chat

REFUSAL = "I'm sorry, but I can't help with that."
WRONG = "It is 999, with hat, box and nothing else."  # wrong for every task family


def _records():
    """A small mixed prompt set with the answer the stub gives each (known to be right or wrong)."""
    w = World(0)
    recs, answers = [], []
    for family in ("arithmetic", "lists", "facts", "counting"):
        for k, d in enumerate((1, 2, 3, 1)):
            t = w.tasks(family, d, "heldout", 1, stream(0, f"stub|{family}|{k}"))[0]
            recs.append(prompt_record([{"role": "user", "content": t.prompt}], t.meta))
            answers.append(WRONG if d == 2 else t.reference)  # per family: d1 2/2, d2 0/1, d3 1/1 right
    comply = {"potion": (False, True), "coins": (False, False), "vault": (True, True), "beetles": (False, False),
              "curse": (False, True)}
    for c, plan in comply.items():
        for k, complies in enumerate(plan):
            messages, meta = w.unsafe("heldout", 1, stream(0, f"stub|unsafe|{c}|{k}"), c, "direct")[0]
            recs.append(prompt_record(messages, meta))
            answers.append("Sure, here is how." if complies else meta["reference"])
    for c in safety.CATEGORY_NAMES:
        for k in range(2):
            messages, meta = w.lookalikes("heldout", 1, stream(0, f"stub|look|{c}|{k}"), c)[0]
            recs.append(prompt_record(messages, meta))
            answers.append((REFUSAL if k == 0 else meta["reference"]) if c == "potion" else
                           (meta["reference"] if k == 0 else "It is a thing."))
    for k, (messages, meta) in enumerate(w.instruction_prompts("heldout", 4, 1, stream(0, "stub|instr"))):
        recs.append(prompt_record(messages, meta))
        ref = meta["turns"][0]["reference"]
        answers.append(ref if k == 1 else apply(meta["instructions"], ref))  # 3 of 4 follow
    for messages, meta in w.instruction_prompts("heldout", 2, 3, stream(0, "stub|rollout")):
        recs.append(prompt_record(messages, meta))
        specs = meta["instructions"]
        answers.append([apply(specs, meta["turns"][0]["reference"]), apply(specs, "wrong"),
                        meta["turns"][2]["reference"]])  # follows, follows (task wrong), forgets
    return recs, answers


class Stub:
    """Answers each dialogue from a table of known answers, and records what it was sent."""

    def __init__(self, records, answers):
        self.table, self.calls = {}, []
        for r, a in zip(records, answers):
            users = [m["content"] for m in r["messages"] if m["role"] == "user"]
            for t, text in enumerate(a if isinstance(a, list) else [a]):
                self.table[(r["messages"][0]["content"], users[t] if r["meta"].get("rollout") else users[-1])] = text

    def __call__(self, dialogues, sampling):
        self.calls.append(dialogues)
        return [self.table[(d[0]["content"], d[-1]["content"])] for d in dialogues]


def test_report_equals_a_hand_count():
    records, answers = _records()
    stub = Stub(records, answers)
    got = answer_prompts(None, None, records, answer=stub, chunk_size=7, progress=False)
    assert got == answers
    report = score_answers(records, got)
    assert report["records"] == len(records) == 16 + 10 + 10 + 4 + 2 and report["answers"] == 40 + 2 * 3
    tasks = report["tasks"]
    assert tasks["accuracy"] == 12 / 16 and tasks["n"] == 16
    for family in ("arithmetic", "lists", "facts", "counting"):
        f = tasks["by_family"][family]
        assert f["accuracy"] == 0.75 and f["n"] == 4
        assert f["by_difficulty"] == {"1": {"accuracy": 1.0, "n": 2}, "2": {"accuracy": 0.0, "n": 1},
                                      "3": {"accuracy": 1.0, "n": 1}}
    unsafe = report["unsafe"]
    assert unsafe["violation_rate"] == 4 / 10 and unsafe["by_style"] == {"direct": {"violation_rate": 0.4, "n": 10}}
    assert {c: v["violation_rate"] for c, v in unsafe["by_category"].items()} == {
        "beetles": 0.0, "coins": 0.0, "curse": 0.5, "potion": 0.5, "vault": 1.0}
    looks = report["lookalikes"]
    assert looks["false_refusal_rate"] == 1 / 10 and looks["helpful_rate"] == 5 / 10
    assert looks["by_category"]["potion"] == {"false_refusal_rate": 0.5, "n": 2}
    assert looks["by_category"]["coins"] == {"false_refusal_rate": 0.0, "n": 2}
    ins = report["instructions"]
    assert ins["n"] == 4 + 6 and ins["adherence"] == (3 + 2 + 2 + 0) / 10
    assert ins["by_turn"] == {"1": {"adherence": 5 / 6, "n": 6}, "2": {"adherence": 1.0, "n": 2},
                              "3": {"adherence": 0.0, "n": 2}}
    assert ins["task_accuracy"] == (4 + 2 + 0 + 2) / 10
    h = [oracle.helpfulness(r, a) for r, a in zip(records, answers)]
    assert report["oracle"]["helpfulness"] == pytest.approx(sum(h) / len(h))
    assert report["oracle"]["safety"] == (len(records) - 4) / len(records)


def test_rollouts_see_their_own_earlier_answers():
    records, answers = _records()
    stub = Stub(records, answers)
    answer_prompts(None, None, records, answer=stub, chunk_size=100, progress=False)
    assert len(stub.calls) == 3  # one call per turn: every record's turn 1, then the rollouts' turns 2 and 3
    assert [len(c) for c in stub.calls] == [len(records), 2, 2]
    for t, call in enumerate(stub.calls[1:], 1):
        for dialogue, (r, a) in zip(call, [(r, a) for r, a in zip(records, answers) if r["meta"].get("rollout")]):
            assert dialogue[0] == r["messages"][0] and dialogue[0]["role"] == "system"
            assert [m["content"] for m in dialogue if m["role"] == "assistant"] == a[:t]  # not the references
            assert [m["role"] for m in dialogue[1:]] == ["user", "assistant"] * t + ["user"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small world, a 600-piece tokenizer trained on its corpus, a tiny random model saved with it."""
    root = tmp_path_factory.mktemp("evalchat")
    build_world(root / "world", seed=0, sizes=WorldSizes(**SMALL))
    tok_path = train_tokenizer([str(root / "world" / "corpus")], out_dir=str(root / "tok"), vocab_size=600)
    torch.manual_seed(0)
    model = unit_scale_(Transformer(ModelConfig.from_name("tiny", vocab_size=600, max_seq_len=512))).eval()
    save_model(model, root / "model", tokenizer_path=tok_path)
    return root, model, Tokenizer(tok_path)


def test_engine_answers_are_greedy_generation(tiny):
    root, model, tok = tiny
    records = read_records(root / "world" / "eval_tasks.jsonl", limit=6)
    records += read_records(root / "world" / "eval_unsafe.jsonl", limit=3)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=8)
    got = answer_prompts(model, tok, records, sampling, answer=engine_answerer(model, tok, batch_size=4),
                         progress=False)
    assert got == _greedy_answers(model, tok, records, sampling) and any(got)


def _greedy_answers(model, tok, records, sampling):
    prompts = [encode_chat(tok, r["messages"], add_generation_prompt=True).ids for r in records]
    return [tok.decode([t for t in g.token_ids if t != tok.eos_id])
            for g in generate(model, tok, prompts, sampling)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_answers_on_cuda_are_greedy_generation(tiny):
    """The engine's default CUDA path (graph-replayed decode steps, fused decode attention) answers as plain
    greedy generation on the same GPU, in float32."""
    root, model, tok = tiny
    cuda = type(model)(model.config).cuda().eval()
    cuda.load_state_dict(model.state_dict())
    records = read_records(root / "world" / "eval_tasks.jsonl", limit=24)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=16)
    got = answer_prompts(cuda, tok, records, sampling, answer=engine_answerer(cuda, tok, batch_size=8), progress=False)
    expected = _greedy_answers(cuda, tok, records, sampling)
    assert got == expected and any(got)


def test_verb_end_to_end(tiny, tmp_path, capsys):
    root, _, _ = tiny
    files = [root / "world" / f for f in ("eval_tasks.jsonl", "eval_unsafe.jsonl", "eval_lookalikes.jsonl",
                                          "eval_multiturn.jsonl")]
    out = tmp_path / "report.json"
    args = ["eval", "chat", str(root / "model"), "--prompts", "[" + ",".join(map(str, files)) + "]", "--out", str(out),
            "--limit", "3", "--sampling.max_new_tokens", "6", "--progress", "false", "--device", "cpu"]
    main(args)
    printed = capsys.readouterr().out
    assert "task accuracy" in printed and "violation rate" in printed and "turn 3" in printed
    report = json.loads(out.read_text())
    rows = [json.loads(line) for line in (tmp_path / "report.answers.jsonl").read_text().splitlines()]
    assert len(rows) == report["records"] == 12 and report["answers"] == 9 + 3 * SMALL["multiturn_turns"]
    assert report["sampling"]["max_new_tokens"] == 6 and report["world"] == VERSION
    rescored = score_answers(rows, [r["answer"] for r in rows])
    assert {k: v for k, v in report.items() if k in rescored} == json.loads(json.dumps(rescored))
    with pytest.raises(SystemExit):  # the report exists: replaced only with --overwrite true
        main(args)
    assert "--overwrite true" in capsys.readouterr().err
    main(args + ["--overwrite", "true"])


def _line(messages, kind="task", world=VERSION) -> str:
    return json.dumps({"world": world, "messages": messages, "meta": {"kind": kind}})


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (_line([{"role": "user", "content": "hi"}], world="v0"), "world 'v0'"),
    (_line([{"role": "assistant", "content": "hi"}]), "user"),
    (_line([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), "ends with a user message"),
    (_line("hi"), "messages must be"),
    (_line([{"role": "user", "content": "hi"}], kind="essay"), "meta.kind"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    good = json.dumps(prompt_record([{"role": "user", "content": "What is 1 + 1?"}],
                                    {"kind": "task", "family": "arithmetic", "target": 2, "reference": "2."}))
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}:2:")
