"""Continuous batching: which sequences compute how many tokens in the next step (one concept per file: the
scheduler only decides; the engine runs what it decides).

Notation: budget = `max_num_batched_tokens` (tokens one forward pass may carry), n - c a sequence's tokens
still to compute (see `sequence.py`), bs the block size.

The scheduler owns the waiting queue and the running list and talks to the `BlockManager`; it never touches
tensors. Its output, a list of (sequence, number of new tokens), is all the model runner needs. Refusals at
`add` carry a reason the HTTP layer maps to a status code (`RefusalReason.http_status`).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from lmforge.infer.engine.block_manager import BlockManager
from lmforge.infer.engine.sequence import FinishReason, Sequence, SequenceStatus


class RefusalReason(str, enum.Enum):
    QUEUE_FULL = "queue_full"  # the waiting queue is at its limit: try again later
    EXCEEDS_KV_CAPACITY = "exceeds_kv_capacity"  # prompt + max_new_tokens can never fit in this engine's cache

    @property
    def http_status(self) -> int:
        return 429 if self is RefusalReason.QUEUE_FULL else 503


class RequestRefused(Exception):
    def __init__(self, reason: RefusalReason, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 512  # the token budget of one step (decode tokens + pre-fill chunks)
    max_num_seqs: int = 128  # running sequences at most
    max_waiting: int = 1024  # queue limit: new requests beyond it are refused (QUEUE_FULL)
    watermark_blocks: int = 0  # blocks kept free when admitting while others run (fewer preemptions)
    check_invariants: bool = False  # also run the O(blocks) block-manager check after every schedule()

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_waiting < 0:
            raise ValueError("max_num_seqs must be >= 1 and max_waiting >= 0")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # NOTE: with a smaller budget some running sequences could not even decode in a step.
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs ({self.max_num_seqs})"
            )


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # compute positions [c, c + num_tokens) of seq
    start: int = 0  # c at scheduling time
    samples: bool = field(init=False)  # the chunk reaches the last token: its logits give the next token
    forks: list[Sequence] = field(init=False)  # a prompt sequence's last chunk: the requests it forks into

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_tokens == self.seq.num_tokens
        self.forks = list(self.seq.forks) if self.samples else []

    @property
    def sampling_seqs(self) -> list[Sequence]:
        """The sequences that sample from this chunk's last logits: itself, or a prompt sequence's forks."""
        return (self.forks or [self.seq]) if self.samples else []


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) blocks to copy before the step

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_seq_len: int | None):
        self.config, self.bm = config, block_manager
        self.max_seq_len = max_seq_len  # None for a sliding-window model (no context limit)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def room(self) -> int:
        """How many more new requests the queue takes (preempted sequences back in it do not count)."""
        return self.config.max_waiting - sum(s.num_slots for s in self.waiting if s.num_preemptions == 0)

    def add(self, seq: Sequence) -> None:
        """Queue a new request (or a prompt sequence with its forks, which count as that many requests), or
        raise `RequestRefused` (queue limit; needs more blocks than exist)."""
        if seq.num_slots > self.room():
            limit = self.config.max_waiting
            raise RequestRefused(RefusalReason.QUEUE_FULL,
                                 f"{limit - self.room()} requests are waiting (limit {limit})")
        total = seq.num_tokens + seq.sampling.max_new_tokens
        if self.max_seq_len is not None:
            total = min(total, self.max_seq_len)
        need = self.bm.max_blocks_per_seq(total, self.config.max_num_batched_tokens)
        if need > self.bm.num_blocks:
            raise RequestRefused(
                RefusalReason.EXCEEDS_KV_CAPACITY,
                f"{total} tokens need {need} KV blocks of {self.bm.block_size}; the cache has {self.bm.num_blocks}",
            )
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        # Design. Every sequence has tokens still to compute, n - c: a whole prompt when it arrives, the rest
        # of a prompt after a chunk, 1 when decoding, prompt + output after a preemption. One step carries at
        # most `budget` tokens. Running sequences come first, oldest first, each taking min(n - c, what is
        # left of the budget): decodes cost 1 and a long prompt in progress takes the rest as its next chunk.
        # Each needs blocks for its new tokens; when the pool is short, the newest running sequence is
        # preempted (blocks freed, recomputed later) until the older one fits (it may be the one itself).
        # Then, if nothing was preempted, waiting sequences are admitted in order while budget, sequence
        # slots and free blocks last; a prefix-cache hit makes c start above 0. Decode and pre-fill therefore
        # share one batch and one rule, and no request waits for another's whole prompt. A prompt sequence
        # of K forks takes K sequence slots when it is admitted (it becomes K sequences when it samples).
        cfg, out = self.config, SchedulerOutput()
        budget = cfg.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_to_compute, budget)
            while not self.bm.append(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                out.chunks.append(ScheduledChunk(seq, n, seq.num_computed_tokens))
                budget -= n
                i += 1
        slots = sum(s.num_slots for s in self.running)
        while self.waiting and budget > 0 and not out.preempted:
            seq = self.waiting[0]
            if slots + seq.num_slots > cfg.max_num_seqs:
                break
            hits = self.bm.match_prefix(seq)
            n = min(seq.num_tokens - len(hits) * self.bm.block_size, budget)
            reserve = cfg.watermark_blocks if self.running else 0  # NOTE: alone, a request may use every block
            if not self.bm.admit(seq, hits, n, reserve):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, n, seq.num_computed_tokens))
            budget -= n
            slots += seq.num_slots
        out.copies = self.bm.take_copies()
        self._check(out)
        return out

    def _check(self, out: SchedulerOutput) -> None:
        cfg, bs = self.config, self.bm.block_size
        assert out.num_tokens <= cfg.max_num_batched_tokens, "token budget exceeded"
        assert sum(s.num_slots for s in self.running) <= cfg.max_num_seqs, "too many running sequences"
        assert len({id(c.seq) for c in out.chunks}) == len(out.chunks), "a sequence scheduled twice"
        running = {id(s) for s in self.running}
        assert not running & {id(s) for s in self.waiting}, "a sequence both waiting and running"
        for c in out.chunks:
            assert id(c.seq) in running and c.seq.status is SequenceStatus.RUNNING
            assert c.start == c.seq.num_computed_tokens and 1 <= c.num_tokens <= c.seq.num_to_compute
            assert len(c.seq.block_table) * bs >= c.start + c.num_tokens, "chunk without blocks for its tokens"
        for s in self.waiting:
            assert not s.block_table and s.num_computed_tokens == 0, "a waiting sequence holds blocks"
        # Progress: with work pending, a step always computes something (no live-lock).
        assert out.chunks or not (self.running or self.waiting), "nothing scheduled although work is pending"
        if cfg.check_invariants:
            self.bm.check_invariants(self.running)

    def step_done(self, out: SchedulerOutput) -> None:
        """The runner computed every chunk: advance c, register full blocks, free blocks behind the window;
        a prompt sequence whose pre-fill ended hands its blocks to its forks. Sequences finished since they
        were scheduled (aborted) are skipped."""
        for c in out.chunks:
            if c.seq.is_finished:
                continue
            c.seq.num_computed_tokens += c.num_tokens
            self.bm.on_computed(c.seq)
            if c.forks:
                self._fork(c.seq, [s for s in c.forks if not s.is_finished])

    def _fork(self, prompt: Sequence, forks: list[Sequence]) -> None:
        """The forks take the prompt sequence's place in the running list, each sharing all its blocks."""
        for seq in forks:
            self.bm.fork(prompt, seq)
            seq.status, seq.parent = SequenceStatus.RUNNING, None
        i = self.running.index(prompt)
        self.running[i : i + 1] = forks
        self.bm.free_seq(prompt)
        prompt.status, prompt.forks = SequenceStatus.FINISHED, []

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence in any state; its blocks are freed at once. A request still waiting for its prompt's
        pre-fill leaves the prompt sequence, which ends with its last fork."""
        if seq.parent is not None:
            prompt, seq.parent = seq.parent, None
            prompt.forks.remove(seq)
            if not prompt.forks:
                self.finish(prompt, reason)
        elif seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.bm.free_seq(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: free the blocks, forget c, go to the front of the queue (outputs are kept)."""
        self.bm.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def preempt_all(self) -> None:
        """Preempt every running sequence (after a weight update: their K/V belong to the old weights)."""
        while self.running:
            self._preempt(self.running.pop())


__all__ = ["RefusalReason", "RequestRefused", "ScheduledChunk", "Scheduler", "SchedulerConfig", "SchedulerOutput"]
