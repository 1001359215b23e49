"""On CUDA: compiled training (per-block torch.compile) gives the eager losses for the first steps, through
the real `lmforge pretrain`. Run on the device machine (`pytest -m gpu tests/train`); skipped elsewhere.

Tolerances: fp32 rtol 1e-4 (Inductor fuses and reorders float sums; ~1e-6 per op, compounding over 5
optimizer steps at lr 1e-2); bf16 autocast rtol 2e-2 (bf16 keeps 8 bits of mantissa, and rounding points
differ between fused and unfused kernels).
"""

import pytest
import torch

from lmforge.cli import main
from lmforge.train.metrics import read_step_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _run(data_dir, run_dir, *extra):
    main(["pretrain", "--preset", "tiny", "--data.dir", str(data_dir), "--run.dir", str(run_dir),
          "--train.steps", "5", "--train.global_batch_tokens", "2048", "--train.micro_batch_size", "4",
          "--train.seq_len", "128", "--optim.lr", "1e-2", "--optim.warmup_steps", "2", "--run.eval_every", "0",
          "--run.progress", "false", "--train.device", "cuda", *extra])
    return [r["loss"] for r in read_step_metrics(run_dir / "metrics.jsonl")]


@pytest.mark.parametrize("precision, rtol, checkpointing", [("fp32", 1e-4, "none"), ("bf16", 2e-2, "none"),
                                                          ("bf16", 2e-2, "full")])
def test_compiled_equals_eager(precision, rtol, checkpointing, masked_token_data, tmp_path):
    """"full": compiled blocks inside activation checkpointing (the 7B configuration of benchmarks/two_gpus.py)."""
    torch._dynamo.reset()
    eager = _run(masked_token_data, tmp_path / "eager", "--train.precision", precision)
    compiled = _run(masked_token_data, tmp_path / "compiled", "--train.precision", precision,
                    "--parallel.compile", "true", "--parallel.activation_checkpointing", checkpointing)
    assert len(eager) == 5
    assert compiled == pytest.approx(eager, rel=rtol)
