"""`lmforge preferences collect`: the oracle labels pairs as Llama 2's annotators do (degrees from world v1's
thresholds, safety bins, pairs left out), label noise is seeded, answers are seeded samples through LLMEngine,
and the verb writes TRL-format files that `rm train` reads."""

import json

import numpy as np
import pytest

from helpers import WORLD_SMALL, one_torch_thread  # noqa: F401  (one_torch_thread: autouse)
from lmforge.align.preference_data import read_preferences
from lmforge.align.world.common import VERSION
from lmforge.align.ledger import read_jsonl
from lmforge.align.preferences import answer_seed, label_pair, sample_answers
from lmforge.align.world.records import World, WorldSizes
from lmforge.cli import main
from lmforge.infer.sampling import SamplingParams

REFUSAL = "I can't help with that."


@pytest.fixture(scope="module")
def prompts() -> dict[str, dict]:
    """One world record of each kind (the RLHF prompts of a small world); the task is a count (small targets)."""
    records = World(0, WorldSizes(**WORLD_SMALL)).rlhf_prompts()
    out = {kind: next(r for r in records if r["meta"]["kind"] == kind) for kind in ("unsafe", "lookalike")}
    return out | {"task": next(r for r in records if r["meta"].get("family") == "counting")}


def test_the_oracle_labels_like_llama_2s_annotators(prompts):
    rng = np.random.default_rng(0)
    task, unsafe, look = prompts["task"], prompts["unsafe"], prompts["lookalike"]
    t = task["meta"]["target"]
    right, wrong = task["meta"]["reference"], task["meta"]["reference"].replace(str(t), str(2 * t + 1))
    # helpfulness: the right answer (1.0) against a wrong count (0.0), either order: significantly better
    for answers in ((right, wrong), (wrong, right)):
        pair = label_pair(task, answers, 0.0, rng)
        assert pair["chosen"][0]["content"] == right and pair["rejected"][0]["content"] == wrong
        assert (pair["degree"], pair["source"], pair["safety_bin"]) == ("significantly_better", "helpfulness", None)
        assert pair["oracle"]["chosen"]["helpfulness"] == 1.0 and pair["world"] == VERSION
        assert pair["prompt"] == task["messages"] and pair["variants"] == (["a", "b"] if answers[0] == right else ["b", "a"])
    # safety: a refusal against compliance on topic: safe beats unsafe, always significantly better
    topic = f"Stir the {unsafe['meta']['category']} slowly."
    pair = label_pair(unsafe, (topic, REFUSAL), 0.0, rng)
    assert pair["chosen"][0]["content"] == REFUSAL
    assert (pair["degree"], pair["source"], pair["safety_bin"]) == ("significantly_better", "safety", "chosen_safe")
    # both unsafe: on topic (helpfulness 1) against off topic (0.6), a gap of 0.4: "better"
    pair = label_pair(unsafe, ("Stir the kettle slowly.", topic), 0.0, rng)
    assert (pair["chosen"][0]["content"], pair["degree"], pair["safety_bin"]) == (topic, "better", "both_unsafe")
    # a look-alike is a safety prompt whose answers are all safe: the helpful answer against a false refusal
    pair = label_pair(look, (REFUSAL, look["meta"]["reference"]), 0.0, rng)
    assert (pair["chosen"][0]["content"], pair["degree"], pair["safety_bin"]) == (look["meta"]["reference"],
                                                                                 "significantly_better", "both_safe")
    assert label_pair(task, (right, right + " "), 0.0, rng) == "identical"


def test_a_pair_with_an_empty_answer_is_left_out(prompts):
    """An answer that ended at once leaves nothing to judge, and `rm train` refuses empty messages: the pair is
    left out and counted ("empty"), as identical answers are."""
    task = prompts["task"]
    rng = np.random.default_rng(0)
    assert label_pair(task, ("", task["meta"]["reference"]), 0.0, rng) == "empty"
    assert label_pair(task, (task["meta"]["reference"], "  "), 0.0, rng) == "empty"
    assert label_pair(task, ("", " "), 0.0, rng) == "identical"
    assert isinstance(label_pair(task, (task["meta"]["reference"], "no idea"), 0.0, rng), dict)


def test_label_noise_is_seeded_and_unsafe_chosen_pairs_are_left_out(prompts):
    unsafe, task = prompts["unsafe"], prompts["task"]
    topic = f"Stir the {unsafe['meta']['category']} slowly."
    outcomes = [label_pair(unsafe, (topic, REFUSAL), 3.0, np.random.default_rng(s)) for s in range(200)]
    left_out = [o for o in outcomes if isinstance(o, str)]
    assert 20 < len(left_out) < 180 and set(left_out) == {"chosen_unsafe"}  # noise flips some, never all
    assert all(o["chosen"][0]["content"] == REFUSAL for o in outcomes if isinstance(o, dict))
    # close pairs flip more often than clear ones: noise 0.5 on a gap of 1 (a wrong count: 0) against a gap of 0.6
    # (a count one off: 0.4), flip chances Phi(-2) = 2.3% and Phi(-1.2) = 11.5%
    right = task["meta"]["reference"]
    near = right.replace(str(task["meta"]["target"]), str(task["meta"]["target"] - 1))
    far = right.replace(str(task["meta"]["target"]), str(2 * task["meta"]["target"] + 1))  # credit 0

    def flips(other):
        return sum(label_pair(task, (right, other), 0.5, np.random.default_rng(s))["chosen"][0]["content"] != right
                   for s in range(300))

    assert 0 < flips(far) < 20 < flips(near) < 60
    again = [label_pair(unsafe, (topic, REFUSAL), 3.0, np.random.default_rng(s)) for s in range(200)]
    assert again == outcomes


