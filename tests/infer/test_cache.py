"""Caches against full recomputation: teacher-forced logits within 1e-5, on tiny random models (CPU, float32)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infer_helpers import assert_logits_close, cached_logits, full_logits, tiny_model
from lmforge.infer.cache import ContiguousCache, RollingCache, make_cache
from lmforge.infer.decode_step import DecodeStep, decode_forward


def _random_seq(n, seed, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_cached_decoding_equals_full_recomputation(preset):
    model = tiny_model(preset)
    seq = _random_seq(40, 0)
    (ours,), _ = cached_logits(model, [seq], [5], chunk=5, kind="contiguous")
    assert_logits_close(ours, full_logits(model, seq))


@pytest.mark.parametrize("chunk", [1, 4, 7, 30])
def test_chunked_prefill_equals_unchunked(chunk):
    model = tiny_model("tiny")
    seq = _random_seq(34, 1)
    (whole,), _ = cached_logits(model, [seq], [30], chunk=30, kind="contiguous")
    (chunked,), _ = cached_logits(model, [seq], [30], chunk=chunk, kind="contiguous")
    assert_logits_close(chunked, whole)
    assert_logits_close(whole, full_logits(model, seq))


@pytest.mark.parametrize("kind", ["contiguous", "rolling"])
def test_mixed_length_batch_equals_each_prompt_alone(kind):
    model = tiny_model("tiny-swa")  # W = 8: the rolling buffer wraps within these prompts
    seqs = [_random_seq(n, 10 + n) for n in (9, 23, 14)]
    prompt_lens = [len(s) - 6 for s in seqs]
    batched, _ = cached_logits(model, seqs, prompt_lens, chunk=5, kind=kind)
    for seq, p, ours in zip(seqs, prompt_lens, batched):
        (alone,), _ = cached_logits(model, [seq], [p], chunk=5, kind=kind)
        assert_logits_close(ours, alone)
        assert_logits_close(ours, full_logits(model, seq))


def test_window_matters_so_the_rolling_tests_can_fail():
    """Past W the sliding-window model differs from the same weights without a window by far more than 1e-5,
    so a rolling buffer that kept too many or too few keys would fail the tests below."""
    swa = tiny_model("tiny-swa")
    seq = _random_seq(30, 2)
    dense = type(swa)(swa.config.__class__(**{**swa.config.__dict__, "sliding_window": None})).eval()
    dense.load_state_dict(swa.state_dict())
    a, b = full_logits(swa, seq), full_logits(dense, seq)
    W = swa.config.sliding_window
    assert_logits_close(a[:W], b[:W])
    assert (a[W:] - b[W:]).abs().amax(dim=-1).min() > 1e-2


@pytest.mark.parametrize("chunk", [3, 8, 13])  # smaller than, equal to and larger than W = 8
def test_rolling_buffer_at_every_wrap_offset(chunk):
    model = tiny_model("tiny-swa")
    W = model.config.sliding_window
    seq = _random_seq(3 * W + 1, 3)
    reference = full_logits(model, seq)
    for prompt_len in range(1, 2 * W + 1):  # the pre-fill ends at every offset mod W, twice
        (ours,), cache = cached_logits(model, [seq], [prompt_len], chunk=chunk, kind="rolling")
        assert isinstance(cache, RollingCache)
        assert_logits_close(ours, reference)


@settings(max_examples=25, deadline=None)
@given(
    W=st.integers(1, 6),
    prompt_lens=st.lists(st.integers(1, 20), min_size=1, max_size=3),
    n_steps=st.integers(0, 12),
    chunk=st.integers(1, 14),
    seed=st.integers(0, 2**16),
)
def test_rolling_buffer_equals_sliding_window_attention(W, prompt_lens, n_steps, chunk, seed):
    """Property: any window, batch of prompt lengths, chunk size (below, at and above W) and decode length."""
    model = tiny_model("tiny-swa", sliding_window=W)
    seqs = [_random_seq(p + n_steps, seed + i) for i, p in enumerate(prompt_lens)]
    ours, cache = cached_logits(model, seqs, prompt_lens, chunk=chunk, kind="rolling")
    assert cache.k[0].shape[2] == W
    for seq, row in zip(seqs, ours):
        assert_logits_close(row, full_logits(model, seq))


def test_rolling_buffer_never_holds_more_than_w_positions():
    model = tiny_model("tiny-swa", max_seq_len=32)
    W = model.config.sliding_window
    cache = make_cache(model.config, 2, 100)
    assert isinstance(cache, RollingCache)
    cfg = model.config
    assert all(k.shape == (2, cfg.n_kv_heads, W, cfg.head_dim) for k in cache.k + cache.v)
    assert cache.nbytes == make_cache(model.config, 2, 10_000).nbytes  # independent of the length
    torch.manual_seed(0)
    tokens = torch.randint(0, 512, (2, 1))
    prompt = torch.tensor([[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]])
    model(torch.zeros(2, 5, dtype=torch.long), prompt, cache=cache.prefill(prompt))
    pos = torch.tensor([[3], [5]])
    for _ in range(60):  # far past max_seq_len (32)
        model(tokens, pos, cache=cache.decode(pos))
        held = cache.slot_pos
        assert ((held >= 0).sum(dim=1) <= W).all()
        # exactly the newest min(W, length) positions of each row
        for b in range(2):
            newest = set(range(max(0, pos[b, 0].item() - W + 1), pos[b, 0].item() + 1))
            assert set(held[b][held[b] >= 0].tolist()) == newest
        pos = pos + 1


def test_make_cache_picks_the_smaller_layout():
    swa = tiny_model("tiny-swa").config  # W = 8
    assert isinstance(make_cache(swa, 1, 8), ContiguousCache)
    assert isinstance(make_cache(swa, 1, 9), RollingCache)
    assert isinstance(make_cache(tiny_model("tiny").config, 1, 1000), ContiguousCache)
    with pytest.raises(ValueError, match="sliding-window"):
        make_cache(tiny_model("tiny").config, 1, 10, kind="rolling")


@pytest.mark.parametrize("kind", ["contiguous", "rolling"])
def test_reference_and_sdpa_attention_agree_inside_the_cache(kind):
    model = tiny_model("tiny-swa")
    seqs = [_random_seq(n, 20 + n) for n in (12, 25)]
    sdpa, _ = cached_logits(model, seqs, [6, 19], chunk=4, kind=kind, attention="sdpa")
    ref, _ = cached_logits(model, seqs, [6, 19], chunk=4, kind=kind, attention="reference")
    for a, b in zip(sdpa, ref):
        assert_logits_close(a, b)


@pytest.mark.parametrize("preset,kind", [("tiny", "contiguous"), ("tiny-swa", "rolling")])
def test_decode_step_traces_as_one_graph(preset, kind):
    """fullgraph=True fails on any graph break: a host sync, a data-dependent branch or shape in the step.
    aot_eager runs the traced graph without Inductor, so this stays fast on the CPU.
    (MoE is left to tests/infer/test_gpu_decode.py: tracing torch._grouped_mm wants bf16 CUDA inputs.)"""
    torch._dynamo.reset()
    model = tiny_model(preset)
    seq = _random_seq(20, 4)
    caches = [make_cache(model.config, 1, 32, kind=kind) for _ in range(2)]
    prompt = torch.tensor([seq[:10]])
    pos = torch.arange(10)[None]
    with torch.no_grad():
        for cache in caches:
            model(prompt, pos, cache=cache.prefill(pos))
        compiled = torch.compile(decode_forward, backend="aot_eager", fullgraph=True)
        step = DecodeStep(model, caches[1], "eager")
        for t in range(10, 20):
            tok, p = torch.tensor([[seq[t]]]), torch.tensor([[t]])
            assert_logits_close(compiled(model, caches[0], tok, p), step(tok, p))


def test_decode_positions_must_match_the_batch():
    cache = make_cache(tiny_model("tiny").config, 2, 16)
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        cache.decode(torch.tensor([[3]]))


def test_decode_step_modes_are_checked():
    model = tiny_model("tiny")
    cache = make_cache(model.config, 1, 8)
    with pytest.raises(ValueError, match="needs a CUDA model"):
        DecodeStep(model, cache, "cuda_graph")
    with pytest.raises(ValueError, match="decode mode must be"):
        DecodeStep(model, cache, "fast")
