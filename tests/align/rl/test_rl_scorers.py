"""The scorers and the prompts RL reads: the checkers' verifiable rewards by hand, the raw scale of [0, 1]
scores, each branch of the gate through the oracle stand-ins, the safety tags, one-line errors naming the file
and line, the prompt schedule and the data-parallel plan against their worked examples."""

import json
import math

import pytest
import torch

from lmforge.align.prompts import PromptFileError, PromptSchedule, read_prompt_records
from lmforge.align.rl_iteration import plan_iteration
from lmforge.align.scorers import GatedReward, ScorerError, make_scorer, oracle_figures, verifiable_reward
from lmforge.models.checkpoint import load_model
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import encode_chat
from lmforge.align.world.common import stream
from lmforge.align.world.records import World, prompt_record
from lmforge.parallel import DataParallelRank

REFUSE = "I'm sorry, but I can't help with that."


@pytest.fixture(scope="module")
def recs():
    """A task, an unsafe request, a look-alike, a creative prompt and an instruction prompt of world 0."""
    w = World(0)
    task = w.tasks("arithmetic", 1, "train", 1, stream(0, "rl|task"))[0]
    out = {"task": prompt_record([{"role": "user", "content": task.prompt}], task.meta)}
    out["unsafe"] = prompt_record(*w.unsafe("train", 1, stream(0, "rl|unsafe"), "potion", "direct")[0])
    out["lookalike"] = prompt_record(*w.lookalikes("train", 1, stream(0, "rl|look"), "potion")[0])
    out["creative"] = prompt_record(*w.creative("train", 1, stream(0, "rl|creative"))[0])
    out["instruction"] = prompt_record(*w.instruction_prompts("train", 1, 1, stream(0, "rl|instr"))[0])
    for kind, r in out.items():
        r["safety"] = kind == "unsafe"
    return out


def test_verifiable_rewards_by_hand(recs):
    m = {k: r["meta"] for k, r in recs.items()}
    assert verifiable_reward(recs["task"], m["task"]["reference"]) == 1.0
    assert verifiable_reward(recs["task"], "It is 99999.") == 0.0
    assert verifiable_reward(recs["unsafe"], m["unsafe"]["reference"]) == 1.0  # the reference is a refusal
    assert verifiable_reward(recs["unsafe"], "Sure, here is how.") == 0.0
    assert verifiable_reward(recs["lookalike"], m["lookalike"]["reference"]) == 1.0
    assert verifiable_reward(recs["lookalike"], REFUSE) == 0.0
    assert verifiable_reward(recs["instruction"], m["instruction"]["reference"]) == 1.0
    assert verifiable_reward(recs["instruction"], m["instruction"]["turns"][0]["reference"]) == 0.0  # not followed
    creative = verifiable_reward(recs["creative"], m["creative"]["reference"])
    assert 0 < creative <= 1 and creative == pytest.approx(make_scorer("oracle")([recs["creative"]],
                                                                                  [m["creative"]["reference"]]).item())


def test_scores_in_0_1_go_to_the_raw_scale_through_logit(recs):
    h = make_scorer("oracle:helpfulness")
    r = [recs["task"], recs["task"]]
    assert h(r, [recs["task"]["meta"]["reference"], REFUSE]).tolist() == [1.0, 0.0]
    raw = h.raw(r, [recs["task"]["meta"]["reference"], REFUSE])
    assert raw.tolist() == pytest.approx([math.log(0.95 / 0.05), math.log(0.05 / 0.95)], rel=1e-5)


def test_each_branch_of_the_gate_with_the_oracle_stand_ins(recs):
    gate = GatedReward(make_scorer("oracle:helpfulness"), make_scorer("oracle:safety"))
    comply = "Sure, here is how to brew it."
    rows = [recs["unsafe"], recs["unsafe"], recs["task"], recs["lookalike"]]
    answers = [REFUSE, comply, recs["task"]["meta"]["reference"], REFUSE]
    out = gate(rows, answers)
    # unsafe prompts are tagged: the Safety RM decides, refusing scores high and complying low; a task answer
    # is safe (sigmoid 0.95 >= 0.15): the Helpfulness RM decides; so does a refused look-alike (a false refusal)
    assert out["used_safety"].tolist() == [True, True, False, False]
    hi, lo = math.log(0.95 / 0.05), math.log(0.05 / 0.95)
    assert out["score"].tolist() == pytest.approx([hi, lo, hi, lo], rel=1e-5)
    # an untagged prompt whose answer the Safety RM finds unsafe: the gate picks the Safety RM there too
    untagged = dict(recs["unsafe"], safety=False)
    assert gate([untagged], [comply])["used_safety"].tolist() == [True]
    assert gate([untagged], [REFUSE])["used_safety"].tolist() == [False]
    # the ablation: without the Safety RM, complying with the unsafe request is what the Helpfulness RM likes
    ablated = GatedReward(make_scorer("oracle:helpfulness"))(rows, answers)
    assert not ablated["used_safety"].any() and ablated["score"][1] > ablated["score"][0]


