"""The static-shape decode path (decode_graphs.py) computes what the packed path computes: teacher-forced
logits equal the model's own without a cache (<= 1e-5), through batch padding (padding rows in the null
block), key padding across buckets, sliding-window models whose old blocks are freed, and MoE. The CUDA-graph
mode replays the same step (test_engine_gpu.py runs it on CUDA)."""

import pytest
import torch

from engine_helpers import assert_same_outputs, forced_logits, mixed_workload, random_seq, serve
from infer_helpers import assert_logits_close, full_logits, tiny_model
from lmforge.infer.engine import LLMEngine
from lmforge.infer.engine.decode_graphs import DecodeGraphs, batch_bucket, key_bucket
from lmforge.infer.engine.paged_attention import gathered_decode_attention
from lmforge.models.attention import reference_attention


def _engine(model, **kw):
    kw = {"block_size": 4, "num_blocks": 256, "max_num_batched_tokens": 16, "max_num_seqs": 8,
          "check_invariants": True, "decode_path": "eager", **kw}
    return LLMEngine(model, **kw)


def test_gathered_decode_attention_equals_reference_attention():
    """GQA (H = 4, Hkv = 2), rows with different allowed keys, keys read from scattered pool slots."""
    torch.manual_seed(0)
    G, H, Hkv, D, K, S = 3, 4, 2, 8, 6, 40
    q, kp, vp = torch.randn(G, H, D), torch.randn(S, Hkv, D), torch.randn(S, Hkv, D)
    slots = torch.randint(0, S, (G, K))
    allowed = torch.rand(G, K) < 0.6
    allowed[:, 0] = True
    ours = gathered_decode_attention(q, kp, vp, slots, allowed)
    keys, values = kp[slots].permute(0, 2, 1, 3), vp[slots].permute(0, 2, 1, 3)  # (G, Hkv, K, D)
    theirs = reference_attention(q[:, :, None], keys, values, allowed[:, None, None])[:, :, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 64)] == [1, 2, 4, 8, 8, 16, 64]
    assert [key_bucket(k) for k in (1, 64, 65, 200, 4096)] == [64, 64, 128, 256, 4096]


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-swa", "tiny-moe"])
def test_static_decode_steps_equal_the_model(preset, attention):
    """7 requests (batch bucket 8: one padding row) of 70 to 88 tokens with prompts of 1 to 29, so that the
    longest-prompted rows cross from the 64-key bucket to the 128-key one while the others are still below."""
    model = tiny_model(preset)
    g = torch.Generator().manual_seed(3)
    prompts = [int(torch.randint(1, 30, (1,), generator=g)) for _ in range(7)]
    seqs = [random_seq(70 + 3 * b, 40 + b) for b in range(7)]
    engine = _engine(model, decode_attention=attention)
    ours = forced_logits(engine, seqs, prompts)
    shapes = engine.runner.decode.shapes
    assert engine.runner.decode.steps > 30, engine.runner.decode.steps
    # a window model's rows read at most W = 8 keys: always the 64-key bucket
    assert {(8, 64), (8, 128)} <= shapes.keys() if preset != "tiny-swa" else {k for _, k in shapes} == {64}, shapes
    for seq, P, logits in zip(seqs, prompts, ours):
        assert_logits_close(logits, full_logits(model, seq)[P - 1 : -1])


def test_sliding_window_long_generation_reads_only_live_blocks():
    """W = 8: 200 decode steps past freed blocks; a row never reads more than the window (key bucket 64)."""
    model = tiny_model("tiny-swa")
    seqs = [random_seq(220, 9), random_seq(150, 10)]
    engine = _engine(model)
    ours = forced_logits(engine, seqs, [20, 5])
    assert engine.runner.decode.steps > 100 and set(engine.runner.decode.shapes) <= {(1, 64), (2, 64)}
    for seq, P, logits in zip(seqs, [20, 5], ours):
        assert_logits_close(logits, full_logits(model, seq)[P - 1 : -1])


def test_padding_rows_write_only_the_null_block():
    """After a run with padding rows, every pool slot the block manager may hand out holds only keys the
    packed path would have written: compare the pools of a static-path engine and a packed-path engine."""
    model = tiny_model("tiny")
    seqs, prompts = [random_seq(40, 70 + b) for b in range(3)], [10, 4, 7]  # 3 rows: bucket 4, one padding row
    static, packed = _engine(model), _engine(model, decode_path="packed")
    forced_logits(static, seqs, prompts)
    forced_logits(packed, seqs, prompts)
    assert static.runner.decode.steps > 0 and packed.runner.decode is None
    end = static.runner.pool.null_slot
    for layer in range(model.config.n_layers):
        for ours, theirs in ((static.runner.pool.k[layer][:end], packed.runner.pool.k[layer][:end]),
                             (static.runner.pool.v[layer][:end], packed.runner.pool.v[layer][:end])):
            # matmuls of other batch shapes round differently (~1e-7 relative); a stray padding write would
            # put a whole unrelated key (O(max |k|)) into a slot
            assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_shapes_over_the_key_budget_fall_back_to_the_packed_path():
    model = tiny_model("tiny")
    seqs, prompts = [random_seq(90, 80 + b) for b in range(2)], [3, 8]
    engine = _engine(model)
    engine.runner.decode.max_keys = 2 * 64  # 2 rows x 64 keys: the 128-key bucket no longer fits
    ours = forced_logits(engine, seqs, prompts)
    # both rows pass 64 keys together (to 90): those steps ran packed; one row alone fits again
    assert set(engine.runner.decode.shapes) == {(2, 64), (1, 128)}
    for seq, P, logits in zip(seqs, prompts, ours):
        assert_logits_close(logits, full_logits(model, seq)[P - 1 : -1])


