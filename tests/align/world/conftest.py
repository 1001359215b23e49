"""Fixtures of the world tests: a small world's sizes, and the default-size world built once."""

import pytest
from helpers import WORLD_SMALL as SMALL

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
