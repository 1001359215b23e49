"""Data parallelism through torchrun on the CPU (gloo, 2 processes): FSDP2 and DDP give the single-process
losses for the same global batch, with uneven loss masks; a sharded checkpoint written by 2 ranks resumes in
1 process and in 2, continuing the same curve.

Tolerance: rtol 1e-5. The runs differ only in where sums happen (per-rank partial sums of gradients and token
counts, reduced over 2 ranks), which moves fp32 results by ~1e-7 relative per step; any change of data
order, normalisation or gradient averaging moves the losses by far more (the accumulation test in
test_pretrain.py shows per-micro-batch averaging alone changes them at 1e-3).
"""

import os
import subprocess
import sys

import pytest

from lmforge.cli import main
from lmforge.train.metrics import read_step_metrics

pytestmark = pytest.mark.slow

STEPS = ["--train.steps", "4"]


def _args(data_dir, run_dir, *extra):
    # 4 steps of 2048 tokens: 4 sequences of 128 per micro-batch, accumulation 4 in one process, 2 on 2 ranks
    return ["pretrain", "--preset", "tiny", "--data.dir", str(data_dir), "--run.dir", str(run_dir), "--train.device", "cpu",
            "--train.global_batch_tokens", "2048", "--train.micro_batch_size", "4", "--train.seq_len", "128",
            "--optim.lr", "1e-2", "--optim.warmup_steps", "2", "--run.checkpoint_every", "2",
            "--run.eval_every", "0", "--run.progress", "false", "--train.threads", "1", *extra]


def _losses(run_dir):
    return [r["loss"] for r in read_step_metrics(run_dir / "metrics.jsonl")]


def _torchrun(args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lmforge.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def single_process(masked_token_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    main(_args(masked_token_data, run, *STEPS))
    return _losses(run)


@pytest.fixture(scope="module")
def fsdp_run(masked_token_data, tmp_path_factory):
    """4 steps on 2 FSDP2 ranks, sharded checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("fsdp") / "run"
    _torchrun(_args(masked_token_data, run, *STEPS, "--parallel.mode", "fsdp"))
    return run


def test_fsdp_two_ranks_equal_one_process(fsdp_run, single_process):
    assert len(single_process) == 4
    assert _losses(fsdp_run) == pytest.approx(single_process, rel=1e-5)
    assert (fsdp_run / "model" / "model.safetensors").exists()


def test_ddp_two_ranks_equal_one_process(masked_token_data, single_process, tmp_path):
    _torchrun(_args(masked_token_data, tmp_path / "run", *STEPS, "--parallel.mode", "ddp"))
    assert _losses(tmp_path / "run") == pytest.approx(single_process, rel=1e-5)


def test_final_models_agree(fsdp_run, masked_token_data, tmp_path):
    """The full state gathered from the shards equals the single-process model's weights."""
    import torch

    from lmforge.models.checkpoint import load_model

    main(_args(masked_token_data, tmp_path / "single", *STEPS))
    a, b = load_model(fsdp_run / "model"), load_model(tmp_path / "single" / "model")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def test_sharded_checkpoint_resumes_in_one_and_two_processes(fsdp_run, masked_token_data, single_process, tmp_path):
    step2 = fsdp_run / "checkpoints" / "step_000002"
    assert step2.is_dir(), sorted(p.name for p in (fsdp_run / "checkpoints").iterdir())
    main(_args(masked_token_data, tmp_path / "one", *STEPS, "--run.resume", str(step2)))
    assert _losses(tmp_path / "one") == pytest.approx(single_process[2:], rel=1e-5)
    _torchrun(_args(masked_token_data, tmp_path / "two", *STEPS, "--run.resume", str(step2), "--parallel.mode", "fsdp"))
    assert _losses(tmp_path / "two") == pytest.approx(single_process[2:], rel=1e-5)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_activation_checkpointing_does_not_change_the_losses(policy, masked_token_data, single_process, tmp_path):
    main(_args(masked_token_data, tmp_path / "run", *STEPS, "--parallel.activation_checkpointing", policy))
    assert _losses(tmp_path / "run") == pytest.approx(single_process, rel=1e-6)


def _grad_norms(run_dir):
    return [r["grad_norm"] for r in read_step_metrics(run_dir / "metrics.jsonl")]


def test_tensor_parallel_training_equals_one_process(masked_token_data, single_process, tmp_path):
    """2 tensor-parallel ranks (one data-parallel rank): the same losses and gradient norms as one process,
    the final model's full state equals the one-process model's, and the (DTensor-sharded) checkpoint of
    step 2 resumes in one plain process on the same curve."""
    import torch

    from lmforge.models.checkpoint import load_model

    run = tmp_path / "tp"
    _torchrun(_args(masked_token_data, run, *STEPS, "--parallel.tensor_parallel", "2"))
    assert _losses(run) == pytest.approx(single_process, rel=1e-5)
    main(_args(masked_token_data, tmp_path / "single", *STEPS))
    assert _grad_norms(run) == pytest.approx(_grad_norms(tmp_path / "single"), rel=1e-5)
    a, b = load_model(run / "model"), load_model(tmp_path / "single" / "model")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)
    main(_args(masked_token_data, tmp_path / "one", *STEPS, "--run.resume", str(run / "checkpoints" / "step_000002")))
    assert _losses(tmp_path / "one") == pytest.approx(single_process[2:], rel=1e-5)


def test_tensor_parallel_with_fsdp_equals_one_process(masked_token_data, single_process, tmp_path):
    """4 processes as a (dp 2, tp 2) mesh: FSDP2 over dp, tensor parallelism over tp, every block recomputed
    in the backward pass (activation checkpointing around tensor-parallel blocks); the one-process losses."""
    _torchrun(_args(masked_token_data, tmp_path / "run", *STEPS, "--parallel.tensor_parallel", "2",
                    "--parallel.activation_checkpointing", "full"), nproc=4)
    assert _losses(tmp_path / "run") == pytest.approx(single_process, rel=1e-5)


def test_tensor_parallel_moe_training_equals_one_process(masked_token_data, tmp_path):
    """MoE layers stay replicated under tensor parallelism (attention split, experts not): still the same
    losses, gradient norms and router losses as one process."""
    moe = ["--preset", "tiny-moe", "--train.steps", "3"]  # the later flags win over _args' own
    _torchrun(_args(masked_token_data, tmp_path / "tp", *moe, "--parallel.tensor_parallel", "2"))
    main(_args(masked_token_data, tmp_path / "one", *moe))
    for key in ("loss", "grad_norm", "aux/load_balance", "aux/z_loss"):
        ours = [r[key] for r in read_step_metrics(tmp_path / "tp" / "metrics.jsonl")]
        theirs = [r[key] for r in read_step_metrics(tmp_path / "one" / "metrics.jsonl")]
        assert len(ours) == 3 and ours == pytest.approx(theirs, rel=1e-5), key
