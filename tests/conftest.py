"""Shared test settings: CPU, float32, deterministic, few threads (CI has 2 cores)."""

import os

import pytest
import torch

torch.set_num_threads(2)
if not torch.cuda.is_available():
    # NOTE: Triton kernels (lmforge.infer.engine.triton_decode) run on the CPU under Triton's interpreter,
    # which must be chosen before anything imports triton (torch.compile may, to probe for it); never on a
    # GPU machine, where it would slow every Inductor kernel down
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
