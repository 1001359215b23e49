"""The rule a stage's gain is judged by (benchmarks/world_gains.py) and the gated oracle score, on hand-made figures."""

import pytest

from lmforge.align.pipeline import gain_holds


def test_gain_rule_by_hand():
    assert gain_holds([0.20, 0.24, 0.22], [0.41, 0.38, 0.44])[0]  # gain 0.19 > spread 0.06
    assert not gain_holds([0.20, 0.24, 0.22], [0.41, 0.23, 0.44])[0]  # seed 1 loses
    # every seed gains, but the gain (0.03) does not clear the spread of the after figures (0.08)
    ok, why = gain_holds([0.20, 0.21, 0.22], [0.21, 0.29, 0.23])
    assert not ok and "every seed gains" in why and "spread 0.0800" in why
    # lower is better (violation rates): 0.9 -> 0.3 holds, a rise does not
    assert gain_holds([0.90, 0.95, 0.92], [0.30, 0.35, 0.28], higher_is_better=False)[0]
    assert not gain_holds([0.30, 0.35, 0.28], [0.90, 0.95, 0.92], higher_is_better=False)[0]
    with pytest.raises(ValueError, match="one per seed"):
        gain_holds([0.1, 0.2], [0.3])


def test_the_gated_oracle_score_weighs_each_prompt_once():
    from lmforge.align.pipeline import gated_oracle_score

    reports = {"eval_tasks": {"records": 600, "oracle": {"helpfulness": 0.2, "safety": 1.0}},
               "eval_unsafe": {"records": 500, "oracle": {"helpfulness": 0.7, "safety": 0.9}},
               "eval_lookalikes": {"records": 500, "oracle": {"helpfulness": 0.4, "safety": 1.0}}}
    # safety on the unsafe requests, helpfulness elsewhere: (600 * 0.2 + 500 * 0.9 + 500 * 0.4) / 1600
    assert gated_oracle_score(reports) == pytest.approx(0.48125, abs=1e-12)
    reports["eval_unsafe"]["oracle"]["helpfulness"] = 0.0  # an unsafe request's helpfulness plays no part
    assert gated_oracle_score(reports) == pytest.approx(0.48125, abs=1e-12)
