"""Teacher-forced scoring: the log-probability of every next token of whole sequences, in batched forwards.

Notation: N sequences, T_i the length of sequence i, B sequences in one forward pass padded to L = max T_i,
R = sum (T_i - 1) scored positions, V vocabulary, k = top_k.

    sequences ──► batches of similar lengths, B * L <= max_tokens_per_forward, <= 25% padding  (score_batches)
              ──► tokens (B, L) right-padded ──► model(return_hidden) ──► hidden (B * L, d)
              ──► the R rows with a next token ──► projection + log-softmax in row chunks   (score_rows)
              ──► logprobs (R,) [top ids, top logprobs (R, k)] ──► split per sequence

Row t of sequence i gives log p(x_{t+1} | x_0 .. x_t), read from log_softmax of its float32 logits; the top-k
come from the same tensor, so a next token that is the argmax has exactly the value of the top-1 entry
(lm-evaluation-harness's greedy check compares them with ==).

Cost: a pre-fill of the same tokens (the model on every token, plain causal attention per row) plus the
vocabulary projection of every scored position, which a pre-fill skips. The projection runs in chunks of
`LOGITS_CHUNK_BYTES` of float32 logits, so memory stays bounded however many positions a batch holds.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from lmforge.infer.transfer import to_device

LOGITS_CHUNK_BYTES = 1 << 28  # 256 MiB of float32 logits per projection chunk (2,097 rows of V = 32,000)
PADDING = 0.25  # at most this fraction of a forward pass's tokens is padding


class TokenScores(NamedTuple):
    """Scores of one sequence of T tokens: row t is about the token after position t."""

    logprobs: Tensor  # (T - 1,) float32: log p(x_{t+1} | x_0 .. x_t)
    top_ids: Tensor  # (T - 1, k) long: the k most likely tokens at each position, most likely first
    top_logprobs: Tensor  # (T - 1, k) float32: their log-probabilities


def score_batches(lengths: Sequence[int], max_tokens: int, max_padding: float = PADDING) -> list[list[int]]:
    """Group sequence indices into forward passes, shortest first, each of at most `max_tokens` padded tokens
    (B * L) of which at most a fraction `max_padding` is padding; a longer sequence gets a pass of its own.

    Worked example, lengths [5, 2, 9, 3, 8], max_tokens 20, max_padding 0.25: order 1, 3, 0, 4, 2 (lengths 2,
    3, 5, 8, 9). [1] + 3 -> 2 x 3 = 6 tokens, 1 of padding (17%): keep. + 0 -> 3 x 5 = 15, 5 padding (33%):
    close [1, 3]. [0] + 4 -> 2 x 8 = 16, 3 padding (19%): keep. + 2 -> 3 x 9 = 27 > 20: close [0, 4]. [2].
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_forward must be >= 1, got {max_tokens}")
    batches: list[list[int]] = []
    real = 0  # tokens of the open batch, padding excluded
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        # ascending order: sequence i is the longest of the open batch, so it would pad to (B + 1) * L_i
        padded = (len(batches[-1]) + 1) * lengths[i] if batches else 0
        if batches and padded <= max_tokens and padded - real - lengths[i] <= max_padding * padded:
            batches[-1].append(i)
            real += lengths[i]
        else:
            batches.append([i])
            real = lengths[i]
    return batches


