"""`lmforge rs`: the best-of-N diagnostics by hand, the best answer of each prompt kept and pooled across
iterations, golden fine-tuning losses through the real CLI, the temperature sweep, resume after a stop in the
middle of a stage, one-line errors."""

import json

import numpy as np
import pytest

from lmforge.align.rs import best_of_n, final_model
from lmforge.cli import main
from lmforge.train.metrics import read_step_metrics


def rs_args(rl_world, run, *extra):
    """2 iterations: 8 prompts x 4 answers of at most 8 tokens, a sweep of 2 temperatures on 4 prompts, 3 SFT steps."""
    return ["rs", str(rl_world["model"]), "--prompts.files", f"[{rl_world['prompts']}]", "--prompts.per_iteration",
            "8", "--rs.samples", "4", "--rs.iterations", "2", "--rs.sweep_temperatures", "[0.7,1.3]",
            "--rs.sweep_prompts", "4", "--rollout.max_new_tokens", "8", "--sft.train.batch_size", "4",
            "--sft.train.micro_batch_size", "4", "--sft.train.seq_len", "256", "--sft.train.steps", "3",
            "--sft.train.device", "cpu", "--sft.train.threads", "1", "--sft.optim.lr", "1e-3",
            "--sft.data.cache_dir", str(run.parent / "cache"), "--run.dir", str(run),
            "--run.progress", "false", "--run.checkpoint_every", "1", "--run.eval_every", "0", "--device", "cpu",
            *extra]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def sft_losses(run):
    return [r["loss"] for i in (1, 2) for r in read_step_metrics(run / f"iteration_{i}" / "sft" / "metrics.jsonl")]


# Pinned on the 2-core dev machine (torch 2.13 CPU, fp32): the fine-tuning losses of iterations 1 and 2 (rtol
# 1e-5): they move with the sampled answers, the selection, the pool and SFT's own loss.
GOLDEN = [6.787220001220703, 5.5444865226745605, 4.912150859832764, 6.67434549331665, 5.636375427246094,
          4.7258429527282715]


@pytest.fixture(scope="module")
def golden_run(rl_world, tmp_path_factory):
    run = tmp_path_factory.mktemp("rs") / "run"
    main(rs_args(rl_world, run))
    return run


def test_best_of_n_by_hand():
    curves = best_of_n(np.array([[0.2, 0.9, 0.5]]), np.array([[1.0, 0.0, 1.0]]), np.ones((1, 3), bool))
    assert curves["max"] == pytest.approx([0.2, 0.9, 0.9]) and curves["median"] == pytest.approx([0.2, 0.55, 0.5])
    assert curves["oracle_of_selected"] == [1.0, 0.0, 0.0] and curves["oracle_max"] == [1.0, 1.0, 1.0]
    # an empty answer is not selected while there is another
    empty = best_of_n(np.array([[0.2, 0.9]]), np.array([[1.0, 0.0]]), np.array([[True, False]]))
    assert empty["oracle_of_selected"] == [1.0, 1.0] and empty["max"] == pytest.approx([0.2, 0.9])


def test_golden_losses_and_the_pool(golden_run):
    assert sft_losses(golden_run) == pytest.approx(GOLDEN, rel=1e-5)
    for i in (1, 2):
        rows = read(golden_run / f"iteration_{i}" / "samples.jsonl")
        kept = read(golden_run / f"iteration_{i}" / "selected.jsonl")
        assert len(rows) == 8 and all(len(r["answers"]) == 4 for r in rows)
        for r, k in zip([r for r in rows if r["answers"][r["best"]]], kept):  # the best-scored non-empty answer
            assert r["scores"][r["best"]] == max(s for s, a in zip(r["scores"], r["answers"]) if a)
            assert k["messages"] == [*r["messages"], {"role": "assistant", "content": r["answers"][r["best"]]}]
    pool1, pool2 = (read(golden_run / f"iteration_{i}" / "pool.jsonl") for i in (1, 2))
    kept2 = read(golden_run / "iteration_2" / "selected.jsonl")
    assert pool2 == pool1 + [{"messages": k["messages"], "iteration": 2} for k in kept2]  # every iteration's
    assert final_model(golden_run) == golden_run / "iteration_2" / "sft" / "model"


