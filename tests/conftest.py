"""Shared test settings: CPU, float32, deterministic, few threads (CI has 2 cores)."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run the test on one thread: a tiny model's products are so small that on a busy 2-core machine two
    OpenMP threads spin on each other, 5-10x slower than one (the inference and usage tests take it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
