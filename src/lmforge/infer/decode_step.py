"""One decode step (B tokens in, (B, V) logits or B sampled tokens out) in three speeds: eager, compiled, CUDA
graph.

At batch 1 a decode step reads every weight once for one token, so its floor is weight bytes / memory
bandwidth (about 4.5 ms for Llama-2-7B in bf16 on an H100). An eager step launches several hundred small
kernels (norms, rotary, cache writes) whose launch cost alone is of that order; a CUDA graph replays them all
with one launch. What makes the step capturable:

- static shapes: tokens and positions (B, 1), cache buffers preallocated (B, Hkv, S, D), logits (B, V);
- cache writes by `scatter_` with tensor indices, the mask from tensors (`ContiguousCache.decode`);
- no `.item()`, no `nonzero`, no Python branch on a tensor value anywhere in the step;
- the graph reads its inputs from fixed buffers: each call copies the new tokens / positions into them.

With a static `SamplingBatch` (`sampling`), sampling is part of the step: tokens in, the next tokens (and
log-probs) out, all in the compiled graph or CUDA graph. Its noise is counter-based (noise.py), so it gives
the tokens of eager sampling on the same logits; the batch's counters and output counts advance inside the
graph. The one host sync per token is reading the sampled ids, after the next step is queued (generate.py).

Kept across calls (`kept_decode_step`): compiling and capturing cost seconds, so `generate()` keeps the last
cache and step it built on the model and reuses them while the key stays (the batch size, the cache slots
rounded up to a multiple of `SLOT_QUANTUM`, the sampling flags); between calls the cache's positions are
reset and the sampling batch is loaded with the new requests' parameters.

Modes:
    "eager"       plain calls (CPU and CUDA; the reference the others are checked against)
    "compile"     torch.compile(fullgraph=True) with CUDA graphs (what mode="reduce-overhead" sets) and
                  coordinate-descent tuning: Inductor kernels + CUDA graphs
    "cuda_graph"  manual torch.cuda.CUDAGraph capture of the eager step (no compiler needed)
    "compile+cuda_graph"  torch.compile (default mode, fullgraph) captured manually in a CUDA graph
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lmforge.infer.cache import ContiguousCache, RollingCache, cache_config, make_cache
from lmforge.infer.sampling import SampleOutput, SamplingBatch, SamplingFlags, sample
from lmforge.models.transformer import Transformer

DecodeMode = Literal["eager", "compile", "cuda_graph", "compile+cuda_graph"]
SLOT_QUANTUM = 256  # kept contiguous caches hold a multiple of this many slots per row


def decode_forward(model: Transformer, cache: ContiguousCache | RollingCache, tokens: Tensor, positions: Tensor) -> Tensor:
    """tokens, positions (B, 1) -> logits (B, V) of the next token; writes the new k / v into `cache`."""
    return model(tokens, positions, cache=cache.decode(positions))[:, -1]  # (B, V)


class DecodeStep:
    """`step(tokens (B, 1), positions (B, 1)) -> logits (B, V)` for one model, cache and batch size; with a
    static `sampling` batch of B rows, `-> SampleOutput` of the next tokens (sampled from the first
    `sampling.vocab_size` logits).

    In the graph modes the results live in static buffers that the next call overwrites: use them (sample,
    copy) before calling again.
    """

    def __init__(self, model: Transformer, cache: ContiguousCache | RollingCache, mode: DecodeMode = "eager",
                 sampling: SamplingBatch | None = None):
        if mode not in ("eager", "compile", "cuda_graph", "compile+cuda_graph"):
            raise ValueError(f"decode mode must be eager, compile, cuda_graph or compile+cuda_graph, got {mode!r}")
        device = next(model.parameters()).device
        if mode != "eager" and mode != "compile" and device.type != "cuda":
            raise ValueError(f"decode mode {mode!r} needs a CUDA model, the model is on {device}")
        self.model, self.cache, self.mode, self.sampling = model, cache, mode, sampling
        self.graph: torch.cuda.CUDAGraph | None = None
        self.fn = self._eager
        if mode.startswith("compile"):
            # NOTE: the cache buffers (and the sampling batch's) are mutated in place every step; marked
            # static, CUDA graphs reuse their addresses instead of copying them in and (seeing a mutated
            # input) refusing to capture.
            for t in cache.buffers() + (sampling.tensors() if sampling is not None else []):
                torch._dynamo.mark_static_address(t)
            options = {}
            if device.type == "cuda":
                # NOTE: coordinate-descent tuning lets Inductor tune the batch-1 matrix-vector products it
                # lowers to reductions (the whole cost of a decode step); "triton.cudagraphs" is what
                # mode="reduce-overhead" sets (the two arguments are exclusive, so it is spelled out).
                options = {"coordinate_descent_tuning": True, "triton.cudagraphs": mode == "compile"}
            self.fn = torch.compile(self._eager, fullgraph=True, options=options or None)

    def _eager(self, tokens: Tensor, positions: Tensor) -> Tensor | SampleOutput:
        logits = decode_forward(self.model, self.cache, tokens, positions)
        return logits if self.sampling is None else sample(logits[:, : self.sampling.vocab_size], self.sampling)

    @torch.no_grad()
    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor | SampleOutput:
        if self.mode == "compile" and tokens.is_cuda:
            # a new step: the CUDA-graph outputs of the previous one (already sampled from) may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        if self.mode in ("eager", "compile"):
            return self.fn(tokens, positions)
        if self.graph is None:
            self._capture(tokens, positions)
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits

    def _capture(self, tokens: Tensor, positions: Tensor) -> None:
        """Warm up on a side stream, then record the step reading from static input buffers.

        Warm-up runs write this step's own k / v at its own positions; the replay that follows writes the
        same values again, so capturing changes nothing the sequence will see. They also sample, which
        advances the sampling batch's counters and counts: those are put back before the replay.
        """
        self.tokens, self.positions = tokens.clone(), positions.clone()
        state = self.sampling.state() if self.sampling is not None else None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # compile (if any) and cuBLAS workspace set-up happen here, not during capture
                self.fn(self.tokens, self.positions)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.fn(self.tokens, self.positions)  # (B, V), or the SampleOutput
        if state is not None:
            self.sampling.restore(state)


class _Kept:
    """The cache and step `kept_decode_step` built last for one model, and their shape key. A copy of the
    model starts without them (a cache, not state: CUDA graphs and compiled code do not copy)."""

    def __init__(self):
        self.key, self.cache, self.step = None, None, None

    def __deepcopy__(self, memo) -> "_Kept":
        return _Kept()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def kept_decode_step(
    model: Transformer, batch_size: int, max_len: int, kind: str, mode: DecodeMode, dtype: torch.dtype,
    flags: SamplingFlags | None = None, vocab_size: int | None = None,
) -> tuple[ContiguousCache | RollingCache, DecodeStep]:
    """A reset cache for `batch_size` rows of up to `max_len` positions and a `DecodeStep` on it, sampling
    inside the step with a static batch of these `flags` over the first `vocab_size` logits if flags are
    given (load it: `step.sampling.load(...)`). In the compiled and graph modes both are kept on the model
    and returned again while the key (mode, rows, cache layout and slots, dtype, sampling) stays, so compiles
    and captures happen once; a new key replaces them (one kept per model, so their memory is the last
    shape's). "eager" builds fresh ones, of exactly max_len slots.

    NOTE: the kept step holds the model's parameters and the cache at fixed addresses (the graphs read them
    there): keep the model where it is (no `.to()`), as for any captured step.
    """
    device, config = next(model.parameters()).device, cache_config(model)

    def sampling() -> SamplingBatch | None:
        return SamplingBatch.static(flags, batch_size, vocab_size, device) if flags is not None else None

    if mode == "eager":
        cache = make_cache(config, batch_size, max_len, kind=kind, device=device, dtype=dtype)
        return cache, DecodeStep(model, cache, mode, sampling())
    W = config.sliding_window
    if kind == "auto":
        kind = "rolling" if W is not None and max_len > W else "contiguous"
    slots = W if kind == "rolling" else -(-max_len // SLOT_QUANTUM) * SLOT_QUANTUM
    key = (mode, batch_size, kind, slots, dtype, flags, vocab_size)
    kept = model.__dict__.setdefault("_lmforge_kept_decode", _Kept())
    if kept.key != key:
        kept.key = kept.cache = kept.step = None  # the old cache and graphs go before the new ones are made
        cache = make_cache(config, batch_size, slots, kind=kind, device=device, dtype=dtype)
        kept.key, kept.cache, kept.step = key, cache, DecodeStep(model, cache, mode, sampling())
    kept.cache.reset()
    return kept.cache, kept.step


__all__ = ["DecodeMode", "DecodeStep", "decode_forward", "kept_decode_step"]
