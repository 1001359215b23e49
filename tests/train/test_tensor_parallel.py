"""Tensor parallelism (DTensor column / row-wise plans) on 2 gloo ranks gives the single-process logits:
full forward, chunked pre-fill into a per-rank KV cache, and decode steps (tolerance 1e-5 on unit-scale
logits: the ranks' partial products are summed in another order)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import ModelConfig, Transformer
from lmforge.train.parallel import apply_tensor_parallel

WORKER = Path(__file__).with_name("tp_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny-swa", "tiny-moe"])
def test_tensor_parallel_logits_equal_single_process(preset):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), preset],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_degree_must_divide_the_heads():
    class FakeMesh:
        def size(self):
            return 3

    with pytest.raises(ValueError, match="tensor-parallel degree 3 must divide n_heads \\(4\\)"):
        apply_tensor_parallel(Transformer(ModelConfig.from_name("tiny")), FakeMesh())
