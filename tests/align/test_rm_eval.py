"""`lmforge rm eval` and `lmforge rm score`: accuracy per degree and safety bin, agreement with the oracle and the
calibration curve against hand-made cases; both verbs through the CLI."""

import json

import numpy as np
import pytest
import torch

from helpers import one_torch_thread, unit_scale_  # noqa: F401  (one_torch_thread: autouse)
from lmforge import ModelConfig, Transformer
from lmforge.align.preference_data import PreferenceRecord, read_preferences
from lmforge.align.reward_model import score_sequences
from lmforge.align.rm_eval import calibration, pair_report
from lmforge.cli import main
from lmforge.models.checkpoint import save_model
from lmforge.tokenizer import Tokenizer, encode_chat
from pref_helpers import seeded_pairs
from sft_helpers import write_jsonl


def record(degree, bin_=None, source="helpfulness", oracle_gap=None):
    oracle = None if oracle_gap is None else {"chosen": {"preference": oracle_gap}, "rejected": {"preference": 0.0}}
    return PreferenceRecord([{"role": "user", "content": "q"}], "a", "b", degree, None, bin_, source, "x", oracle)


def test_accuracy_per_degree_and_bin_and_agreement_with_the_oracle():
    records = ([record("significantly_better", oracle_gap=1.0)] * 4 + [record("negligibly_better", oracle_gap=-0.05)] * 4
               + [record("better", "chosen_safe", "safety"), record("better", "both_unsafe", "safety")])
    chosen = [1, 1, 1, -1] + [1, -1, 1, -1] + [2, -2]  # r_c; every r_r is 0
    report = pair_report(records, chosen, [0.0] * 10)
    assert report["accuracy"] == 0.6 and report["pairs"] == 10
    assert report["by_degree"] == {"significantly_better": {"accuracy": 0.75, "n": 4},
                                   "better": {"accuracy": 0.5, "n": 2},
                                   "negligibly_better": {"accuracy": 0.5, "n": 4}}
    assert list(report["by_degree"]) == ["significantly_better", "better", "negligibly_better"]  # Table 8's order
    assert report["by_safety_bin"] == {"chosen_safe": {"accuracy": 1.0, "n": 1}, "both_unsafe": {"accuracy": 0.0, "n": 1}}
    assert report["by_source"]["safety"]["accuracy"] == 0.5 and report["by_source"]["helpfulness"]["n"] == 8
    # the oracle prefers the chosen answer of the first 4 pairs and the rejected one of the next 4 (noisy labels):
    # the reward model orders 3 + 2 of those 8 as the oracle does, the labels 4 of 8
    assert report["oracle_agreement"] == {"reward_model": 5 / 8, "labels": 0.5, "n": 8}


def test_the_calibration_curve_counts_both_orientations():
    rng = np.random.default_rng(0)
    d = rng.normal(0, 2, 4000)
    better = (rng.random(4000) < 1 / (1 + np.exp(-d))).astype(float)  # outcomes drawn from sigmoid(d): calibrated
    bins = calibration(d, better, bins=8)
    assert sum(b["n"] for b in bins) == 8000 and len(bins) == 8
    assert [b["difference"] for b in bins] == sorted(b["difference"] for b in bins)
    for lo, hi in zip(bins, bins[::-1]):  # symmetric about (0, 1/2): each pair is counted as (d, y) and (-d, 1 - y)
        assert lo["difference"] == pytest.approx(-hi["difference"]) and lo["observed"] == pytest.approx(1 - hi["observed"])
    assert max(abs(b["observed"] - b["predicted"]) for b in bins) < 0.05
    # labels alone (no oracle): the chosen answer is always the better one; a model that always prefers it puts
    # every negative difference at "never better" and every positive one at "always better"
    always = calibration(np.abs(d), np.ones(4000), bins=4)
    assert [b["observed"] for b in always] == [0.0, 0.0, 1.0, 1.0]


def test_rm_eval_and_rm_score_through_the_cli(tmp_path, tokenizer_512, capsys):
    torch.manual_seed(0)
    rm = unit_scale_(Transformer(ModelConfig.from_name("tiny", head="reward"))).eval()
    save_model(rm, tmp_path / "rm", tokenizer_path=tokenizer_512)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", seeded_pairs(7, 12))
    main(["rm", "eval", str(tmp_path / "rm"), "--pairs", f"[{pairs}]", "--out_dir", str(tmp_path / "eval"),
          "--device", "cpu"])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    scores = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    tok = Tokenizer(tokenizer_512)
    recs = read_preferences(pairs)
    expected = score_sequences(rm, [encode_chat(tok, [*r.prompt, {"role": "assistant", "content": r.chosen}]).ids
                                    for r in recs])
    assert [s["chosen"] for s in scores] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert report["accuracy"] == np.mean([s["chosen"] > s["rejected"] for s in scores])
    assert (tmp_path / "eval" / "calibration.png").stat().st_size > 1000
    assert "pairs: accuracy" in capsys.readouterr().out

    dialogues = write_jsonl(tmp_path / "d.jsonl", [{"messages": [*r.prompt, {"role": "assistant", "content": r.chosen}],
                                                    "id": i} for i, r in enumerate(recs)])
    main(["rm", "score", str(tmp_path / "rm"), "--dialogues", str(dialogues), "--out", str(tmp_path / "scored.jsonl"),
          "--device", "cpu"])
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [s["id"] for s in scored] == list(range(12))
    assert [s["score"] for s in scored] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    with pytest.raises(SystemExit):  # an existing output is not replaced without --overwrite
        main(["rm", "score", str(tmp_path / "rm"), "--dialogues", str(dialogues), "--out", str(tmp_path / "scored.jsonl")])
    assert "exists; pass --overwrite true" in capsys.readouterr().err
    save_model(Transformer(ModelConfig.from_name("tiny")), tmp_path / "lm", tokenizer_path=tokenizer_512)
    with pytest.raises(SystemExit):  # a language model is not a reward model
        main(["rm", "eval", str(tmp_path / "lm"), "--pairs", f"[{pairs}]", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a language model" in err[0] and "not a reward model" in err[0], err
