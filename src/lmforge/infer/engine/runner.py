"""Model runner: turns a scheduled step into tensors, runs the model on the packed batch, samples in one batch.

Notation: S scheduled sequences, N new tokens in all, K sequences that sample this step (their chunk reaches
their last token), V vocabulary.

    chunks ──► tokens (1, N), positions (N,), PackedMetadata (slot mapping, per-sequence key slots)
           ──► model(tokens, positions, cache=PagedAttention(...), logits_index=last token of each of K)
           ──► logits (K, V) ──► sample: one SamplingBatch with per-request parameters ──► tokens (K,)

Only the K sampling rows go through the vocabulary projection (`logits_index`); a pre-fill chunk that stops
short of its sequence's end produces no logits at all. A step of decodes only (every chunk one token that
samples) takes the static-shape path of decode_graphs.py instead when `decode_path` is not "packed": the
same attention at padded shapes, replayed from a CUDA graph on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.profiler import record_function

from lmforge.infer.cache import cache_config
from lmforge.infer.engine.decode_graphs import DecodeAttention, DecodeGraphs
from lmforge.infer.engine.paged_attention import (
    PackedMetadata,
    PagedAttention,
    PagedImpl,
    PagedKVPool,
    build_metadata,
)
from lmforge.infer.engine.scheduler import ScheduledChunk
from lmforge.infer.engine.sequence import PENDING, Sequence
from lmforge.infer.engine.varlen import build_varlen
from lmforge.infer.sampling import SampleOutput, SamplingBatch, SamplingFlags, random_seed, sample, token_index
from lmforge.infer.transfer import to_device
from lmforge.models.transformer import Transformer

DecodePath = Literal["packed", "eager", "cuda_graph", "compile"]


class ModelRunner:
    """decode_path: how decode-only steps run: "packed" like any other step, "eager" or "cuda_graph" at static
    shapes (`DecodeGraphs`), or "compile": static shapes, the whole step (forward and sampling) compiled by
    Inductor and captured in CUDA graphs; None picks "cuda_graph" on CUDA without tensor parallelism, else
    "packed". The static-shape steps sample inside their graph (`run`).
    decode_attention: "sdpa", "fused" or "triton" for the static-shape steps (`DecodeGraphs`); None picks
    "triton" on CUDA (measured faster than "fused", which is faster than "sdpa": benchmarks/RESULTS.md, serving
    (a) and (b)), else "sdpa".
    impl: the packed steps' attention (paged_attention.py); None picks "varlen" (one flash call per layer) on
    CUDA in bf16 / fp16, else "padded"."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, impl: PagedImpl | None = None,
                 decode_path: DecodePath | None = None, decode_attention: DecodeAttention | None = None):
        param = next(model.parameters())
        self.model, self.device, self.dtype = model, param.device, param.dtype
        if impl is None:
            flash = self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16)
            impl = "varlen" if flash else "padded"
        if impl not in ("reference", "padded", "varlen"):
            raise ValueError(f"attention must be 'varlen', 'padded' or 'reference', got {impl!r}")
        self.config, self.block_size, self.impl = model.config, block_size, impl
        # cache_config: under tensor parallelism a rank's pool holds only its own kv heads
        self.pool = PagedKVPool(cache_config(model), num_blocks, block_size, self.device, self.dtype)
        if decode_path is None:
            # NOTE: not yet under tensor parallelism: capturing its all-reduces in CUDA graphs is untested
            single = getattr(model, "tp_degree", 1) == 1
            decode_path = "cuda_graph" if self.device.type == "cuda" and single else "packed"
        if decode_path not in ("packed", "eager", "cuda_graph", "compile"):
            raise ValueError(f"decode_path must be 'packed', 'eager', 'cuda_graph' or 'compile', got {decode_path!r}")
        if decode_path == "compile" and self.device.type != "cuda":
            raise ValueError(f"decode_path 'compile' needs a CUDA model, the model is on {self.device}")
        self.decode = None
        if decode_path != "packed" and impl != "reference":
            if decode_attention is None:
                decode_attention = "triton" if self.device.type == "cuda" else "sdpa"
            mode = "eager" if decode_path == "eager" else "cuda_graph"
            backend = "inductor" if decode_path == "compile" else None
            self.decode = DecodeGraphs(model, self.pool, self.config.sliding_window, mode, decode_attention,
                                       compile=backend)

    @torch.no_grad()
    def forward(self, chunks: list[ScheduledChunk], copies: list[tuple[int, int]] = (),
                feed: TokenFeed | None = None) -> Tensor:
        """Copy the blocks owed (copy-on-write), then compute every chunk's new tokens into the pool; logits
        (K, V) float32, one row per sampling sequence (`ScheduledChunk.sampling_seqs`), in order. Tokens that
        are still `PENDING` on the host are read from `feed` on the device."""
        self.pool.copy_blocks(list(copies))
        logits = self._forward(chunks, self._fed(chunks, feed))  # (sampling chunks, V)
        rows = [k for k, c in enumerate(c for c in chunks if c.samples) for _ in c.sampling_seqs]
        if len(rows) == logits.shape[0]:
            return logits
        return logits[to_device(torch.tensor(rows), logits.device)]  # a shared prompt's row, once for each fork

    @torch.no_grad()
    def run(self, chunks: list[ScheduledChunk], copies: list[tuple[int, int]], feed: TokenFeed | None,
            seqs: list[Sequence]) -> SampleOutput:
        """`forward`, then one token for each of `seqs` (the sampling sequences, in order). A step of decodes
        only, on the static-shape path, samples inside its graph: no logits leave it."""
        positions = [c.start for c in chunks]
        if self._decode_only(chunks) and not any(c.forks for c in chunks) and self.decode.fits(positions):
            self.pool.copy_blocks(list(copies))
            flags = SamplingFlags.of([s.sampling for s in seqs])
            V = self.config.vocab_size
            return self.decode.sample([c.seq.token_ids[c.start] for c in chunks], positions,
                                      [c.seq.block_table for c in chunks], self._fed(chunks, feed), flags,
                                      lambda batch: sampling_batch(seqs, V, self.device, feed, batch))
        logits = self.forward(chunks, copies, feed)
        with record_function("engine.sample"):
            return self.sample(seqs, logits, feed)

    def _decode_only(self, chunks: list[ScheduledChunk]) -> bool:
        return self.decode is not None and all(c.num_tokens == 1 and c.samples for c in chunks)

    def _fed(self, chunks: list[ScheduledChunk], feed: TokenFeed | None) -> tuple[Tensor, Tensor] | None:
        """(packed indices, ids) on the device of this step's tokens that the previous step sampled."""
        dst, src, offset = [], [], 0
        for c in chunks:
            if c.seq.output_ids and c.seq.output_ids[-1] == PENDING:
                # NOTE: a sequence whose last token is pending has just sampled it: it computes that token alone
                assert feed is not None and c.num_tokens == 1 and c.start == c.seq.num_tokens - 1
                dst.append(offset)
                src.append(feed.rows[id(c.seq)])
            offset += c.num_tokens
        if not dst:
            return None
        index = to_device(torch.tensor([dst, src]), self.device)  # (2, F)
        return index[0], feed.tokens.index_select(0, index[1])

    def _forward(self, chunks: list[ScheduledChunk], fed: tuple[Tensor, Tensor] | None) -> Tensor:
        if self._decode_only(chunks):
            logits = self.decode([c.seq.token_ids[c.start] for c in chunks], [c.start for c in chunks],
                                 [c.seq.block_table for c in chunks], fed)
            if logits is not None:
                return logits
        tokens = [max(t, 0) for c in chunks for t in c.seq.token_ids[c.start : c.start + c.num_tokens]]
        geometry = ([c.start for c in chunks], [c.num_tokens for c in chunks], [c.seq.block_table for c in chunks],
                    self.block_size, self.config.sliding_window, self.device)
        if self.impl == "varlen":
            positions, slot_mapping, varlen = build_varlen(*geometry)
            meta = PackedMetadata(positions, slot_mapping, groups=[], varlen=varlen)
        else:
            meta = build_metadata(*geometry)
        ends = torch.tensor([c.num_tokens for c in chunks]).cumsum(0) - 1  # (S,) packed index of each last token
        last = ends[torch.tensor([c.samples for c in chunks], dtype=torch.bool)]  # (K,)
        cache = PagedAttention(self.pool, meta, self.config.sliding_window, self.impl)
        host = torch.tensor(tokens + last.tolist())
        both = to_device(host, self.device)  # one copy: tokens (N,), then the logits index (K,)
        tok, index = both[: len(tokens)][None], both[len(tokens) :][None]  # (1, N), (1, K)
        if fed is not None:
            tok[0].index_copy_(0, *fed)
        logits = self.model(tok, meta.positions, cache=cache, logits_index=index)  # (1, K, V)
        return logits[0].float()

    def sample(self, seqs: list[Sequence], logits: Tensor, feed: TokenFeed | None = None) -> SampleOutput:
        """One token per sequence from logits (K, V), each with its own parameters, in one batch."""
        return sample(logits, sampling_batch(seqs, self.config.vocab_size, logits.device, feed))


