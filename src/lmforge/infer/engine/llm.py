"""`LLMEngine`: the request API over scheduler, block manager and model runner (no HTTP in here).

    engine = LLMEngine(model, num_blocks=..., block_size=16)
    rid = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=64))   # or RequestRefused
    rids = engine.add_samples(prompt_ids, SamplingParams(seed=7), n=4)        # 4 samples, one pre-fill
    while engine.has_unfinished():
        for out in engine.step(): ...                                         # RequestOutput per request
    async for out in engine.stream(prompt_ids, params): ...                   # or one async stream each
    engine.abort(rid); engine.counters; engine.score(seqs); engine.load_weights(new_model)

One `step()`: schedule (which sequences compute how many tokens), run the model once on the packed batch,
sample one token for every sequence whose chunk reached its end, then book-keep (advance computed tokens,
append tokens, finish, free blocks). The engine works on token ids; detokenization and stop strings belong to
the server above it.

K samples of one prompt (`add_samples(prompt_ids, sampling, n=K)`, or `generate(prompts, sampling, n=K)`):
rejection sampling, PPO / GRPO rollouts and the server's `n` ask for several completions of each prompt. The
prompt is pre-filled once, by a prompt sequence that then forks into K requests sharing its KV blocks (the
last, partly filled one is copied when a fork first writes into it: sequence.py, block_manager.py). Each of
the K is an ordinary request from then on (its own id `{request_id}.{i}`, abort, preemption, outputs).
Seeds: choice i of a request with `seed` s samples with seed (s + i) mod 2**63 (vLLM's rule), so the K
outputs are exactly those of K separate requests with seeds s, s + 1, ..., s + K - 1 -- computed with one
pre-fill instead of K (`counters.computed_tokens` shows it). Without a seed the K draw independently.

Overlap (`overlap=True`, the default on CUDA). Reading a step's sampled ids waits for the GPU, and the host
work that follows (book-keeping, scheduling, building the next step's inputs) would leave the GPU idle. So
`step()` queues step n + 1 before it reads step n's ids. Step n is committed as soon as it is queued
(`_commit`): computed tokens advance, every sampling sequence gets a `PENDING` output, and those that reach
max_new_tokens or the context finish now; the scheduler then plans step n + 1 as if the ids were known, and
the runner feeds the pending ids to it on the device (`TokenFeed`). Only then does the host wait, for step
n's ids alone (`_resolve`): it puts them in place of the placeholders and finishes the sequences that sampled
a stop token, whose token of step n + 1 was computed for nothing and is dropped. `step()` therefore returns
the previous step's outputs, and one more `step()` retires the last step in flight (`has_unfinished`). The
outputs equal those without overlap, since a sequence's tokens depend only on its own logits and seed
(tests/infer/engine/test_engine_overlap.py); only `counters.computed_tokens` counts the dropped tokens too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Mapping, Sequence as Seq

import torch
import torch.nn as nn
from torch import Tensor
from torch.profiler import record_function

from lmforge.infer import fuse
from lmforge.infer.cache import cache_config
from lmforge.infer.engine.block_manager import BlockManager
from lmforge.infer.engine.decode_graphs import DecodeAttention
from lmforge.infer.engine.paged_attention import PagedImpl, PagedKVPool
from lmforge.infer.engine.runner import DecodePath, ModelRunner, TokenFeed
from lmforge.infer.engine.scheduler import RequestRefused, Scheduler, SchedulerConfig, SchedulerOutput
from lmforge.infer.engine.scoring import TokenScores, score_sequences
from lmforge.infer.engine.sequence import PENDING, FinishReason, Sequence
from lmforge.infer.sampling import SampleOutput, SamplingParams
from lmforge.infer.transfer import to_host_later
from lmforge.models.transformer import Transformer


@dataclass
class RequestOutput:
    """What one step produced for one request (the tokens since its previous output)."""

    request_id: str
    new_token_ids: list[int]
    num_output_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class EngineCounters:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    preemptions: int = 0
    computed_tokens: int = 0  # tokens run through the model (pre-fill, decode and recomputation)
    generation_tokens: int = 0  # tokens sampled
    prefix_cache_hit_blocks: int = 0
    steps: int = 0
    finished: int = 0
    aborted: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / max(1, self.kv_blocks_total)


@dataclass
class _Launched:
    """A step queued on the device and committed (`LLMEngine._commit`) whose sampled ids are not read yet.
    Row k: sequence sampled[k], whose output index[k] is `PENDING` until `_resolve`; ends[k]: that output is
    its last (max_new_tokens or the context)."""

    sampled: list[Sequence]
    index: list[int]
    ends: list[bool]
    result: SampleOutput | None = None  # the device tensors (the next step feeds on result.tokens)
    fetch: Callable[[], list] | None = None  # waits for the ids on the host (transfer.to_host_later)


class LLMEngine:
    """Continuous-batching engine for one `Transformer` (any device / dtype; put it in eval mode).

    Args:
        block_size: tokens per KV block.
        num_blocks: KV blocks in the pool; default: `kv_cache_fraction` of the free CUDA memory, or on the CPU
            room for `max_num_seqs` sequences of min(max_seq_len, 2048) tokens.
        max_num_batched_tokens, max_num_seqs, max_waiting, watermark_blocks: see `SchedulerConfig`; the
            watermark defaults to 1% of the blocks (vLLM's default).
        eos_id: end-of-sequence id (ends a request unless its `ignore_eos`).
        attention: the packed steps' attention: "varlen" (one flash call per layer), "padded" (batched SDPA per
            group) or "reference" (dense, explicit softmax); default: "varlen" on CUDA in bf16 / fp16, else
            "padded" (paged_attention.py).
        decode_path: decode-only steps "packed" like the others, or at static shapes sampling inside the step
            ("eager", "cuda_graph", or "compile": forward and sampling compiled by Inductor, then captured;
            decode_graphs.py); default: "cuda_graph" on CUDA without tensor parallelism, else "packed".
        decode_attention: attention of those static-shape steps: "sdpa" (gather the keys, then SDPA), "fused"
            (compiled kernels that read the keys in place; decode_graphs.py) or "triton" (our paged kernel,
            triton_decode.py); default: "triton" on CUDA, else "sdpa".
        check_invariants: assert the block manager's invariants after every schedule (tests).
        overlap: queue each step before reading the previous step's sampled ids, so that the host's work
            (book-keeping, scheduling, preparing the inputs) runs while the GPU computes (module docstring);
            default: on CUDA.
        fuse_projections: fuse each layer's wq, wk, wv and w1, w3 into one product each, in place
            (lmforge.infer.fuse: names, state dict and `load_weights` unchanged, no second copy); default: on
            CUDA (not under tensor parallelism).
    """

    def __init__(
        self,
        model: Transformer,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_fraction: float = 0.8,
        max_num_batched_tokens: int = 512,
        max_num_seqs: int = 128,
        max_waiting: int = 1024,
        watermark_blocks: int | None = None,
        eos_id: int | None = None,
        attention: PagedImpl | None = None,
        decode_path: DecodePath | None = None,
        decode_attention: DecodeAttention | None = None,
        check_invariants: bool = False,
        overlap: bool | None = None,
        fuse_projections: bool | None = None,
    ):
        self.model, self.config, self.eos_id = model, model.config, eos_id
        param = next(model.parameters())
        if (param.device.type == "cuda") if fuse_projections is None else fuse_projections:
            if fuse.fuse_projections(model) and param.device.type == "cuda":
                torch.cuda.empty_cache()  # the unfused weights' memory goes back before the pool is sized
        if num_blocks is None:
            per_block = PagedKVPool.bytes_per_block(cache_config(model), block_size, param.dtype)
            if param.device.type == "cuda":
                num_blocks = int(torch.cuda.mem_get_info(param.device)[0] * kv_cache_fraction) // per_block
            else:
                num_blocks = max_num_seqs * -(-min(self.config.max_seq_len, 2048) // block_size)
        self.block_manager = BlockManager(num_blocks, block_size, self.config.sliding_window)
        if watermark_blocks is None:
            watermark_blocks = num_blocks // 100
        sched = SchedulerConfig(max_num_batched_tokens, max_num_seqs, max_waiting, watermark_blocks, check_invariants)
        max_len = None if self.config.sliding_window is not None else self.config.max_seq_len
        self.scheduler = Scheduler(sched, self.block_manager, max_len)
        self.runner = ModelRunner(model, num_blocks, block_size, attention, decode_path, decode_attention)
        self.seqs: dict[str, Sequence] = {}  # unfinished requests by id
        self._counters = EngineCounters(kv_blocks_total=num_blocks)
        self._queues: dict[str, deque[RequestOutput]] = {}  # outputs awaiting each stream's consumer
        self._step_lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self.overlap = param.device.type == "cuda" if overlap is None else overlap
        self._inflight: _Launched | None = None  # with overlap: the step queued by the last step() call
        self._ready: list[RequestOutput] = []  # outputs resolved early (`_drain`), returned by the next step()

    # --- requests ------------------------------------------------------------------------------------------
    def add_request(
        self, prompt_ids: Seq[int], sampling: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request; returns its id. ValueError for a bad request, `RequestRefused` when over capacity."""
        sampling = sampling or SamplingParams()
        ids = self._check_request(prompt_ids, sampling, [request_id])
        seq = Sequence(ids, sampling, request_id or "", arrival_time=time.monotonic())
        self._queue(seq)
        self.seqs[seq.request_id] = seq
        return seq.request_id

    def add_samples(
        self, prompt_ids: Seq[int], sampling: SamplingParams | None = None, n: int = 1, request_id: str | None = None
    ) -> list[str]:
        """Queue n requests for one prompt, pre-filled once (module docstring); returns their ids
        `{request_id}.0` .. `{request_id}.{n - 1}` (request_id default: a fresh `req-N`). Choice i of a seeded
        request uses seed + i. Errors as `add_request`, and ValueError when n > max_num_seqs."""
        sampling = sampling or SamplingParams()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if n > self.scheduler.config.max_num_seqs:
            raise ValueError(f"n = {n} samples run together, more than this engine's max_num_seqs "
                             f"({self.scheduler.config.max_num_seqs})")
        now = time.monotonic()
        prompt = Sequence(list(prompt_ids), sampling, request_id or "", arrival_time=now)
        names = [f"{prompt.request_id}.{i}" for i in range(n)]
        ids = self._check_request(prompt_ids, sampling, names)
        for i, name in enumerate(names):
            seed = None if sampling.seed is None else (sampling.seed + i) % 2**63
            fork = Sequence(ids, dataclasses.replace(sampling, seed=seed), name, arrival_time=now, parent=prompt)
            prompt.forks.append(fork)
        self._queue(prompt)
        self.seqs.update((s.request_id, s) for s in prompt.forks)
        return names

    def _check_request(self, prompt_ids: Seq[int], sampling: SamplingParams, request_ids: list) -> list[int]:
        """The prompt as a list, or ValueError naming what is wrong with the request."""
        ids = list(prompt_ids)
        V = self.config.vocab_size
        if not ids:
            raise ValueError("prompt_ids is empty: it needs at least one token (e.g. the BOS id)")
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {V})")
        if self.config.sliding_window is None and len(ids) >= self.config.max_seq_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the context is {self.config.max_seq_len} (prompt + output)"
            )
        if sampling.stop:
            raise ValueError("stop strings need detokenization, which the server does: use stop_token_ids here")
        used = [i for i in request_ids if i is not None and i in self.seqs]
        if used:
            raise ValueError(f"request id {used[0]!r} is already in use")
        return ids

    def _queue(self, seq: Sequence) -> None:
        try:
            self.scheduler.add(seq)
        except RequestRefused as refusal:
            key = refusal.reason.value
            self._counters.refused[key] = self._counters.refused.get(key, 0) + 1
            raise

    def abort(self, request_id: str) -> bool:
        """Finish a request now, waiting or running; its blocks are freed at once. False if unknown / done."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, FinishReason.ABORT)
        while seq.output_ids and seq.output_ids[-1] == PENDING:  # the step in flight's token is dropped
            seq.output_ids.pop()
        self._counters.aborted += 1
        if request_id in self._queues:
            self._queues[request_id].append(RequestOutput(request_id, [], len(seq.output_ids), True, "abort"))
        return True

    def has_unfinished(self) -> bool:
        """Requests not finished, or (overlap) a step still in flight: call `step()` again."""
        return bool(self.seqs) or self._inflight is not None

    # --- the step loop -------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, book-keep; the outputs of every request that got a token.

        With `overlap`, the outputs are those of the previous call's step: this call queues its own step on
        the device before it waits for the previous one's ids (module docstring)."""
        with record_function("engine.schedule"):
            out = self.scheduler.schedule()
        launched = None
        if out.chunks:
            sampled, result, fetch = [s for c in out.chunks for s in c.sampling_seqs], None, None
            with record_function("engine.forward"):
                if sampled:  # (a decode-only step samples inside its graph)
                    result = self.runner.run(out.chunks, out.copies, self._feed(), sampled)
                    fetch = to_host_later([result.tokens, result.logprobs, result.top_ids, result.top_logprobs])
                else:
                    self.runner.forward(out.chunks, out.copies, self._feed())
            with record_function("engine.advance"):
                launched = self._commit(out, sampled, result, fetch)
        if not self.overlap:
            return self._resolve(launched) if launched is not None else []
        previous, self._inflight = self._inflight, launched
        outputs, self._ready = self._ready, []
        return outputs + (self._resolve(previous) if previous is not None else [])

    def _forward(self) -> tuple[SchedulerOutput, list[Sequence], Tensor | None]:
        """Schedule and run the model: (schedule, sequences that sample, their logits (K, V)); for tests that
        choose the tokens themselves (`_advance`). (The record_function ranges name the phases of a step in a
        profile: benchmarks/serving.py --profile.)"""
        with record_function("engine.schedule"):
            out = self.scheduler.schedule()
        if not out.chunks:
            return out, [], None
        with record_function("engine.forward"):
            logits = self.runner.forward(out.chunks, out.copies, self._feed())
        return out, [s for c in out.chunks for s in c.sampling_seqs], logits

    def _feed(self) -> TokenFeed | None:
        """The in-flight step's sampled ids, for the tokens of this step that are still `PENDING`."""
        f = self._inflight
        if f is None or f.result is None:
            return None
        return TokenFeed(f.result.tokens, {id(seq): k for k, seq in enumerate(f.sampled)})

    def _commit(self, out: SchedulerOutput, sampled: list[Sequence], result=None, fetch=None) -> _Launched:
        """Book-keep a queued step before its ids are known: computed tokens advance, every sampling
        sequence gets a `PENDING` output, and those that reach max_new_tokens or the context end now (so
        that the next schedule leaves them out); only a stop token is left to find out (`_resolve`)."""
        c = self._counters
        self.scheduler.step_done(out)
        c.steps += 1
        c.computed_tokens += out.num_tokens
        index, ends = [], []
        for seq in sampled:
            seq.output_ids.append(PENDING)
            index.append(len(seq.output_ids) - 1)
            full = self.config.sliding_window is None and seq.num_tokens >= self.config.max_seq_len
            ends.append(len(seq.output_ids) >= seq.sampling.max_new_tokens or full)
            if ends[-1]:
                self.scheduler.finish(seq, FinishReason.LENGTH)
        return _Launched(sampled, index, ends, result, fetch)

    def _resolve(self, launched: _Launched, values: tuple | None = None) -> list[RequestOutput]:
        """Read a committed step's ids (or take `values` = (tokens, logprobs, top)), put them in place of the
        `PENDING` outputs, finish the sequences that sampled a stop token, and make the outputs. A row whose
        sequence was aborted, or stopped at an earlier token, was computed for nothing and is dropped."""
        if values is None:
            with record_function("engine.wait"):
                tokens, logprobs, top_ids, top_values = launched.fetch() if launched.fetch else ([], None, None, None)
            top = (top_ids, top_values) if top_ids is not None else None
        else:
            tokens, logprobs, top = values
        c, outputs = self._counters, []
        for k, seq in enumerate(launched.sampled):
            i, p = launched.index[k], seq.sampling
            if seq.finish_reason is FinishReason.ABORT or len(seq.output_ids) <= i:
                continue
            token = seq.output_ids[i] = tokens[k]
            reason = FinishReason.LENGTH if launched.ends[k] else None
            if token in p.stop_token_ids or (token == self.eos_id and not p.ignore_eos):
                reason = FinishReason.STOP
                del seq.output_ids[i + 1 :]  # a token of the step in flight, if any: void
                if seq.is_finished:
                    seq.finish_reason = reason
                else:
                    self.scheduler.finish(seq, reason)
            c.generation_tokens += 1
            r = RequestOutput(seq.request_id, [token], i + 1, reason is not None, reason.value if reason else None)
            if p.logprobs and logprobs is not None:
                r.new_logprobs = [logprobs[k]]
                seq.output_logprobs.append(logprobs[k])
            if p.top_logprobs and top is not None:
                r.new_top_logprobs = [list(zip(top[0][k], top[1][k]))[: p.top_logprobs]]
            if reason is not None:
                self.seqs.pop(seq.request_id, None)
                c.finished += 1
            if seq.request_id in self._queues:
                self._queues[seq.request_id].append(r)
            outputs.append(r)
        return outputs

    def _advance(self, out: SchedulerOutput, sampled: list[Sequence], tokens: list[int], logprobs=None, top=None):
        """Book-keep a computed step with the chosen `tokens` (K,) of the sampling sequences.

        NOTE: split from `step()` so that tests can teacher-force tokens through the real engine.
        """
        return self._resolve(self._commit(out, sampled), (tokens, logprobs, top))

    def _drain(self) -> None:
        """Resolve the step in flight now; its outputs come with the next `step()`."""
        launched, self._inflight = self._inflight, None
        if launched is not None:
            self._ready += self._resolve(launched)

    def generate(
        self, prompts: Seq[Seq[int]], sampling: SamplingParams | Seq[SamplingParams] | None = None, n: int = 1
    ) -> list[list[int]]:
        """Run prompts to completion; the output token ids of each, in prompt order. With n > 1, n samples of
        each prompt (`add_samples`), prompt by prompt: entry b * n + i is choice i of prompt b.

        Offline work of any size: prompts join as the queue has room (`max_waiting` bounds what waits, not
        what one call may ask), so 5,000 prompts run through a queue of 1,024 without a refusal."""
        params = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        pending = deque(zip(prompts, params))
        results: dict[str, list[int]] = {}  # request id -> its tokens, in prompt order
        live: set[str] = set()

        def admit() -> None:
            # at least one when nothing runs, so that a queue too small for n refuses instead of waiting forever
            while pending and (self.scheduler.room() >= n or not live):
                p, s = pending.popleft()
                for i in [self.add_request(p, s)] if n == 1 else self.add_samples(p, s, n):
                    results[i] = []
                    live.add(i)

        admit()
        while live:
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].extend(out.new_token_ids)
            live.intersection_update(self.seqs)
            admit()
        return list(results.values())

    async def stream(
        self, prompt_ids: Seq[int], sampling: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs as they come. Concurrent streams share the steps: whichever
        stream finds its queue empty runs the next step (under a lock) for everyone. Leaving the loop early
        (a client went away) aborts the request."""
        rid = self.add_request(prompt_ids, sampling, request_id)
        queue = self._queues[rid] = deque()
        loop = asyncio.get_running_loop()
        if self._step_lock is None or self._step_lock[0] is not loop:  # NOTE: an asyncio.Lock serves one loop
            self._step_lock = (loop, asyncio.Lock())
        done = False
        try:
            while not done:
                while queue and not done:
                    out = queue.popleft()
                    done = out.finished
                    yield out
                if not done:
                    async with self._step_lock[1]:
                        if not queue:
                            self.step()
                    await asyncio.sleep(0)  # let the other streams consume what this step produced
        finally:
            if not done:
                self.abort(rid)
            self._queues.pop(rid, None)

    # --- metrics, scoring, weights -------------------------------------------------------------------------
    @property
    def counters(self) -> EngineCounters:
        c = self._counters
        c.running, c.waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        c.kv_blocks_used = self.block_manager.num_used_blocks
        c.preemptions = self.scheduler.num_preemptions
        c.prefix_cache_hit_blocks = self.block_manager.prefix_hits
        return c

    def score(
        self, sequences: Seq[Seq[int]], max_tokens_per_forward: int = 8192, top_k: int = 0
    ) -> list[Tensor] | list[TokenScores]:
        """Teacher-forced log-probabilities of whole sequences (what `echo` and log-likelihood evaluation need).

        For a sequence x_0 .. x_{T-1}, entry t (t = 0 .. T - 2) is log p(x_{t+1} | x_0 .. x_t) under the model.
        Returns one (T - 1,) float32 tensor per sequence; with `top_k` > 0, one `TokenScores` per sequence
        that also holds the k most likely next tokens at each position. Each forward pass carries at most
        `max_tokens_per_forward` tokens, padding included (scoring.py says how, and what it costs).
        NOTE: runs synchronously on the model without the paged cache; it uses no KV blocks (call it between
        steps, from the thread that steps the engine).
        """
        config = self.config
        max_len = config.max_seq_len if config.sliding_window is None else None
        return score_sequences(self.model, sequences, max_tokens_per_forward, top_k, max_len)

    @torch.no_grad()
    def load_weights(self, source: Mapping[str, Tensor] | nn.Module) -> None:
        """Copy new weights into the engine's model in place (same tensors, so nothing is rebuilt).

        `source`: a state dict with the model's parameter names, or a module (e.g. the training model).
        Running requests are preempted and recomputed, and the prefix cache is dropped: every token computed
        after this call uses the new weights.
        """
        state = source.state_dict() if isinstance(source, nn.Module) else source
        self._drain()  # the step in flight used the old weights; its tokens stand, as any earlier step's
        own = dict(self.model.named_parameters())
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if missing or unexpected:
            raise ValueError(f"load_weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, p in own.items():
            if tuple(state[name].shape) != tuple(p.shape):
                shape = tuple(state[name].shape)
                raise ValueError(f"load_weights: {name} has shape {shape}, expected {tuple(p.shape)}")
            p.copy_(state[name])
        self.scheduler.preempt_all()
        self.block_manager.reset_prefix_cache()


__all__ = ["EngineCounters", "LLMEngine", "RequestOutput"]
