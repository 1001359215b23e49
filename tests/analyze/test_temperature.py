"""`lmforge analyze temperature`: runs on tiny models and writes its plots and JSON; its figures equal a
recomputation from the answers it wrote; a sample is the answer its seed gives alone; hand-checked measures,
prompt choice and comparison; one-line errors."""

import json

import pytest
import torch
from helpers import WORLD_SMALL, unit_scale_

from lmforge import ModelConfig, Transformer
from lmforge.align.eval_chat import engine_answerer, read_records
from lmforge.align.world.build import build_world
from lmforge.align.world.records import WorldSizes
from lmforge.analyze.diversity import distinct_n, self_bleu
from lmforge.analyze.temperature import TemperatureAnalysisError, analyze_temperature, compare, measure, pick
from lmforge.cli import main
from lmforge.infer.sampling import SamplingParams
from lmforge.models.checkpoint import save_model
from lmforge.tokenizer import Tokenizer

SAMPLES, MAX_NEW = 3, 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_512):
    """A small world and two tiny random models ("sft" and "rlhf-v1": different seeds) with the 512-piece
    tokenizer, and one run of the verb through the command line."""
    root = tmp_path_factory.mktemp("temperature")
    build_world(root / "world", seed=0, sizes=WorldSizes(**WORLD_SMALL))
    for seed, name in enumerate(("sft", "rlhf-v1")):
        torch.manual_seed(seed)
        model = unit_scale_(Transformer(ModelConfig.from_name("tiny", max_seq_len=256))).eval()
        save_model(model, root / name / "model", tokenizer_path=tokenizer_512)
    main(["analyze", "temperature", f"[{root / 'sft' / 'model'},{root / 'rlhf-v1' / 'model'}]",
          "--world", str(root / "world"), "--out_dir", str(root / "out"), "--temperatures", "[0,1.0]",
          "--samples", str(SAMPLES), "--prompts", "2", "--sampling.max_new_tokens", str(MAX_NEW),
          "--batch_size", "8", "--progress", "false"])
    return root


def test_runs_on_tiny_models_and_writes_plots_and_json(setup):
    out = setup / "out"
    assert sorted(p.name for p in out.iterdir()) == [".lmforge-output", "distinct.png", "samples.jsonl",
                                                    "temperature.json", "temperature.png"]
    report = json.loads((out / "temperature.json").read_text())
    assert [m["name"] for m in report["models"]] == ["sft", "rlhf-v1"]  # named after the folders above "model"
    assert report["temperatures"] == [0.0, 1.0] and report["samples"] == SAMPLES
    assert {s: len(ids) for s, ids in report["prompts"].items()} == {"factual": 2, "creative": 2}
    for name in ("sft", "rlhf-v1"):
        for s in ("factual", "creative"):
            rows = report["results"][name][s]
            assert [r["temperature"] for r in rows] == [0.0, 1.0]
            assert all(0 <= r["self_bleu"]["mean"] <= 100 + 1e-9 and 0 <= r["helpfulness"] <= 1 for r in rows)
            assert ("accuracy" in rows[0]) == (s == "factual")  # the fact look-ups have a right answer
    (c,) = report["comparison"]
    assert (c["model"], c["baseline"]) == ("rlhf-v1", "sft") and isinstance(c["reproduces_llama2"], bool)


