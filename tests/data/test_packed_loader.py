"""`PackedLoader`: packing, shuffling, rank sharding, document ids, loss masks and exact resumption."""

import itertools

import numpy as np
import pytest
import torch

from lmforge.data import PackedLoader
from lmforge.data.loader import TokenStream
from lmforge.data.prepare import prepare_data, write_token_documents
from lmforge.tokenizer import encode_chat

T = 16


@pytest.fixture(scope="module")
def data_dir(corpus, tok_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens")
    prepare_data([str(corpus)], tokenizer=tok_path, out_dir=str(out), shard_tokens=2000, val_fraction=0.1, workers=1)
    return out


def stream_of(data_dir, split="train"):
    """The split's tokens as one array, read independently of the loader."""
    s = TokenStream(data_dir, split)
    return np.concatenate([np.asarray(t) for t in s.tokens]).astype(np.int64)


def rows(batch):
    return [tuple(r) for r in batch.inputs.tolist()]


def take(loader, n):
    return list(itertools.islice(loader, n))


def test_samples_tile_the_stream_and_shift_by_one(data_dir):
    tokens = stream_of(data_dir)
    loader = PackedLoader(data_dir, seq_len=T, batch_size=4, seed=0, shuffle=False)
    assert loader.num_samples == (len(tokens) - 1) // T
    assert all(isinstance(t, np.memmap) for t in loader.stream.tokens)  # never loaded into RAM
    for batch in take(loader, 5):
        assert batch.inputs.shape == batch.targets.shape == batch.loss_mask.shape == batch.document_ids.shape == (4, T)
        assert (batch.inputs.dtype, batch.targets.dtype, batch.loss_mask.dtype, batch.document_ids.dtype) == (
            torch.int64, torch.int64, torch.bool, torch.int32)
        assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    first = next(PackedLoader(data_dir, seq_len=T, batch_size=3, shuffle=False))
    for i in range(3):  # sample i = tokens [i*T, (i+1)*T + 1)
        assert first.inputs[i].tolist() == tokens[i * T : (i + 1) * T].tolist()
        assert first.targets[i].tolist() == tokens[i * T + 1 : (i + 1) * T + 1].tolist()
    assert first.loss_mask.all()  # plain text: learn everything


def test_samples_cross_shard_boundaries(data_dir):
    stream = TokenStream(data_dir)
    tokens = stream_of(data_dir)
    assert len(stream.tokens) > 3
    for boundary in stream.starts[1:-1]:
        ids, learn = stream.read(int(boundary) - 5, int(boundary) + 7)
        assert ids.tolist() == tokens[boundary - 5 : boundary + 7].tolist() and learn.all()


def test_each_epoch_is_a_seeded_permutation(data_dir):
    tokens = stream_of(data_dir)
    loader = PackedLoader(data_dir, seq_len=T, batch_size=5, seed=5)
    S = loader.num_samples
    epoch0 = [loader.sample_index(p) for p in range(S)]
    epoch1 = [loader.sample_index(p) for p in range(S, 2 * S)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(S))
    assert epoch0 != epoch1 and epoch0 != list(range(S))
    same_seed, other_seed = PackedLoader(data_dir, seq_len=T, seed=5), PackedLoader(data_dir, seq_len=T, seed=6)
    assert epoch0 == [same_seed.sample_index(p) for p in range(S)]
    assert epoch0 != [other_seed.sample_index(p) for p in range(S)]
    steps = S // 5 + 2  # the iterator runs on into the next epoch
    order = epoch0 + epoch1
    for step, batch in enumerate(take(loader, steps)):
        for r, i in enumerate(order[5 * step : 5 * step + 5]):
            assert batch.inputs[r].tolist() == tokens[i * T : (i + 1) * T].tolist()
    assert loader.epoch == 1 and loader.cursor == 5 * steps


def test_ranks_see_disjoint_samples(data_dir):
    W, B = 2, 3
    loaders = [PackedLoader(data_dir, seq_len=T, batch_size=B, rank=r, world_size=W, seed=1) for r in range(W)]
    steps = loaders[0].num_samples // (B * W)
    seen = [[], []]
    for _ in range(steps):
        for r, loader in enumerate(loaders):
            next(loader)
            seen[r] += [loader.sample_index(loader.cursor - B * W + r + W * k) for k in range(B)]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == steps * B * W
    # rank r takes global positions r, r+W, ... of each global batch
    single = PackedLoader(data_dir, seq_len=T, batch_size=B * W, seed=1)
    both = [next(PackedLoader(data_dir, seq_len=T, batch_size=B, rank=r, world_size=W, seed=1)) for r in range(W)]
    interleaved = [row for k in range(B) for row in (rows(both[0])[k], rows(both[1])[k])]
    assert rows(next(single)) == interleaved


def test_state_dict_resumes_exactly(data_dir):
    k, m = 7, 9
    loader = PackedLoader(data_dir, seq_len=T, batch_size=4, seed=2)
    take(loader, k)
    state = loader.state_dict()
    expected = take(loader, m)
    fresh = PackedLoader(data_dir, seq_len=T, batch_size=4, seed=2)
    fresh.load_state_dict(state)
    for a, b in zip(take(fresh, m), expected):
        for name in ("inputs", "targets", "loss_mask", "document_ids"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    with pytest.raises(ValueError, match="seq_len=16 but this loader has 32"):
        PackedLoader(data_dir, seq_len=32, batch_size=4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(data_dir, seq_len=T, batch_size=4, seed=3).load_state_dict(state)


def test_two_rank_state_resumes_on_one_rank_without_repeats_or_gaps(data_dir):
    W, B, k, m = 2, 2, 5, 6
    ranks = [PackedLoader(data_dir, seq_len=T, batch_size=B, rank=r, world_size=W, seed=4) for r in range(W)]
    before = []
    for _ in range(k):
        batches = [next(loader) for loader in ranks]
        before += [row for j in range(B) for row in (rows(batches[0])[j], rows(batches[1])[j])]
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict() and state["cursor"] == k * B * W
    one = PackedLoader(data_dir, seq_len=T, batch_size=3, seed=4)  # another global batch size, too
    one.load_state_dict(state)
    after = [row for b in take(one, m) for row in rows(b)]
    reference = PackedLoader(data_dir, seq_len=T, batch_size=1, seed=4)  # the global sample order, 1 by 1
    order = [row for b in take(reference, k * B * W + 3 * m) for row in rows(b)]
    assert before + after == order  # the same global sample sequence: nothing repeated, nothing skipped


def test_document_ids_follow_documents(data_dir):
    loader = PackedLoader(data_dir, seq_len=64, batch_size=8, seed=0)
    eos = 2
    for batch in take(loader, 5):
        for inputs, docs in zip(batch.inputs.tolist(), batch.document_ids.tolist()):
            # plain text: each document ends with </s>, so the id increments right after each eos
            expected = np.concatenate([[0], np.cumsum(np.array(inputs[:-1]) == eos)])
            assert docs == expected.tolist()


def test_loss_mask_and_documents_from_shard_masks(tok, tok_path, tmp_path):
    dialogues = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i} b"},
                  {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}] for i in range(30)]
    encoded = [encode_chat(tok, d) for d in dialogues]
    write_token_documents([(e.ids, e.loss_mask) for e in encoded], tmp_path, tok_path, shard_tokens=300)
    ids = np.concatenate([e.ids for e in encoded])
    mask = np.concatenate([e.loss_mask for e in encoded])
    doc_of = np.repeat(np.arange(len(encoded)), [len(e.ids) for e in encoded])
    loader = PackedLoader(tmp_path, seq_len=T, batch_size=4, seed=0)
    for _ in range(10):
        batch = next(loader)
        for r in range(4):
            i = loader.sample_index(loader.cursor - 4 + r)
            span = slice(i * T, i * T + T)
            assert batch.inputs[r].tolist() == ids[span].tolist()
            assert batch.loss_mask[r].tolist() == mask[i * T + 1 : i * T + T + 1].tolist()  # mask of the targets
            # a two-exchange dialogue (two </s>) is one document
            assert batch.document_ids[r].tolist() == (doc_of[span] - doc_of[i * T]).tolist()
    assert not all(batch.loss_mask.all() for batch in take(loader, 3))


def test_too_little_data_and_bad_arguments(data_dir):
    with pytest.raises(ValueError, match="fewer than one sample"):
        PackedLoader(data_dir, seq_len=10**7)
    with pytest.raises(ValueError, match="rank"):
        PackedLoader(data_dir, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="not a prepared data folder"):
        PackedLoader(data_dir / "nowhere")
