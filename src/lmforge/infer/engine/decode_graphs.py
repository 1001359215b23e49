"""Decode-only engine steps at static shapes, replayed from CUDA graphs.

Most steps of a busy server are pure decode: every scheduled sequence adds one token. Such a step has the
shape of a batch decode -- B queries, each over its own sequence's keys -- except that B and the key counts
change every step. Eager, its GPU cost is mostly kernel launches (about 15 per layer) rather than memory
traffic. Padded to static shapes, the step is captured once per shape in a CUDA graph and replayed with one
launch, reading its inputs from fixed buffers that the host fills before each replay:

    rows  B -> Bb, the next batch bucket  (1, 2, 4, 8, ..., max_num_seqs)
    keys  K = max over rows of the keys a row reads -> Kb, the next power of two >= 64

    host -> device, per step:  tokens (1, Bb), positions (Bb,), lo (Bb,), tables (Bb, Kb / bs + 1)

Row b reads keys at positions lo_b .. p_b (lo_b = max(0, p_b - W + 1) with a window W, else 0), which lie in
blocks lo_b // bs .. p_b // bs of its block table: `tables` holds those entries from lo_b // bs on (at most
Kb / bs + 1 of them), so the host sends a few entries per row rather than Kb slots. Inside the graph:

    key_pos[b, i]   = lo_b + i if lo_b + i <= p_b else -1                  (Bb, Kb); -1 is masked
    key_slots[b, i] = tables[b, (lo_b + i) // bs - lo_b // bs] * bs + (lo_b + i) % bs   (null slot if masked)
    slot_mapping[b] = the same formula at p_b: where the new k / v go

Worked example, block size 4, no window, two rows: row 0 decodes position 5 (table [7, 2]), row 1 position
2 (table [4]); buckets Bb = 2, Kb = 64, so tables is (2, 17): [[7, 2, null...], [4, null...]].
slot_mapping = [2*4 + 1, 4*4 + 2] = [9, 18]; key_pos row 0 = [0..5, then -1 x 58]; key_slots row 0 =
[28, 29, 30, 31, 8, 9, then the null slot x 58]. A padding row (Bb > B) decodes position 0 into the pool's
null block (`PagedKVPool.null_slot`, a spare block the block manager never hands out), reading one key
there, so its softmax is finite and nothing real is written.

The attention is the engine's own `PagedAttention` ("padded") with a single group of all rows, so this path
computes the same function as the packed one (tests/infer/engine/test_engine_decode_graphs.py); only
the shapes are fixed. Graphs share one memory pool and are captured lazily, the first time a shape occurs;
shapes with Bb * Kb above `max_keys` (the gathered keys of one layer would be large) stay on the packed path.

Sampling inside the graph (`sample`): a decode step's tokens come straight out of its graph. Each bucket has a
static `SamplingBatch` per set of sampling flags (sampling.py), loaded with the rows' parameters, seeds and
counters before the replay (padding rows greedy); one graph per (Bb, Kb, flags). With counter-based noise
(noise.py) the tokens are those of eager sampling on the same logits.

Modes: "eager" runs the static-shape step without a graph (the CPU tests' way to check the padding);
"cuda_graph" captures and replays; `compile` (decode_path "compile") first compiles the step's forward with
Inductor, dynamic in Bb and Kb (one compile for every bucket), and `sample` (one compile per set of flags),
so that the elementwise work between the matrix products fuses; the compiled code is then captured.
Attention: "sdpa" gathers each row's keys out of the pool and calls SDPA; "fused" calls
`gathered_decode_attention`, compiled with dynamic shapes on CUDA (one compile for every bucket; inside the
step's compile under `compile`), whose kernels read the keys in place (see its NOTE); "triton" calls our own
paged kernel (triton_decode.py), which reads each key once, straight from its block.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lmforge.infer.engine.paged_attention import (
    AttentionGroup,
    PackedMetadata,
    PagedAttention,
    PagedKVPool,
    gathered_decode_attention,
)
from lmforge.infer.engine.triton_decode import kernel as triton_kernel, paged_decode_attention
from lmforge.infer.sampling import SampleOutput, SamplingBatch, SamplingFlags, sample
from lmforge.infer.transfer import copy_to_device
from lmforge.models.transformer import Transformer

DecodePathMode = Literal["eager", "cuda_graph"]
DecodeAttention = Literal["sdpa", "fused", "triton"]

MIN_KEYS = 64


def batch_bucket(n: int) -> int:
    """Next power of two >= n: 1, 2, 4, 8, ..."""
    return 1 << (n - 1).bit_length()


def key_bucket(k: int) -> int:
    """Next power of two >= max(k, MIN_KEYS)."""
    return max(MIN_KEYS, 1 << (k - 1).bit_length())


class _Shape:
    """Static input buffers of one (Bb, Kb) shape, and its graphs once captured: one giving logits, and one per
    set of sampling flags giving sampled tokens."""

    def __init__(self, Bb: int, Kb: int, block_size: int, device):
        self.tokens = torch.zeros(1, Bb, dtype=torch.long, device=device)
        self.positions = torch.zeros(Bb, dtype=torch.long, device=device)
        self.lo = torch.zeros(Bb, dtype=torch.long, device=device)
        self.tables = torch.zeros(Bb, Kb // block_size + 1, dtype=torch.long, device=device)
        self.key_offsets = torch.arange(Kb, device=device)  # (Kb,): the key count is a tensor size (dynamic)
        self.keys = Kb
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None  # (1, Bb, V), the graph's output buffer
        self.sampling_graphs: dict[SamplingFlags, tuple[torch.cuda.CUDAGraph, SampleOutput]] = {}

    def inputs(self) -> tuple[Tensor, ...]:
        return self.tokens, self.positions, self.lo, self.tables, self.key_offsets


class DecodeGraphs:
    """`__call__(tokens, positions, tables) -> logits (B, V)` for a decode-only step, or None when its shape
    is too large for this path (the caller then runs the packed path); `sample(...)`: the sampled tokens,
    sampling inside the same graph (`fits` says whether a step can take this path).

    compile: a torch.compile backend (a name: "inductor" on CUDA, or a callable) for the step's forward
    (dynamic shapes: one compile serves every bucket) and for `sample` (one per set of flags), both then
    captured in the CUDA graphs.
    """

    def __init__(self, model: Transformer, pool: PagedKVPool, window: int | None, mode: DecodePathMode = "eager",
                 attention: DecodeAttention = "sdpa", max_keys: int = 1 << 18, compile=None):
        if mode not in ("eager", "cuda_graph"):
            raise ValueError(f"decode graph mode must be 'eager' or 'cuda_graph', got {mode!r}")
        if attention not in ("sdpa", "fused", "triton"):
            raise ValueError(f"decode attention must be 'sdpa', 'fused' or 'triton', got {attention!r}")
        device = next(model.parameters()).device
        if mode == "cuda_graph" and device.type != "cuda":
            raise ValueError(f"decode mode 'cuda_graph' needs a CUDA model, the model is on {device}")
        self.model, self.pool, self.window, self.mode, self.max_keys = model, pool, window, mode, max_keys
        self.device = device
        self.shapes: dict[tuple[int, int], _Shape] = {}
        self.batches: dict[tuple[int, SamplingFlags], SamplingBatch] = {}  # static sampling batches
        self.steps = 0  # decode steps this path ran (tests check that it did)
        self.graph_pool = torch.cuda.graph_pool_handle() if mode == "cuda_graph" else None
        self.kernel = None
        if attention == "fused":
            alone = device.type == "cuda" and compile is None  # (under `compile` the whole step is compiled)
            self.kernel = torch.compile(gathered_decode_attention, dynamic=True) if alone else gathered_decode_attention
        elif attention == "triton":
            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("decode attention 'triton' needs a CUDA model (or TRITON_INTERPRET=1 on the CPU)")
            triton_kernel()  # built before anything is traced (its NOTE)
            self.kernel = paged_decode_attention
        self.forward_fn, self.sample_fn, self.min_rows = self._forward, sample, 1
        if compile is not None:
            # NOTE: at least 2 rows: compiled with dynamic shapes, a size-1 batch would be specialised (a second
            # compile of the whole model); one padding row costs nothing in a step that reads every weight.
            opts = dict(dynamic=True, fullgraph=True, backend=compile)
            self.forward_fn, self.sample_fn = torch.compile(self._forward, **opts), torch.compile(sample, **opts)
            self.min_rows = 2

    def fits(self, positions: list[int]) -> bool:
        return self._buckets(positions) is not None

    def _buckets(self, positions: list[int]) -> tuple[int, int, list[int]] | None:
        """(Bb, Kb, lo) of a step, or None when its gathered keys would be too large for this path."""
        W = self.window
        lo = [max(0, p - W + 1) if W is not None else 0 for p in positions]  # first key a row reads
        Bb = batch_bucket(max(len(positions), self.min_rows))
        Kb = key_bucket(max(p + 1 - a for p, a in zip(positions, lo)))
        return (Bb, Kb, lo) if Bb * Kb <= self.max_keys else None

    def _prepare(self, tokens, positions, tables, fed) -> _Shape | None:
        buckets = self._buckets(positions)
        if buckets is None:
            return None
        Bb, Kb, lo = buckets
        shape = self.shapes.get((Bb, Kb))
        if shape is None:
            shape = self.shapes[(Bb, Kb)] = _Shape(Bb, Kb, self.pool.block_size, self.device)
        self._fill(shape, tokens, positions, tables, lo)
        if fed is not None:
            shape.tokens[0].index_copy_(0, *fed)
        self.steps += 1
        return shape

    @torch.no_grad()
    def __call__(self, tokens: list[int], positions: list[int], tables: list[list[int]],
                 fed: tuple[Tensor, Tensor] | None = None) -> Tensor | None:
        """One new token per row: tokens[b] at positions[b] of the sequence with block table tables[b];
        fed = (rows, ids) on the device: tokens of those rows that only the device knows (runner.py)."""
        shape = self._prepare(tokens, positions, tables, fed)
        if shape is None:
            return None
        B = len(tokens)
        if self.mode == "cuda_graph" and shape.graph is None:
            self._try_capture(shape)  # (on failure, eager steps from now on)
        if self.mode == "eager":
            return self._run(shape)[0, :B].float()
        shape.graph.replay()
        # a copy even in float32: the graph's output buffer is overwritten by the next replay
        return shape.logits[0, :B].to(torch.float32, copy=True)

    @torch.no_grad()
    def sample(self, tokens: list[int], positions: list[int], tables: list[list[int]],
               fed: tuple[Tensor, Tensor] | None, flags: SamplingFlags,
               load: Callable[[SamplingBatch], object]) -> SampleOutput:
        """As `__call__`, then sample inside the same graph: `load(batch)` fills the static sampling batch of
        this bucket and flags with the rows' parameters (runner.py: sampling_batch). The step must `fit`."""
        shape = self._prepare(tokens, positions, tables, fed)
        B, Bb = len(tokens), shape.tokens.shape[1]
        batch = self.batches.get((Bb, flags))
        if batch is None:
            V = self.model.config.vocab_size
            batch = self.batches[(Bb, flags)] = SamplingBatch.static(flags, Bb, V, self.device)
        load(batch)
        if self.mode == "cuda_graph" and flags not in shape.sampling_graphs:
            self._try_capture(shape, batch)
            load(batch)  # warm-up ran `sample`, which advanced the batch's counters
        if self.mode == "eager":
            out = self._run(shape, batch)
        else:
            graph, out = shape.sampling_graphs[flags]
            graph.replay()
        # copies: the graph's outputs are overwritten by its next replay
        return SampleOutput(*(t[:B].clone() if t is not None else None for t in out))

    def _fill(self, shape: _Shape, tokens, positions, tables, lo) -> None:
        """Host-side padded inputs (module docstring), copied into the shape's buffers."""
        Bb, width = shape.tables.shape
        B, bs, null_block = len(tokens), self.pool.block_size, self.pool.num_blocks
        rel = np.full((Bb, width), null_block, dtype=np.int64)  # (Bb, Kb / bs + 1) block entries from lo // bs
        for b, (table, a, p) in enumerate(zip(tables, lo, positions)):
            needed = table[a // bs : p // bs + 1]
            assert len(needed) == p // bs - a // bs + 1, "position without a block: schedule the step first"
            rel[b, : len(needed)] = needed
        assert (rel >= 0).all(), "a key lies in a freed block"
        host = np.zeros((3, Bb), dtype=np.int64)  # tokens, positions, lo; padding rows: token 0 at position 0
        host[:, :B] = np.maximum(tokens, 0), positions, lo  # (a token known only on the device is fed after)
        host_t, rel_t = torch.from_numpy(host), torch.from_numpy(rel)
        copy_to_device([(shape.tables, rel_t), (shape.tokens[0], host_t[0]), (shape.positions, host_t[1]),
                        (shape.lo, host_t[2])])

    def _run(self, shape: _Shape, batch: SamplingBatch | None = None):
        """The static-shape step: (1, Bb, V) logits, or with `batch` the `SampleOutput` of its Bb rows."""
        logits = self.forward_fn(*shape.inputs())
        return logits if batch is None else self.sample_fn(logits[0], batch)

    def _forward(self, tokens: Tensor, pos: Tensor, lo: Tensor, tables: Tensor, key_offsets: Tensor) -> Tensor:
        """tokens (1, Bb), positions / lo (Bb,), tables (Bb, Kb / bs + 1), key_offsets (Kb,) -> logits (1, Bb, V);
        tensor ops only (capturable, compilable with dynamic Bb and Kb)."""
        bs, null = self.pool.block_size, self.pool.null_slot
        first = (lo // bs)[:, None]  # (Bb, 1) block index of tables[:, 0]

        def slots(p: Tensor) -> Tensor:  # positions (Bb, k) -> pool slots, through the row's tables
            return tables.gather(1, p // bs - first) * bs + p % bs

        key_pos = lo[:, None] + key_offsets  # (Bb, Kb)
        valid = key_pos <= pos[:, None]
        key_slots = torch.where(valid, slots(key_pos.clamp(max=pos[:, None])), null)
        key_pos = torch.where(valid, key_pos, -1)
        rows = torch.arange(pos.shape[0], device=pos.device)
        group = AttentionGroup(rows[:, None], pos[:, None], key_slots, key_pos, src=rows, dst=rows)
        meta = PackedMetadata(pos, slots(pos[:, None])[:, 0], [group])
        cache = PagedAttention(self.pool, meta, self.window, "padded", decode_kernel=self.kernel)
        return self.model(tokens, pos, cache=cache)

    def _try_capture(self, shape: _Shape, batch: SamplingBatch | None = None) -> bool:
        """Capture the shape's graph (for `batch`'s flags if given); on failure fall back to eager steps."""
        try:
            self._capture(shape) if batch is None else self._capture(shape, batch)
            return True
        except Exception as e:  # NOTE: a capture failure costs speed, never the request
            warnings.warn(f"CUDA graph capture of the decode step failed ({type(e).__name__}: {e}); decode "
                          "steps run eagerly at static shapes with SDPA attention from now on", RuntimeWarning,
                          stacklevel=3)
            # (the compiled attention or the compiled step may be what failed)
            self.mode, self.kernel, self.forward_fn, self.sample_fn = "eager", None, self._forward, sample
            return False

    def _capture(self, shape: _Shape, batch: SamplingBatch | None = None) -> None:
        """Warm up on a side stream, then record. Warm-up and capture write this step's own k / v at its own
        slots, which the replay right after writes again with the same values."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles, cuBLAS / SDPA workspace set-up happen here, not during capture
                self._run(shape, batch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            out = self._run(shape, batch)
        if batch is None:
            shape.graph, shape.logits = graph, out
        else:
            shape.sampling_graphs[batch.flags] = (graph, out)


__all__ = ["DecodeAttention", "DecodeGraphs", "DecodePathMode", "batch_bucket", "key_bucket"]