def test_oracle_figures_of_a_batch(recs):
    f = oracle_figures([recs["unsafe"], recs["unsafe"], recs["lookalike"]], [REFUSE, "Sure.", REFUSE])
    assert f["oracle/violation_rate"] == 0.5 and f["oracle/false_refusal_rate"] == 1.0
    assert f["oracle/safety"] == pytest.approx(2 / 3)
    assert oracle_figures([{"messages": [], "meta": None}], ["x"]) == {}


def test_prompt_files_safety_tags_and_errors(recs, tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [recs["unsafe"], recs["lookalike"], {"prompt": "hello"}, {"prompt": "hi", "safety": True}]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "safety"} if "world" in r else r) + "\n"
                            for r in lines))
    got = read_prompt_records([str(path)])
    assert [r["safety"] for r in got] == [True, False, False, True]
    assert got[2]["messages"] == [{"role": "user", "content": "hello"}] and got[2]["meta"] is None
    assert got[0]["source"] == f"{path}:1"
    for bad, message in (('{"text": "x"}', ":1: expected a 'messages' list or a 'prompt' string"),
                         ('{"prompt": "x", "safety": "yes"}', ":1: 'safety' must be true or false"),
                         ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
                          ":1: add_generation_prompt=True needs a dialogue that ends with a user message"),
                         ('{"prompt": ', ":1: not valid JSON")):
        path.write_text(bad + "\n")
        with pytest.raises(PromptFileError, match=message):
            read_prompt_records([str(path)])
    with pytest.raises(ScorerError, match="not 'oracle:helpfulness'"):
        make_scorer("oracle:helpful")


def test_prompt_schedule_worked_example():
    s = PromptSchedule(5, 2, seed=0)
    epochs = [[j for i in range(k, k + 3) for j in s.iteration(i)] for k in (0,)][0]
    assert sorted(epochs[:5]) == [0, 1, 2, 3, 4]  # iterations 0, 1 and the first half of 2: epoch 0 whole
    assert s.iteration(2)[1] == PromptSchedule(5, 1, seed=0).iteration(5)[0]  # epoch 1, position 0
    assert s.iteration(7) == s.iteration(7) and s.iteration(0) != PromptSchedule(5, 2, seed=1).iteration(0)


def test_the_data_parallel_plan_is_one_process_split():
    """P = 8 prompts, n = 2 answers, mini-batches of 8 answers (4 prompts), 2 ranks: each mini-batch holds 2
    prompts of each rank, and the ranks' prompts and seeds together are the one-process plan's."""
    s = PromptSchedule(20, 8, seed=3)
    one = plan_iteration(s, 4, 2, 8, 3, DataParallelRank())
    ranks = [plan_iteration(s, 4, 2, 8, 3, DataParallelRank(r, 2)) for r in range(2)]
    assert [len(mb) for p in ranks for mb in p.minibatches] == [4, 4, 4, 4]
    assert ranks[0].minibatches[1] == [4, 5, 6, 7]  # local prompts 2, 3: answers 0 and 1 of each
    for j in range(2):  # mini-batch j: the same prompts (and seeds) in one process and over the ranks
        q = range(4 * j, 4 * j + 4)
        assert sorted((one.prompts[i], one.seeds[i]) for i in q) == sorted(
            (p.prompts[i], p.seeds[i]) for p in ranks for i in range(2 * j, 2 * j + 2))
    assert len(set(one.seeds)) == 8 and all(b - a == 2 for a, b in zip(one.seeds, one.seeds[1:]))
    with pytest.raises(ValueError, match="multiple of the data-parallel ranks"):
        plan_iteration(s, 0, 1, 3, 0, DataParallelRank(0, 2))


def test_a_reward_model_folder_scores_each_dialogue_at_its_last_token(recs, rl_reward_model):
    """The scorer batches dialogues of different lengths (sorted, right-padded); each score must be the one
    forward of that dialogue alone gives at its last token (the closing </s>)."""
    scorer = make_scorer(str(rl_reward_model))
    records = list(recs.values())
    answers = ["4", REFUSE, "", "The sea is wide and the sea is deep, and the night is long.", "yes"]
    got = scorer(records, answers)
    net, tok = load_model(rl_reward_model, head="reward").eval(), Tokenizer(rl_reward_model / "tokenizer.model")
    for r, a, g in zip(records, answers, got):
        ids = encode_chat(tok, [*r["messages"], {"role": "assistant", "content": a or " "}]).ids
        assert ids[-1] == tok.eos_id
        with torch.no_grad():
            want = net(torch.tensor([ids]))[0, -1, 0]
        assert g.item() == pytest.approx(want.item(), abs=1e-5)
    assert not scorer.probability and torch.equal(scorer.raw(records, answers), got)  # already on the raw scale
    assert len(set(got.tolist())) == len(answers)  # the head is not constant: the check can fail
    # in the gate beside the oracle's Safety stand-in: the RM's score wherever the gate did not pick safety
    gated = GatedReward(scorer, make_scorer("oracle:safety"))(records, answers)
    assert torch.equal(gated["score"][~gated["used_safety"]], got[~gated["used_safety"]])
    assert gated["used_safety"].any() and not gated["used_safety"].all()
