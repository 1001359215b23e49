"""Validation reads each sample of a split exactly once, however the batch is split over ranks."""

import pytest

from lmforge.data import PackedLoader
from lmforge.train.evaluate import split_batches


@pytest.mark.parametrize("world_size, batch_size", [(1, 5), (2, 2), (3, 4)])
def test_split_batches_cover_every_sample_once(token_data, world_size, batch_size):
    whole = PackedLoader(token_data, split="validation", seq_len=64, batch_size=1, shuffle=False)
    expected = sorted(tuple(next(whole).inputs[0].tolist()) for _ in range(whole.num_samples))
    rows = []
    for rank in range(world_size):
        loader = PackedLoader(token_data, split="validation", seq_len=64, batch_size=batch_size, rank=rank,
                              world_size=world_size, shuffle=False)
        assert loader.num_samples % (batch_size * world_size) != 0  # the last global batch is partial
        rows += [tuple(r.tolist()) for b in split_batches(loader) for r in b.inputs]
    assert sorted(rows) == expected


def test_max_batches_stops_early(token_data):
    loader = PackedLoader(token_data, split="validation", seq_len=64, batch_size=4, shuffle=False)
    assert [len(b.inputs) for b in split_batches(loader, max_batches=2)] == [4, 4]