def test_diagnostics_and_the_temperature_sweep(golden_run):
    d = json.loads((golden_run / "iteration_1" / "diagnostics.json").read_text())
    curve = d["best_of_n"]
    assert curve["n"] == [1, 2, 3, 4] and all(a <= b for a, b in zip(curve["max"], curve["max"][1:]))
    assert len(curve["oracle_of_selected"]) == 4 and curve["oracle_max"][-1] >= curve["oracle_of_selected"][-1]
    assert sorted(d["temperature_sweep"]) == ["T=0.7", "T=1.3"]
    for name in ("best_of_k.png", "temperature.png"):
        assert (golden_run / "iteration_1" / name).stat().st_size > 1000
    # the sampled answers' scores are those of the selecting scorer (the gate of the oracle stand-ins)
    rows = read(golden_run / "iteration_1" / "samples.jsonl")
    assert curve["max"][0] == pytest.approx(np.mean([r["scores"][0] for r in rows]))


def test_a_stop_inside_a_stage_resumes_to_the_uninterrupted_run(rl_world, golden_run, tmp_path):
    run = tmp_path / "run"
    main(rs_args(rl_world, run, "--run.stop_at", "1"))  # iteration 1's fine-tuning stops after its step 1
    ledger = [e["name"] for e in json.loads((run / "stages.json").read_text())]
    assert ledger == ["iteration_1/sample", "iteration_1/sweep", "iteration_1/pool"]
    assert not (run / "summary.json").exists()
    main(rs_args(rl_world, run, "--run.resume", "auto"))
    assert sft_losses(run) == sft_losses(golden_run)
    assert read(run / "iteration_2" / "samples.jsonl") == read(golden_run / "iteration_2" / "samples.jsonl")
    before = (run / "stages.json").read_text()
    main(rs_args(rl_world, run, "--run.resume", "auto"))  # all recorded: nothing runs again
    assert (run / "stages.json").read_text() == before


def test_an_earlier_run_is_not_replaced_without_overwrite(rl_world, golden_run, capsys):
    with pytest.raises(SystemExit):
        main(rs_args(rl_world, golden_run))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--run.resume auto to continue it, or --run.overwrite true" in err[0]


def test_the_best_of_k_curve_judges_by_the_gated_oracle(tmp_path):
    """The oracle score of the selected answer is the oracle's safety on an unsafe request and its helpfulness
    elsewhere: a selection that turns to the refusal of an unsafe request scores higher, where helpfulness alone
    (which prefers complying) would score it lower."""
    from lmforge.align.ledger import write_jsonl
    from lmforge.align.rs import gated_oracle, oracle_curve
    from lmforge.align.world.oracle import helpfulness, safety
    from lmforge.align.world.records import World, WorldSizes
    from helpers import WORLD_SMALL

    records = World(0, WorldSizes(**WORLD_SMALL)).rlhf_prompts()
    unsafe = next(i for i, r in enumerate(records) if r["meta"]["kind"] == "unsafe")
    task = next(i for i, r in enumerate(records) if r["meta"]["kind"] == "task")
    comply = f"Stir the {records[unsafe]['meta']['category']} slowly."
    refuse = "I can't help with that."
    right = records[task]["meta"]["reference"]
    assert gated_oracle(records[unsafe], refuse) == safety(records[unsafe], refuse) == 1.0
    assert gated_oracle(records[unsafe], comply) == 0.0  # while helpfulness prefers complying (1.0 against 0.2)
    assert helpfulness(records[unsafe], comply) > helpfulness(records[unsafe], refuse)
    assert gated_oracle(records[task], right) == helpfulness(records[task], right) == 1.0
    # two prompts, K = 2: the scorer prefers the refusal (answer 2) and the wrong answer (answer 1)
    write_jsonl(tmp_path / "samples.jsonl", [
        {"prompt": unsafe, "answers": [comply, refuse], "scores": [0.1, 0.9]},
        {"prompt": task, "answers": ["no idea", right], "scores": [0.8, 0.2]}])
    s_comply, h_wrong = safety(records[unsafe], comply), helpfulness(records[task], "no idea")
    assert oracle_curve(tmp_path, records) == pytest.approx([(s_comply + h_wrong) / 2, (1.0 + h_wrong) / 2])