def test_sampled_answers_depend_on_the_seed_only(tiny_folders):
    from lmforge.infer.engine.llm import LLMEngine
    from lmforge.models.checkpoint import load_model

    engine = LLMEngine(load_model(tiny_folders["ours"]).eval(), eos_id=2, max_num_seqs=8)
    prompts = [[1, 40, 41, 42], [1, 50, 51], [1, 60, 61, 62, 63]]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, seed=5)
    outs = sample_answers(engine, prompts, sampling, n=2)
    assert [len(o) for o in outs] == [2, 2, 2] and all(o[0] != o[1] for o in outs)
    for i, p in enumerate(prompts):  # each output alone, with its own seed, gives the same tokens
        for k in range(2):
            params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=answer_seed(5, i, k))
            (alone,) = engine.generate([p], [params])
            assert [t for t in alone if t != 2] == outs[i][k]
    assert sample_answers(engine, prompts, sampling, n=2) == outs  # the batch changes nothing


def test_the_same_prompt_twice_gets_its_own_draws(tiny_folders):
    """Every prompt has its own random stream: one seed shared by all prompts would give two copies of a prompt the
    same answer (and correlate the answers of different prompts through the same draws)."""
    from lmforge.infer.engine.llm import LLMEngine
    from lmforge.models.checkpoint import load_model

    engine = LLMEngine(load_model(tiny_folders["ours"]).eval(), eos_id=2, max_num_seqs=8)
    prompt = [1, 40, 41, 42]
    outs = sample_answers(engine, [prompt] * 6, SamplingParams(temperature=1.0, max_new_tokens=8, seed=5))
    assert len({tuple(o[0]) for o in outs}) >= 5
    assert len({answer_seed(5, i, k) for i in range(100) for k in range(3)} | {answer_seed(6, 0, 0)}) == 301


def test_collect_writes_trl_pairs_that_rm_train_reads(tiny_folders, tmp_path):
    from lmforge.align.world.build import build_world

    build_world(tmp_path / "world", seed=0, sizes=WorldSizes(**WORLD_SMALL))
    out = tmp_path / "prefs"
    args = ["preferences", "collect", str(tiny_folders["ours"]), "--prompts",
            f"[{tmp_path / 'world' / 'rlhf_prompts.jsonl'},{tmp_path / 'world' / 'eval_multiturn.jsonl'}]",
            "--out_dir", str(out), "--max_new_tokens", "8", "--label_noise", "0.1", "--device", "cpu"]
    main(args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["left_out"]["rollout_prompts"] == 4  # eval_multiturn's dialogues are answered turn by turn
    counts = {}
    for source in ("helpfulness", "safety"):
        rows = read_jsonl(out / f"{source}.jsonl")
        records = read_preferences(out / f"{source}.jsonl")  # every row is a valid TRL pair
        assert len(rows) == len(records) == summary["pairs"][source]
        assert all(r["source"] == source and r["world"] == VERSION for r in rows)
        assert all(r.degree is not None and (r.safety_bin is not None) == (source == "safety") for r in records)
        counts[source] = len(rows)
    assert counts["helpfulness"] > 0 and counts["safety"] > 0
    assert sum(counts.values()) + sum(summary["left_out"].values()) == 40 + 4
    with pytest.raises(SystemExit):  # the output rule: an earlier output is replaced only with --overwrite
        main(args)
    first = (out / "helpfulness.jsonl").read_text()
    main([*args, "--overwrite", "true"])
    assert (out / "helpfulness.jsonl").read_text() == first  # seeded: the same pairs again


def test_answers_with_unicode_line_separators_stay_one_record(tmp_path):
    """A sampled answer may hold U+2028, U+0085 or \\x1c, which json.dumps(ensure_ascii=False) leaves as they are
    and str.splitlines() breaks at: the pool of rlhf and rs's files split at "\\n" only."""
    from lmforge.align.ledger import write_jsonl
    from lmforge.align.rlhf import pool_preferences

    rows = [{"chosen": "one\u2028two\x85three\x1cfour", "n": 0}, {"chosen": "plain", "n": 1}]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "helpfulness.jsonl", rows)
        write_jsonl(tmp_path / name / "safety.jsonl", rows[:1])
    assert read_jsonl(tmp_path / "a" / "helpfulness.jsonl") == rows
    counts = pool_preferences([tmp_path / "a", tmp_path / "b"], tmp_path / "pool")
    assert counts == {"helpfulness": 4, "safety": 2}
    assert read_jsonl(tmp_path / "pool" / "helpfulness.jsonl") == rows + rows
