"""The world pipeline's stages after SFT (what `benchmarks/world_gains.py` and `make demo` call per seed): each runs
its verb with the shipped config and the sizes given in `extra`, writes where the pipeline says, is not run again
once complete, and its report feeds the headline functions; a verb that returns without its output (a training
verb stopped by SIGTERM saves a checkpoint and returns) stops the pipeline."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import one_torch_thread  # noqa: F401  (an autouse fixture: the engine decodes on one thread)

from lmforge.align.pipeline import REPLAY_WEIGHT, WorldPipeline, gatt_headline
from lmforge.align.rm import MIXES

CONFIGS = Path(__file__).parents[2] / "configs" / "world"
# The shipped configs' sizes are the demo's; these shrink them for a tiny 512-token model (the flags come last).
TUNE = ("--sampling.max_new_tokens", "8", "--sft.train.seq_len", "512", "--sft.train.batch_size", "2",
        "--sft.train.micro_batch_size", "2", "--sft.train.steps", "1", "--sft.train.device", "cpu")
EVAL = ("--sampling.max_new_tokens", "8", "--device", "cpu")


def test_the_stages_after_sft_run_where_the_pipeline_says(stage_world, tmp_path):
    root = tmp_path / "seed-0"
    shutil.copytree(stage_world.world, root / "world")
    shutil.copytree(stage_world.model_dir, root / "sft" / "model")
    p = WorldPipeline(root, configs=CONFIGS)
    sft = root / "sft" / "model"

    gatt = p.gatt(extra=("--gatt.dialogues", "2", "--gatt.max_turns", "2", "--gatt.keep", "all", *TUNE))
    untargeted = p.distill(None, extra=("--distill.prompts", "2", *TUNE))
    assert gatt == root / "gatt" / "model" and untargeted == root / "distill" / "model"
    for run in ("gatt", "distill"):
        assert (root / run / "model" / "model.safetensors").is_file()
        assert (root / f"{run}-data" / "summary.json").is_file()  # the generated data beside the run
        config = (root / run / "config.yaml").read_text()  # sft's run: the generated file and the SFT set as replay
        assert str(root / "world" / "sft.jsonl") in config and f"weight: {REPLAY_WEIGHT}" in config

    report = p.evaluate_gatt({"sft": sft, "gatt": gatt}, extra=(
        "--dialogues", "2", "--max_turns", "3", "--attention_dialogues", "1", *EVAL))
    figures = gatt_headline(report)
    assert report["turns"] == 3 and (root / "eval" / "gatt" / "adherence.png").is_file()
    assert set(figures) == {f"{m}/{k}" for m in ("sft", "gatt")
                            for k in ("adherence_3_T", "task_accuracy_3_T", "adherence/1", "adherence/2", "adherence/3",
                                      "attention_T")}
    assert figures["sft/attention_T"] == report["models"]["sft"]["attention"]["3"]["mass"]
    assert figures["gatt/task_accuracy_3_T"] == report["models"]["gatt"]["task_accuracy"]["3"]  # T = 3: turn 3 only

    red = p.redteam({"sft": sft, "distill": untargeted}, extra=("--per_cell", "1", "--lookalikes", "1", *EVAL))
    assert list(red["targets"]) == ["sft", "distill"] and (root / "eval" / "redteam" / "report.json").is_file()
    assert set(p.times) == {"gatt", "distill", "eval gatt", "redteam"}

    p.times.clear()  # complete stages are not run again (the pipeline continues where it stopped)
    assert p.gatt() == gatt and p.distill(None) == untargeted
    assert p.evaluate_gatt({"sft": sft, "gatt": gatt}) == report and p.times == {}


def test_a_stage_that_returns_without_its_output_stops_the_pipeline(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("lmforge.cli.main", calls.append)  # a verb that returns having written nothing
    p = WorldPipeline(tmp_path, configs=CONFIGS)
    with pytest.raises(RuntimeError, match="stage gatt stopped before writing .*gatt/model/model.safetensors"):
        p.gatt()
    assert len(calls) == 1 and calls[0][0] == "gatt" and "gatt" not in p.times


# The RL configs' sizes shrunk the same way: one iteration of 2 prompts, answers of 8 tokens.
RL_TUNE = {"rs": ("--prompts.per_iteration", "2", "--rs.samples", "2", "--rollout.max_new_tokens", "8",
                  "--sft.train.seq_len", "512", "--sft.train.batch_size", "2", "--sft.train.micro_batch_size", "2",
                  "--sft.train.steps", "1", "--device", "cpu"),
           "ppo": ("--prompts.per_iteration", "2", "--ppo.minibatch_size", "2", "--rollout.max_new_tokens", "8",
                   "--train.iterations", "1", "--train.device", "cpu"),
           "grpo": ("--prompts.per_iteration", "2", "--grpo.group_size", "2", "--grpo.minibatch_size", "4",
                    "--rollout.max_new_tokens", "8", "--train.iterations", "1", "--train.device", "cpu")}


def test_the_rl_stages_run_where_the_pipeline_says(stage_world, tmp_path):
    root = tmp_path / "seed-3"
    shutil.copytree(stage_world.world, root / "world")
    shutil.copytree(stage_world.model_dir, root / "sft" / "model")
    p = WorldPipeline(root, seed=3, configs=CONFIGS)
    models = {verb: p.rl(verb, extra=tune) for verb, tune in RL_TUNE.items()}
    ablation = p.rl("ppo", "ppo-no-safety", extra=("--reward.safety", "null", *RL_TUNE["ppo"]))
    assert models["ppo"] == root / "ppo" / "model" and models["grpo"] == root / "grpo" / "model"
    assert models["rs"] == root / "rs" / "iteration_2" / "sft" / "model"  # rs's summary names it (rs.yaml: 2)
    assert ablation == root / "ppo-no-safety" / "model"
    for model in (*models.values(), ablation):
        assert (model / "model.safetensors").is_file()
    config = (root / "ppo-no-safety" / "config.yaml").read_text()
    assert "safety: null" in config and "seed: 3" in config  # the ablation's flag and the pipeline's seed arrived
    assert set(p.times) == {"rs", "ppo", "grpo", "ppo-no-safety"}
    p.times.clear()
    assert p.rl("ppo") == models["ppo"] and p.times == {}  # complete: not run again


PAIR_TUNE = ("--train.steps", "1", "--train.batch_size", "2", "--train.micro_batch_size", "2", "--train.device", "cpu")


def test_the_preference_reward_model_and_dpo_stages_run_where_the_pipeline_says(stage_world, tmp_path):
    root = tmp_path / "seed-2"
    shutil.copytree(stage_world.world, root / "world")
    shutil.copytree(stage_world.model_dir, root / "sft" / "model")
    p = WorldPipeline(root, seed=2, configs=CONFIGS)
    collect = ("--limit", "12", "--max_new_tokens", "8", "--device", "cpu")  # 12: unsafe prompts among them
    train = p.preferences(extra=collect)
    heldout = p.preferences("preferences-heldout", ("eval_tasks", "eval_unsafe"), seed_offset=1000, extra=collect)
    assert train == root / "preferences" and heldout == root / "preferences-heldout"
    summary = json.loads((heldout / "summary.json").read_text())
    assert summary["seed"] == 1002  # the offset arrived: other answers than the training pairs' seed
    models = {kind: p.reward_model(kind, extra=PAIR_TUNE) for kind in ("helpfulness", "safety")}
    for kind, model in models.items():
        assert model == root / f"rm-{kind}" / "model" and (model / "model.safetensors").is_file()
        config = (root / f"rm-{kind}" / "config.yaml").read_text()
        weights = dict(MIXES[kind])
        assert f"weight: {weights['safety']}" in config and "seed: 2" in config  # its own mix, the pipeline's seed
    pairs = [heldout / "helpfulness.jsonl", heldout / "safety.jsonl"]
    report = p.evaluate_rm("safety", pairs)
    assert report["model"] == str(models["safety"]) and (root / "eval" / "rm-safety" / "report.json").is_file()
    dpo = p.dpo(extra=PAIR_TUNE)
    assert dpo == root / "dpo" / "model" and (dpo / "model.safetensors").is_file()
    assert set(p.times) == {"preferences", "preferences-heldout", "rm-helpfulness", "rm-safety", "eval rm-safety",
                            "dpo"}
    p.times.clear()  # complete: not run again
    assert p.reward_model("safety") == models["safety"] and p.evaluate_rm("safety", pairs) == report
    assert p.dpo() == dpo and p.times == {}