def test_figures_equal_a_recomputation_from_the_samples(setup):
    report = json.loads((setup / "out" / "temperature.json").read_text())
    rows = [json.loads(line) for line in (setup / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 * 2 * SAMPLES  # models x sets x temperatures x prompts x samples
    for name in ("sft", "rlhf-v1"):
        for s in ("factual", "creative"):
            for t, row in enumerate(report["results"][name][s]):
                groups = [[r["answer"] for r in rows if (r["model"], r["set"], r["id"], r["temperature"])
                           == (name, s, pid, row["temperature"])] for pid in report["prompts"][s]]
                assert all(len(g) == SAMPLES for g in groups)
                scores = [self_bleu(g) for g in groups]
                assert row["self_bleu"]["mean"] == pytest.approx(sum(scores) / 2, abs=1e-12)
                assert row["self_bleu"]["std"] == pytest.approx(abs(scores[0] - scores[1]) / 2, abs=1e-12)
                d2 = [d for d in (distinct_n(g, 2) for g in groups) if d is not None]
                assert row["distinct_2"]["mean"] == (pytest.approx(sum(d2) / len(d2)) if d2 else None)
                if row["temperature"] == 0:  # greedy: every sample of a prompt is the same answer
                    assert all(len(set(g)) == 1 for g in groups)
    # at temperature 1 the seeds differ, and so do (some) answers
    assert any(len({r["answer"] for r in rows if (r["model"], r["set"], r["id"], r["temperature"]) == key}) > 1
               for key in {(r["model"], r["set"], r["id"], r["temperature"]) for r in rows if r["temperature"] == 1})


def test_a_sample_is_the_answer_its_seed_gives_alone(setup):
    from lmforge.models.checkpoint import load_model

    rows = [json.loads(line) for line in (setup / "out" / "samples.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["model"] == "rlhf-v1" and r["temperature"] == 1 and r["sample"] == 2)
    record = next(r for r in read_records(setup / "world" / f"eval_{row['set']}.jsonl") if r["id"] == row["id"])
    model = load_model(setup / "rlhf-v1" / "model").eval()
    answer = engine_answerer(model, Tokenizer(setup / "rlhf-v1" / "model"), batch_size=1)
    sampling = SamplingParams(temperature=1.0, seed=row["seed"], max_new_tokens=MAX_NEW)
    assert row["seed"] == 2 and answer([record["messages"]], sampling) == [row["answer"]]


def test_measure_by_hand(setup):
    factual = read_records(setup / "world" / "eval_factual.jsonl")[:2]
    right, wrong = factual[0]["meta"]["reference"], "I do not know."
    assert right == "The flag of Pedreor is blue."  # 7 words with the full stop; world v2 is frozen
    row = measure(factual, [[right, right, right], [wrong, wrong, ""]], 0.7)
    assert row["temperature"] == 0.7 and row["accuracy"] == 3 / 6 and row["empty"] == 1 / 6
    assert row["self_bleu"]["mean"] == pytest.approx((100 + self_bleu([wrong, wrong, ""])) / 2)
    assert row["words"] == (3 * 7 + 2 * 5 + 0) / 6


def test_pick_and_compare_worked_examples():
    assert pick(list(range(10)), 4) == [0, 2, 5, 7] and pick([1, 2], 5) == [1, 2]

    def rows(*self_bleus):
        return [{"self_bleu": {"mean": v}} for v in self_bleus]

    results = {"sft": {"factual": rows(40, 30), "creative": rows(30, 20)},
               "rlhf-v1": {"factual": rows(70, 60), "creative": rows(35, 25)},   # +30 factual, +5 creative
               "rlhf-v2": {"factual": rows(45, 35), "creative": rows(50, 40)}}   # +5 factual, +20 creative
    got = compare(results)
    assert [(c["model"], c["self_bleu_gap_factual"], c["self_bleu_gap_creative"], c["reproduces_llama2"])
            for c in got] == [("rlhf-v1", 30, 5, True), ("rlhf-v2", 5, 20, False)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(samples=1), "samples must be >= 2"),
    (dict(names=["a", "a"]), "are not distinct"),
    (dict(temperatures=()), "temperatures a non-empty list"),
])
def test_bad_options_are_refused_before_any_work(setup, tmp_path, kwargs, message):
    models = [str(setup / "sft" / "model"), str(setup / "rlhf-v1" / "model")]
    with pytest.raises(TemperatureAnalysisError, match=message):
        analyze_temperature(models, world=setup / "world", out_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line(setup, tmp_path, capsys):
    for argv, message in [([str(setup / "sft" / "model"), "--world", str(tmp_path)], "cannot read prompt file"),
                          ([str(setup / "sft" / "model"), "--world", str(setup / "world"), "--out_dir",
                            str(setup / "out")], "holds an earlier lmforge output")]:
        with pytest.raises(SystemExit) as e:
            main(["analyze", "temperature", *argv, "--progress", "false"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("lmforge: error: ") and message in err and "\n" not in err
