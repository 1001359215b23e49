"""Interrupted runs continue the uninterrupted curve exactly: SIGTERM (pre-emption notice) and SIGKILL."""

import signal
import subprocess
import sys
import time

from lmforge.cli import main
from lmforge.train.checkpointing import latest_checkpoint
from lmforge.train.metrics import read_metrics, read_step_metrics

STEPS = 10


def args(data_dir, run_dir, *extra):
    """10 steps of the tiny model, 4 accumulated micro-batches of 2 x 128 tokens each, a checkpoint every 2 steps."""
    return ["pretrain", "--preset", "tiny", "--data.dir", str(data_dir), "--run.dir", str(run_dir), "--train.device", "cpu",
            "--train.steps", str(STEPS), "--train.global_batch_tokens", "1024", "--train.micro_batch_size", "2",
            "--train.seq_len", "128", "--optim.lr", "1e-2", "--optim.warmup_steps", "2",
            "--run.checkpoint_every", "2", "--run.eval_every", "0", "--run.progress", "false", "--train.threads", "2",
            *extra]


def losses(run_dir):
    return [r["loss"] for r in read_step_metrics(run_dir / "metrics.jsonl")]


def start(data_dir, run_dir, *extra):
    return subprocess.Popen([sys.executable, "-m", "lmforge.cli", *args(data_dir, run_dir, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint_after(run_dir, step, proc, timeout=120):
    """Poll until a complete checkpoint newer than `step` exists; return its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = latest_checkpoint(run_dir / "checkpoints")
        if latest is not None and int(latest.name.split("_")[1]) > step:
            return int(latest.name.split("_")[1])
        assert proc.poll() is None, f"training ended early: {proc.communicate()}"
        time.sleep(0.02)
    raise TimeoutError(f"no checkpoint after step {step} in {timeout} s")


def test_sigterm_then_sigkill_then_resume_gives_the_uninterrupted_losses(token_data, tmp_path):
    main(args(token_data, tmp_path / "reference"))
    reference = losses(tmp_path / "reference")
    assert len(reference) == STEPS
    run = tmp_path / "run"

    # 1. SIGTERM while training: the run saves a checkpoint at the next step boundary and exits 0.
    proc = start(token_data, run)
    wait_for_checkpoint_after(run, 0, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped = int(latest_checkpoint(run / "checkpoints").name.split("_")[1])
    assert stopped < STEPS and not (run / "model").exists()
    events = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "sigterm"]
    assert [e["step"] for e in events] == [stopped]
    assert losses(run) == reference[:stopped]

    # 2. Resumed, then SIGKILLed after its next checkpoint: no chance to save anything, maybe mid-checkpoint.
    proc = start(token_data, run, "--run.resume", "auto")
    wait_for_checkpoint_after(run, stopped, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (run / "model").exists()

    # 3. Resumed to the end (in this process): exactly the uninterrupted losses, bit for bit.
    main(args(token_data, run, "--run.resume", "auto"))
    assert losses(run) == reference
    assert (run / "model" / "model.safetensors").exists()
    assert [r["step"] for r in read_step_metrics(run / "metrics.jsonl")] == list(range(1, STEPS + 1))


def test_stop_at_then_resume_without_checkpoints_gives_the_uninterrupted_losses(token_data, tmp_path):
    """--run.stop_at 4 ends the run after step 4 with its checkpoint (and no model); the same command with
    --run.resume auto and --run.checkpoint_every 0 continues to the end, saving no checkpoint but the model."""
    main(args(token_data, tmp_path / "reference", "--run.checkpoint_every", "0"))
    reference = losses(tmp_path / "reference")
    assert not list((tmp_path / "reference" / "checkpoints").glob("step_*"))
    run = tmp_path / "run"
    main(args(token_data, run, "--run.checkpoint_every", "0", "--run.stop_at", "4"))
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_000004"]
    assert not (run / "model").exists() and losses(run) == reference[:4]
    assert [e["step"] for e in read_metrics(run / "metrics.jsonl") if e.get("event") == "stop_at"] == [4]
    main(args(token_data, run, "--run.checkpoint_every", "0", "--run.stop_at", "4", "--run.resume", "auto"))
    assert losses(run) == reference
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_000004"]
    assert (run / "model" / "model.safetensors").exists()
    main(args(token_data, tmp_path / "unsaved", "--run.checkpoint_every", "0", "--run.save_model", "false"))
    assert losses(tmp_path / "unsaved") == reference and not (tmp_path / "unsaved" / "model").exists()
