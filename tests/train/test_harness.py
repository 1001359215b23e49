"""The training harness through `lmforge pretrain`: the run folder's output rule, Ctrl-C, the summary and plot."""

import json
import signal
import subprocess
import sys

import pytest

from lmforge.cli import main
from lmforge.train.checkpointing import latest_checkpoint
from lmforge.train.metrics import read_metrics, read_step_metrics
from test_resume import args, start, wait_for_checkpoint_after


def test_a_folder_lmforge_did_not_write_is_never_used_as_a_run_folder(token_data, tmp_path, capsys):
    """Defect 1 of the new-user issue, for training runs: nothing of the user's is replaced, with any flags."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("notes")
    for extra in ([], ["--run.overwrite", "true"], ["--run.resume", "auto"]):
        with pytest.raises(SystemExit) as exit_:
            main(args(token_data, precious, "--train.steps", "1", *extra))
        assert exit_.value.code == 2
        assert "lmforge did not write it" in capsys.readouterr().err
        assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]
        assert (precious / "notes.txt").read_text() == "notes"


def test_an_earlier_run_is_continued_or_replaced_only_when_asked(token_data, tmp_path, capsys):
    run = tmp_path / "run"
    main(args(token_data, run, "--train.steps", "2"))
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    with pytest.raises(SystemExit):
        main(args(token_data, run, "--train.steps", "2"))
    err = capsys.readouterr().err
    assert "holds an earlier lmforge output; pass --run.resume auto to continue it, or --run.overwrite true" in err
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before
    # --run.overwrite true deletes the old run first: no checkpoint of it survives, the metrics start again
    main(args(token_data, run, "--train.steps", "1", "--run.checkpoint_every", "0", "--run.overwrite", "true"))
    assert not list((run / "checkpoints").glob("step_*")) if (run / "checkpoints").exists() else True
    assert [r["step"] for r in read_step_metrics(run / "metrics.jsonl")] == [1]
    assert (run / ".lmforge-output").is_file()


def test_a_finished_run_leaves_a_summary_and_a_plot(token_data, tmp_path, capsys):
    run = tmp_path / "run"
    main(args(token_data, run, "--train.steps", "3"))
    out = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    losses = [r["loss"] for r in read_step_metrics(run / "metrics.jsonl")]
    assert summary["steps"] == 3 and summary["tokens_seen"] == 3 * 1024
    assert summary["final loss"] == losses[-1] and summary["first loss"] == losses[0]
    assert summary["seconds"] > 0
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "pretrain finished" in out and str(run / "summary.json") in out
    header = (run / "config.yaml").read_text().splitlines()[1]
    assert header == f"# lmforge pretrain --config {run / 'config.yaml'}"


def test_ctrl_c_saves_a_checkpoint_like_sigterm(token_data, tmp_path):
    """The first Ctrl-C (SIGINT) stops at the next step boundary with a checkpoint and exit status 0; the
    same command with --run.resume auto then finishes the run (the SIGTERM test shows that such a resume
    gives the uninterrupted losses bit for bit)."""
    run = tmp_path / "run"
    proc = start(token_data, run)
    wait_for_checkpoint_after(run, 0, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Ctrl-C again to stop at once" in err and "Traceback" not in err
    stopped = int(latest_checkpoint(run / "checkpoints").name.split("_")[1])
    events = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "sigint"]
    assert [e["step"] for e in events] == [stopped] and not (run / "model").exists()
    main(args(token_data, run, "--run.resume", "auto"))
    assert [r["step"] for r in read_step_metrics(run / "metrics.jsonl")] == list(range(1, 11))


def test_a_second_ctrl_c_stops_at_once(token_data, tmp_path):
    """The second Ctrl-C, sent as soon as the first one's message appears (mid-step: steps of 8 micro-batches
    take far longer than reading one line), ends the process at once with status 130 and one line."""
    run = tmp_path / "run"
    cmd = args(token_data, run, "--train.steps", "1000", "--train.global_batch_tokens", "8192",
               "--run.checkpoint_every", "1")
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint_after(run, 0, proc)
    proc.send_signal(signal.SIGINT)
    seen = []
    while not seen or "Ctrl-C again" not in seen[-1]:
        seen.append(proc.stderr.readline())
        assert seen[-1], f"the process ended without the first Ctrl-C's message: {seen}"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "lmforge: interrupted"
