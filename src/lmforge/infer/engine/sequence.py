"""Request state: one `Sequence` per request, from arrival to its finish (or abort).

Notation: P prompt tokens, O output tokens so far, n = P + O (`num_tokens`), c = `num_computed_tokens` (those
whose keys / values are in the paged cache), bs the block size.

The scheduler reasons only in "tokens still to compute", n - c:

    new request, prompt of 7 tokens           n = 7, c = 0      -> 7 to compute (pre-fill, maybe in chunks)
    after a chunk of 4                        n = 7, c = 4      -> 3 to compute
    after the last chunk: sample token 7      n = 8, c = 7      -> 1 to compute (a decode)
    preempted (blocks freed, recompute)       n = 8, c = 0      -> 8 to compute (prompt + output again)

A step that brings c up to n ends with the logits of the last token, and one new token is sampled; a chunk
that stops short of n samples nothing. Prefill and decode are therefore the same operation, and a request
resumed after preemption simply has more tokens to compute.

Shared prompts (`LLMEngine.add_samples`: K samples of one prompt). One extra sequence, the prompt sequence,
pre-fills the prompt on behalf of the K requests; it is no request itself and samples nothing. Until its
last chunk the K requests wait in its `forks` (each with `parent` set, holding no blocks, in no queue). The
chunk that reaches the prompt's end gives one logits row to each fork, which samples its own first token;
then the forks take over the prompt's blocks (block_manager.py: `fork`, copy-on-write) and the prompt
sequence ends:

    prompt sequence P = 7, c = 0 .. 7, forks [r0, r1, r2]    -> pre-fill once (in chunks)
    its last chunk: 3 logits rows, one token each             r0, r1, r2: n = 8, c = 7, sharing its blocks
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from lmforge.infer.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # in the queue: new, or preempted (no blocks)
    RUNNING = "running"  # holds blocks; scheduled in steps
    FINISHED = "finished"  # done, aborted or refused later; holds no blocks


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-sequence or a stop token id
    LENGTH = "length"  # max_new_tokens, or a full-attention model's context filled
    ABORT = "abort"  # abort(id) or the consumer of a stream went away


_ids = itertools.count()

# An output token sampled by a step whose ids the host has not read yet (LLMEngine with overlap): the step
# after it takes the id straight from the device (runner.py, `TokenFeed`).
PENDING = -1


@dataclass
class Sequence:
    """One request. Block bookkeeping fields are written by `BlockManager`, counters by the engine."""

    prompt_ids: list[int]
    sampling: SamplingParams
    request_id: str = ""
    arrival_time: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0
    # Block table: entry i is the pool block holding positions [i * bs, (i + 1) * bs), or -1 once a
    # sliding-window model has freed it (so that block_table[pos // bs] stays the rule for every position).
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of the full, computed blocks
    num_preemptions: int = 0
    sample_seed: int | None = None  # the noise seed of its samples (its `seed`, or drawn at its first sample)
    forks: list["Sequence"] = field(default_factory=list)  # a prompt sequence: the requests it pre-fills for
    parent: "Sequence | None" = None  # a request waiting for its prompt sequence's pre-fill
    seq_no: int = field(default_factory=lambda: next(_ids))  # arrival order, for stable sorting

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = f"req-{self.seq_no}"

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_to_compute(self) -> int:
        """Tokens whose keys / values are not in the cache yet (the scheduler's unit of work)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def num_slots(self) -> int:
        """Running sequences this one stands for: a prompt sequence becomes its forks."""
        return len(self.forks) or 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_at(self, pos: int) -> int:
        P = len(self.prompt_ids)
        return self.prompt_ids[pos] if pos < P else self.output_ids[pos - P]


__all__ = ["PENDING", "FinishReason", "Sequence", "SequenceStatus"]
