"""Inference tests run their tiny models on one thread."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    # NOTE: batch-1 decoding of a tiny model is a chain of (3, 64) x (64, 176) products; on a busy 2-core
    # machine two OpenMP threads spin on each other and run these tests 5-10x slower than one thread.
    yield