def score_rows(output: nn.Module, hidden: Tensor, targets: Tensor, vocab_size: int, top_k: int = 0
               ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Log-probs (R,) of `targets` (R,) from final hidden states (R, d) through the vocabulary projection
    `output`, and with `top_k` the (R, k) most likely ids and their log-probs; logits chunked by rows."""
    R = hidden.shape[0]
    logprobs = torch.empty(R, dtype=torch.float32, device=hidden.device)
    top_ids = torch.empty(R, top_k, dtype=torch.long, device=hidden.device) if top_k else None
    top_logprobs = torch.empty(R, top_k, dtype=torch.float32, device=hidden.device) if top_k else None
    rows = max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))
    for a in range(0, R, rows):
        logp = output(hidden[a : a + rows]).float().log_softmax(dim=-1)  # (r, V)
        logprobs[a : a + rows] = logp.gather(1, targets[a : a + rows, None])[:, 0]
        if top_k:
            top_logprobs[a : a + rows], top_ids[a : a + rows] = logp.topk(top_k, dim=-1)  # (r, k)
    return logprobs, top_ids, top_logprobs


@torch.no_grad()
def score_sequences(model: nn.Module, sequences: Sequence[Sequence[int]], max_tokens_per_forward: int = 8192,
                    top_k: int = 0, max_seq_len: int | None = None) -> list[Tensor] | list[TokenScores]:
    """`LLMEngine.score`: (T_i - 1,) log-probs per sequence, or `TokenScores` with `top_k` > 0 (module
    docstring). `max_seq_len`: refuse longer sequences (None: no limit, a sliding-window model)."""
    seqs = [list(s) for s in sequences]
    V = model.config.vocab_size
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= V:
        raise ValueError(f"top_k must be an integer in [0, {V}], got {top_k!r}")
    for i, s in enumerate(seqs):
        if len(s) < 2:
            raise ValueError(f"sequence {i} has {len(s)} tokens; scoring needs at least 2")
        if max_seq_len is not None and len(s) > max_seq_len:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than the context {max_seq_len}")
        bad = [t for t in s if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V]
        if bad:
            raise ValueError(f"sequence {i} has token id {bad[0]!r} outside the vocabulary [0, {V})")
    results: list = [None] * len(seqs)
    for batch in score_batches([len(s) for s in seqs], max_tokens_per_forward):
        for i, out in zip(batch, _score_batch(model, [seqs[i] for i in batch], top_k)):
            results[i] = out
    return results


def _score_batch(model: nn.Module, seqs: list[list[int]], top_k: int) -> list:
    """Score B sequences in one forward pass: right-padded to (B, L), plain causal attention.

    NOTE: right padding needs no mask beyond the causal one: a real token at position t attends to positions
    <= t of its own row, all real, and padding only ever follows (its outputs are never read). Packing the
    sequences into one row instead needs a document mask: on the CPU an explicit (T, T) mask and T^2
    attention work, which made scoring 12x slower than a pre-fill (benchmarks/RESULTS.md).
    """
    device = next(model.parameters()).device
    lengths = [len(s) for s in seqs]
    B, L = len(seqs), max(lengths)
    tokens = torch.zeros(B, L, dtype=torch.long)  # (B, L), 0 on padding
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = torch.tensor(s)
    # Rows with a next token: (b, t) for t < L_b - 1, flattened row-major, so each sequence's rows are
    # contiguous. Worked example, lengths [3, 2], L = 3: rows (0, 0), (0, 1), (1, 0) -> flat [0, 1, 3].
    has_next = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None] - 1  # (B, L)
    rows = has_next.flatten().nonzero()[:, 0]  # (R,) host tensors: no device sync
    targets = tokens.roll(-1, dims=1).flatten()[rows]  # (R,) x_{t+1} of each row
    hidden = model(to_device(tokens, device), return_hidden=True).flatten(0, 1)  # (B * L, d)
    hidden = hidden.index_select(0, to_device(rows, device))  # (R, d)
    logprobs, top_ids, top_logprobs = score_rows(model.output, hidden, to_device(targets, device),
                                                 model.config.vocab_size, top_k)
    splits = [n - 1 for n in lengths]
    per_seq = logprobs.cpu().split(splits)
    if not top_k:
        return list(per_seq)
    return [TokenScores(*t) for t in zip(per_seq, top_ids.cpu().split(splits), top_logprobs.cpu().split(splits))]


__all__ = ["LOGITS_CHUNK_BYTES", "PADDING", "TokenScores", "score_batches", "score_rows", "score_sequences"]