def test_cuda_graph_mode_needs_cuda():
    model = tiny_model("tiny")
    with pytest.raises(ValueError, match="needs a CUDA model"):
        _engine(model, decode_path="cuda_graph")
    with pytest.raises(ValueError, match="decode_path must be"):
        _engine(model, decode_path="graphs")
    with pytest.raises(ValueError, match="attention must be 'varlen', 'padded' or 'reference'"):
        _engine(model, attention="flash")  # refused when the engine is built, not at its first step
    assert DecodeGraphs  # imported for the module docstring's reader: the class under test


def test_a_position_without_a_block_is_refused():
    model = tiny_model("tiny")
    engine = _engine(model)
    decode = engine.runner.decode
    with pytest.raises(AssertionError, match="position without a block"):
        decode([1], [8], [[0, 1]])  # block size 4: position 8 needs a third block
    with pytest.raises(AssertionError, match="freed block"):
        decode([1], [5], [[-1, 1]])  # position 0..3 in a freed block, no window to excuse it


def test_a_failed_graph_capture_falls_back_to_eager_steps(monkeypatch):
    """If capturing fails (a kernel that cannot be captured, say), the request still gets the model's logits
    and later steps run eagerly at static shapes, with SDPA rather than the fused attention (which may be what
    failed to capture)."""
    model = tiny_model("tiny")
    engine = _engine(model, decode_attention="fused")
    decode = engine.runner.decode
    assert decode.kernel is not None
    decode.mode = "cuda_graph"  # as on a GPU; capturing is what fails here

    def no_capture(shape):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decode, "_capture", no_capture)
    seqs, prompts = [random_seq(30, 90 + b) for b in range(3)], [5, 9, 2]
    with pytest.warns(RuntimeWarning, match="CUDA graph capture of the decode step failed"):
        ours = forced_logits(engine, seqs, prompts)
    assert decode.mode == "eager" and decode.kernel is None and decode.steps > 10
    for seq, P, logits in zip(seqs, prompts, ours):
        assert_logits_close(logits, full_logits(model, seq)[P - 1 : -1])


def _graph_sampling_runs(model, decode, num_blocks=24, **kw):
    """The mixed workload (engine_helpers.py) through an engine whose decode steps take `decode`'s path, and
    through a packed-path engine that samples the logits eagerly."""
    reqs = mixed_workload()
    eos = serve(_engine(model, decode_path="packed"), reqs)["r0"][0][3]
    kw = {"num_blocks": num_blocks, "eos_id": eos, "watermark_blocks": 0, **kw}
    static, packed = _engine(model, decode_path="eager", **kw), _engine(model, decode_path="packed", **kw)
    if decode is not None:
        static.runner.decode = decode(static)
    ours, theirs = serve(static, reqs, abort=("r8", 4)), serve(packed, reqs, abort=("r8", 4))
    assert static.runner.decode.steps > 20 and static.counters.preemptions > 0
    return static, ours, theirs


@pytest.mark.parametrize("overlap", [False, True])
def test_sampling_inside_the_static_step_gives_the_packed_paths_tokens(overlap):
    """Decode steps sample inside the static-shape step (a static sampling batch per bucket and flags, padding
    rows greedy): tokens, finish reasons and log-probs of the whole workload equal the packed path's, which
    samples its logits eagerly."""
    static, ours, theirs = _graph_sampling_runs(tiny_model("tiny"), None, overlap=overlap)
    assert static.runner.decode.batches  # the static batches were used
    assert_same_outputs(ours, theirs)


@pytest.mark.slow
def test_the_whole_static_step_traces_as_one_dynamic_graph():
    """decode_path="compile" compiles the step's forward (dynamic shapes, one compile for every bucket) and
    `sample` with Inductor on the GPU. Here the same functions are traced whole (fullgraph, dynamic) by the
    aot_eager backend: no graph break, one forward graph for every bucket, and the packed path's outputs."""
    torch._dynamo.reset()
    model = tiny_model("tiny-swa")
    graphs = []

    def counting(gm, example_inputs):  # aot_eager, counting the graphs it is given
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def compiled(engine):
        runner = engine.runner
        return DecodeGraphs(model, runner.pool, model.config.sliding_window, "eager", "fused", compile=counting)

    static, ours, theirs = _graph_sampling_runs(model, compiled, num_blocks=18)
    assert_same_outputs(ours, theirs)
    decode = static.runner.decode
    assert len({Bb for Bb, _ in decode.shapes}) > 1 and min(Bb for Bb, _ in decode.shapes) >= 2
    forward = [g for g in graphs if "embedding" in g.code]  # the model's forward, not `sample`
    assert len(forward) == 1 and 1 <= len(graphs) - 1 <= len({f for _, f in decode.batches})  # 1 per flags at most
