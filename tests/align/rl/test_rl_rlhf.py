"""`lmforge rlhf`: one round of the driver through the real CLI (preferences, both reward models, their
held-out accuracy, rejection sampling with their gate, PPO from the RS model, the round table), each stage
fed by the one before; after SIGKILL in the middle of a stage the rerun skips the recorded stages, resumes the
one in flight and ends with the uninterrupted run's figures; a finished run reruns nothing; bad input in one line."""

import copy
import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from lmforge.cli import main
from lmforge.train.metrics import read_step_metrics

# One round at the smallest sizes that run every stage: pairs of 8-token answers to the 40 RL prompts (and to 6
# prompts of each held-out set), reward models of 2 steps, one RS iteration (2 answers to 8 prompts, 2 SFT steps),
# one PPO iteration, a round table over 4 prompts of each held-out set (answers of at most 16 tokens).
RECIPE = {
    "rounds": 1, "prompts": {"per_iteration": 8}, "preferences": {"heldout_limit": 6, "max_new_tokens": 8},
    "rm": {"train": {"batch_size": 4, "micro_batch_size": 2, "seq_len": 256, "steps": 2, "device": "cpu",
                     "threads": 1}, "optim": {"lr": 1e-3}},
    "rs": {"rs": {"samples": 2, "sweep_temperatures": [], "sweep_prompts": 1},
           "sft": {"train": {"batch_size": 4, "micro_batch_size": 4, "seq_len": 256, "steps": 2, "device": "cpu",
                             "threads": 1}, "optim": {"lr": 1e-3}}},
    "ppo": {"from_round": 1, "ppo": {"minibatch_size": 4},
            "train": {"iterations": 1, "micro_batch_size": 2, "device": "cpu", "threads": 1}, "optim": {"lr": 1e-4}},
    "rollout": {"max_new_tokens": 8, "batch_size": 16}, "eval_limit": 4, "eval_max_new_tokens": 16,
    "run": {"progress": False, "checkpoint_every": 1, "eval_every": 0}, "device": "cpu",
}
STAGES = ["round_0/eval", "round_1/preferences", "round_1/preference_pool", "round_1/rm_helpfulness",
          "round_1/rm_safety", "round_1/rm_eval", "round_1/rs", "round_1/ppo", "round_1/eval"]


# Pinned on the 2-core dev machine (torch 2.13 CPU, fp32; rtol 1e-5): the losses of round 1's training stages
# (both reward models' 2 steps, RS's 2 SFT steps, PPO's one iteration) and the reward models' held-out accuracy.
# They move with the sampled pairs, the oracle's labels, the pool, the mixes, the gate and each verb's loss.
# Re-pinned when preference collection gave every prompt its own random stream (preferences.answer_seed).
GOLDEN_LOSSES = {"rm_helpfulness": [0.8486276268959045, 0.6930148601531982],
                 "rm_safety": [0.6929613351821899, 0.6949435472488403],
                 "rs/iteration_1/sft": [6.5937819480896, 5.432445526123047], "ppo": [0.0396746767219156]}
GOLDEN_RM_ACCURACY = {"rm/helpfulness_accuracy": 10 / 18, "rm/safety_accuracy": 7 / 18}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "rlhf.yaml"
    recipe = copy.deepcopy(RECIPE)
    recipe["rs"]["sft"]["data"] = {"cache_dir": str(path.parent / "cache")}  # RS's token cache beside the recipe
    path.write_text(yaml.safe_dump(recipe))
    return path


def rlhf_args(rl_world, recipe, run, *extra):
    return ["rlhf", str(rl_world["model"]), str(rl_world["root"] / "world"), "--config", str(recipe), "--run.dir",
            str(run), *extra]


def ledger(run):
    return [e["name"] for e in json.loads((run / "stages.json").read_text())]


def figures(run):
    """The round table without the model paths, and every training stage's losses."""
    table = [{k: v for k, v in row.items() if k != "model"} for row in json.loads((run / "rounds.json").read_text())]
    losses = {d: [r["loss"] for r in read_step_metrics(run / "round_1" / d / "metrics.jsonl")]
              for d in ("rm_helpfulness", "rm_safety", "rs/iteration_1/sft", "ppo")}
    return table, losses


@pytest.fixture(scope="module")
def golden_run(rl_world, recipe, tmp_path_factory):
    run = tmp_path_factory.mktemp("rlhf") / "run"
    main(rlhf_args(rl_world, recipe, run))
    return run


def test_one_round_runs_every_stage_each_fed_by_the_one_before(golden_run):
    assert ledger(golden_run) == STAGES
    table, losses = figures(golden_run)
    assert losses == {k: pytest.approx(v, rel=1e-5) for k, v in GOLDEN_LOSSES.items()}
    assert {k: table[1][k] for k in GOLDEN_RM_ACCURACY} == pytest.approx(GOLDEN_RM_ACCURACY)
    r1 = golden_run / "round_1"
    table = json.loads((golden_run / "rounds.json").read_text())
    assert [row["round"] for row in table] == [0, 1]
    for key in ("helpfulness", "task_accuracy", "violation_rate", "false_refusal_rate"):
        assert all(0 <= row[key] <= 1 for row in table)
    assert 0 <= table[1]["rm/helpfulness_accuracy"] <= 1 and 0 <= table[1]["rm/safety_accuracy"] <= 1
    # the pool of round 1 is its own pairs; the reward models trained on it, RS selected with their gate, PPO
    # started from the RS model with the same gate, and the round's model is PPO's
    for kind in ("helpfulness", "safety"):
        pooled, own = (r1 / d / f"{kind}.jsonl" for d in ("preference_pool", "preferences"))
        assert pooled.read_text() == own.read_text()
    rs_config = yaml.safe_load((r1 / "rs" / "config.yaml").read_text())
    assert rs_config["reward"]["helpfulness"] == str(r1 / "rm_helpfulness" / "model")
    assert rs_config["reward"]["safety"] == str(r1 / "rm_safety" / "model")
    ppo_config = yaml.safe_load((r1 / "ppo" / "config.yaml").read_text())
    assert ppo_config["init_from"] == str(r1 / "rs" / "iteration_1" / "sft" / "model")
    assert ppo_config["reward"]["helpfulness"] == str(r1 / "rm_helpfulness" / "model")
    assert table[1]["model"] == str(r1 / "ppo" / "model")


@pytest.mark.slow  # a second whole run, in a subprocess
def test_sigkill_inside_a_stage_resumes_to_the_uninterrupted_run(rl_world, recipe, golden_run, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", *rlhf_args(rl_world, recipe, run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    inside_rs = run / "round_1" / "rs" / "stages.json"  # RS recorded its first stage: the driver is inside RS
    deadline = time.monotonic() + 300
    while not inside_rs.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert ledger(run) == STAGES[:6]
    main([*rlhf_args(rl_world, recipe, run), "--run.resume", "auto"])
    assert ledger(run) == STAGES and figures(run) == figures(golden_run)
    before = (run / "stages.json").read_text()
    main([*rlhf_args(rl_world, recipe, run), "--run.resume", "auto"])  # every stage recorded: nothing runs again
    assert (run / "stages.json").read_text() == before


def test_a_world_folder_without_its_prompt_sets_is_one_line(rl_world, recipe, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["rlhf", str(rl_world["model"]), str(tmp_path), "--config", str(recipe), "--run.dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no rlhf_prompts.jsonl" in err[0] and "lmforge world build" in err[0]
