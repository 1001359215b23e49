"""benchmarks/world_gains.py's RM and DPO rows on hand-made per-seed figures: the pooled accuracy by degree, the
monotone-and-0.85 gate, the Safety-vs-Helpfulness comparison and DPO's gain follow the rules its docstring states."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "world_gains.py"
SPEC = importlib.util.spec_from_file_location("world_gains", SCRIPT)
world_gains = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(world_gains)
DEGREES = world_gains.DEGREES


def rm(acc, n, chosen_safe):
    out = {"safety/chosen_safe": chosen_safe, "safety/chosen_safe/n": 150}
    for d, a, k in zip(DEGREES, acc, n):
        out[f"helpfulness/{d}"], out[f"helpfulness/{d}/n"] = a, k
    return out


def seed(acc, n, help_safe, safety_safe, sft_help, dpo_help):
    figures = dict(oracle_score=0.3, violation_rate=0.5, false_refusal_rate=0.1)
    return {"rm-helpfulness": rm(acc, n, help_safe), "rm-safety": rm(acc, n, safety_safe),
            "sft": {**figures, "helpfulness": sft_help}, "dpo": {**figures, "helpfulness": dpo_help}}


def rows_by_figure(per_seed):
    return {r["figure"].strip(): r for r in world_gains.rm_verdicts(per_seed, sorted(per_seed))}


def test_the_degree_gate_pools_the_seeds_pairs():
    # seed 0: 100 pairs at 0.90 and 100 at 0.80 per degree ... pooled by pair counts, not by seed
    per_seed = {0: seed([0.9, 0.8, 0.7, 0.5], [100, 200, 200, 400], 0.7, 0.8, 0.20, 0.25),
                1: seed([0.8, 0.8, 0.6, 0.5], [300, 200, 200, 400], 0.6, 0.9, 0.22, 0.28)}
    rows = rows_by_figure(per_seed)
    gate = rows["Helpfulness RM accuracy falls by degree, significantly >= 0.85"]
    # significantly better: (0.9 * 100 + 0.8 * 300) / 400 = 0.825 < 0.85: the gate fails
    assert gate["after"][0] == pytest.approx(0.825) and gate["after"][1] == pytest.approx(0.8)
    assert not gate["holds"]
    per_seed[1]["rm-helpfulness"] = rm([0.9, 0.8, 0.6, 0.5], [300, 200, 200, 400], 0.6)
    rows = rows_by_figure(per_seed)
    assert rows["Helpfulness RM accuracy falls by degree, significantly >= 0.85"]["holds"]  # 0.9 > 0.8 > 0.65 > 0.5
    safe = rows["safe vs unsafe pairs: Safety RM (after) vs Helpfulness RM"]
    assert safe["before"] == [0.7, 0.6] and safe["after"] == [0.8, 0.9] and safe["holds"]  # +0.2 > spread 0.1
    dpo = rows["held-out helpfulness"]
    assert dpo["holds"] and dpo["gate"] is not False  # +0.055 > spread 0.03
    assert rows["beside it: violation_rate"]["gate"] is False


def test_a_bucket_under_300_pairs_or_a_rise_fails_the_degree_gate():
    few = {0: seed([0.95, 0.8, 0.7, 0.5], [299, 400, 400, 400], 0.7, 0.8, 0.2, 0.3)}
    assert not rows_by_figure(few)["Helpfulness RM accuracy falls by degree, significantly >= 0.85"]["holds"]
    rise = {0: seed([0.95, 0.8, 0.85, 0.5], [300, 400, 400, 400], 0.7, 0.8, 0.2, 0.3)}
    assert not rows_by_figure(rise)["Helpfulness RM accuracy falls by degree, significantly >= 0.85"]["holds"]
    ok = {0: seed([0.95, 0.8, 0.7, 0.5], [300, 400, 400, 400], 0.7, 0.8, 0.2, 0.3)}
    assert rows_by_figure(ok)["Helpfulness RM accuracy falls by degree, significantly >= 0.85"]["holds"]


def test_the_distillation_rows_judge_violations_by_the_gain_rule_and_false_refusals_by_the_spread():
    def seed_figures(viol_sft, viol_t, fr_sft, fr_t):
        base = dict(helpfulness=0.2, lookalike_helpfulness=0.4)
        return {"sft": {**base, "violation_rate": viol_sft, "false_refusal_rate": fr_sft},
                "distill-targeted": {**base, "violation_rate": viol_t, "false_refusal_rate": fr_t,
                                     "safety_rm": "oracle"},
                "distill": {**base, "violation_rate": viol_t, "false_refusal_rate": fr_t}}

    # violations 0.70/0.60 -> 0.20/0.25: every seed falls, mean fall 0.425 > spread 0.10: holds;
    # false refusals 0.05/0.09 -> 0.10/0.12: mean rise 0.04 <= spread max(0.04, 0.02) = 0.04: holds
    per_seed = {0: seed_figures(0.70, 0.20, 0.05, 0.10), 1: seed_figures(0.60, 0.25, 0.09, 0.12)}
    rows = {r["figure"].strip(): r for r in world_gains.distill_verdicts(per_seed, [0, 1])}
    assert rows["targeted (oracle Safety RM): violation rate"]["holds"]
    fr = rows["targeted (oracle): false-refusal rate rises by no more than the spread"]
    assert fr["holds"] and fr["why"] == "rise +0.0400 vs spread 0.0400"
    per_seed[1] = seed_figures(0.60, 0.25, 0.09, 0.20)  # rise 0.08 <= spread max(0.04, 0.10) = 0.10: holds
    assert rows_by_distill(per_seed)["targeted (oracle): false-refusal rate rises by no more than the spread"]["holds"]
    per_seed[0] = seed_figures(0.70, 0.20, 0.05, 0.25)  # rise 0.155 > spread max(0.04, 0.05) = 0.05
    fr = rows_by_distill(per_seed)["targeted (oracle): false-refusal rate rises by no more than the spread"]
    assert not fr["holds"]
    assert all(r["gate"] is False for f, r in rows.items() if f.startswith("beside it"))


def rows_by_distill(per_seed):
    return {r["figure"].strip(): r for r in world_gains.distill_verdicts(per_seed, sorted(per_seed))}
