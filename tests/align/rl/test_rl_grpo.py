"""`lmforge grpo`: golden rewards and losses through the real CLI with the world's checkers as rewards, the
first mini-batch's ratio is 1, the zero-variance groups are counted, exact resume after a stop, bad options
in one line."""

import json

import pytest
from rl_helpers import COMMON_KEYS, common_args, curve, records

from lmforge.cli import main

GRPO = ("--grpo.group_size", "4", "--grpo.minibatch_size", "8", "--prompts.per_iteration", "4",
        "--train.iterations", "3", "--reward", "oracle:helpfulness")


def grpo_args(rl_world, run, *extra):
    return common_args("grpo", rl_world, run, *GRPO, *extra)


# Pinned on the 2-core dev machine (torch 2.13 CPU, fp32): reward, loss of iterations 1, 2, 3 (rtol 1e-5).
GOLDEN = [0.15342466533184052, 1.389533281326294e-06, 0.20000001788139343, 0.0008634780679130927, 0.19999998807907104,
          0.002912441748776473]


@pytest.fixture(scope="module")
def golden_run(rl_world, tmp_path_factory):
    run = tmp_path_factory.mktemp("grpo") / "run"
    main(grpo_args(rl_world, run))
    return run


def test_golden_rewards_and_losses_through_the_cli(golden_run):
    assert curve(golden_run) == pytest.approx(GOLDEN, rel=1e-5)
    assert json.loads((golden_run / "summary.json").read_text())["answers"] == 3 * 4 * 4
    assert (golden_run / "model" / "model.safetensors").exists()


def test_every_metric_is_logged_and_zero_variance_groups_are_counted(golden_run):
    rs = records(golden_run)
    for r in rs:
        assert not [k for k in COMMON_KEYS + ("groups/zero_variance", "groups/reward_std", "kl_loss") if k not in r]
        assert r["policy/first_ratio_deviation"] <= 1e-6 and r["policy/first_clip_fraction"] == 0
        assert 0 <= r["groups/zero_variance"] <= 1
    # a random policy's answers mostly score alike: some groups have no reward variance, and such an
    # iteration with all groups alike trains on the KL term alone (its loss is 0 on the first step)
    assert any(r["groups/zero_variance"] > 0 for r in rs)
    assert any("oracle/violation_rate" in r for r in rs)


def test_stop_and_resume_gives_the_uninterrupted_run(rl_world, golden_run, tmp_path):
    run = tmp_path / "run"
    main([*grpo_args(rl_world, run), "--run.stop_at", "1"])
    assert [r["step"] for r in records(run)] == [1] and not (run / "model").exists()
    main([*grpo_args(rl_world, run), "--run.resume", "auto"])
    keys = ("reward", "loss", "kl", "entropy", "groups/zero_variance")
    assert curve(run, keys) == curve(golden_run, keys)


@pytest.mark.parametrize("flag,value,message", [
    ("--grpo.group_size", "1", "grpo.group_size must be >= 2"),
    ("--grpo.minibatch_size", "6", "a multiple of the answers per prompt (4)"),
    ("--reward", "oracle:nothing", "scorer 'oracle:nothing'"),
])
def test_bad_options_end_in_one_line(rl_world, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_:
        main(grpo_args(rl_world, tmp_path / "run", flag, value))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: error: ") and message in err[0], err
