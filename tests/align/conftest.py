"""Fixtures of the alignment tests: a small world's sizes, and one default-size world built once per session."""

import pytest

from lmforge.align.world.build import build_world
from lmforge.align.world.records import WorldSizes

SMALL = dict(entities=6, corpus_files=4, corpus_arithmetic=200, corpus_lists=100, corpus_counting=100, corpus_lore=2,
             corpus_stories=20, sft_tasks=120, sft_multiturn=10, sft_instructions=20, sft_refusals=12,
             sft_refusals_preprompt=20, sft_lookalikes=20, sft_lookalikes_preprompt=5, sft_creative=5, eval_tasks=5,
             eval_unsafe=10, eval_lookalikes=10, eval_instructions=10, eval_multiturn=4, multiturn_turns=3,
             eval_factual=6, eval_creative=5, rlhf_prompts=40)


@pytest.fixture
def small_sizes():
    return WorldSizes(**SMALL)


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    """The world of seed 0 at the default sizes (the benchmark's), built once."""
    out = tmp_path_factory.mktemp("world") / "world"
    build_world(out, seed=0)
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    # NOTE: as in tests/infer: decoding a tiny model on a busy 2-core machine runs many times slower with two
    # OpenMP threads spinning on each other than with one.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
