"""Inference tests run their tiny models on one thread."""

from helpers import one_torch_thread  # noqa: F401  (an autouse fixture)
