"""Fixtures of the alignment tests: a small world's sizes, the default-size world built once, one torch thread."""

import pytest
from align_helpers import SMALL
from helpers import one_torch_thread  # noqa: F401  (an autouse fixture: the engine decodes on one thread)

from lmforge.align.world.build import build_world
from lmforge.align.world.records import WorldSizes


@pytest.fixture
def small_sizes():
    return WorldSizes(**SMALL)


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    """The world of seed 0 at the default sizes (the benchmark's), built once."""
    out = tmp_path_factory.mktemp("world") / "world"
    build_world(out, seed=0)
    return out