@dataclass
class TokenFeed:
    """The ids sampled by the step still in flight (LLMEngine with overlap), left on the device: the sequences
    whose last output is `PENDING` on the host find theirs at `tokens[rows[id(seq)]]`."""

    tokens: Tensor  # (K,) long, on the device
    rows: dict[int, int]


def sampling_batch(seqs: list[Sequence], vocab_size: int, device, feed: TokenFeed | None = None,
                   batch: SamplingBatch | None = None) -> SamplingBatch:
    """A `SamplingBatch` for this step's sequences (or `batch`, a static one, loaded with them).

    NOTE: a sequence's noise (sampling.py) is a function of its seed and of how many tokens it has sampled,
    len(output_ids) (a `PENDING` one included): the same in any batch, after a preemption, and for the fork
    of a shared prompt. The penalties' output counts are rebuilt from its outputs each step (a `PENDING` one
    counted from `feed`, on the device).
    """
    params = [s.sampling for s in seqs]
    for s, p in zip(seqs, params):
        if s.sample_seed is None:
            s.sample_seed = p.seed if p.seed is not None else random_seed()
    seeds, counters = [s.sample_seed for s in seqs], [len(s.output_ids) for s in seqs]
    prompts = [s.prompt_ids for s in seqs]
    if batch is None:
        batch = SamplingBatch(params, prompts, vocab_size, device, seeds=seeds, counters=counters)
    else:
        batch.load(params, prompts, seeds, counters)
    if batch.output_counts is not None:
        rows, ids = token_index([[t for t in s.output_ids if t != PENDING] for s in seqs], device)
        pending = [(b, feed.rows[id(s)]) for b, s in enumerate(seqs) if s.output_ids and s.output_ids[-1] == PENDING]
        if pending:
            index = to_device(torch.tensor(pending).T, device)  # (2, F): batch rows, rows of feed.tokens
            rows, ids = torch.cat([rows, index[0]]), torch.cat([ids, feed.tokens[index[1]]])
        batch.output_counts.index_put_((rows, ids), torch.ones_like(ids), accumulate=True)
    return batch


__all__ = ["DecodePath", "ModelRunner", "TokenFeed", "sampling_batch"]
