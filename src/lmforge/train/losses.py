"""Next-token cross-entropy without materialising the logits, and the token count that normalises it.

Notation: B batch, T sequence length, d model width, V vocabulary, N = B * T token positions, c chunk rows.

The language-modelling loss of one optimizer step is the mean over every target token of the global batch:

    loss = sum over micro-batches m, ranks r, positions i with mask[i] of  -log p(target_i | tokens < i)
           -------------------------------------------------------------------------------------------
                            number of positions with mask[i], over all micro-batches and ranks

The denominator is counted before the first backward pass (`global_target_tokens`), so each micro-batch
backpropagates `loss_sum_m / total` and the accumulated gradient is the gradient of exactly this mean,
however the global batch is split into micro-batches or ranks. (Averaging per-micro-batch means instead would
weigh a token of a short, heavily masked micro-batch more than one of a full micro-batch.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_ce_sum(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """hidden (c, d), weight (V, d), targets (c,) with IGNORE_INDEX where there is none -> summed CE, fp32."""
    logits = F.linear(hidden, weight).float()  # (c, V): the only place logits exist, one chunk at a time
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, chunk: int = 2048) -> Tensor:
    """Sum of -log softmax(hidden @ weight.T)[target] over the positions where `mask` is True (fp32 scalar).

    hidden: (B, T, d) final normalised hidden states (`model(..., return_hidden=True)`); weight: (V, d), the
    output projection; targets: (B, T) int64; mask: (B, T) bool; chunk: rows c projected at once.

    Equal to `F.cross_entropy(hidden @ weight.T, targets, reduction="sum")` over the masked positions
    (tests/train/test_losses.py), but at most one (c, V) block of logits exists at a time: each chunk runs
    under activation checkpointing, so its logits are freed after the forward and recomputed in the backward.
    With V = 32000 and T = 4096 that is 0.25 GiB per chunk of 2048 rows instead of 0.5 GiB per sequence.

    NOTE: when all N positions fit in one chunk the checkpoint is skipped: the one (N, V) block is the peak
    either way, and recomputing it in the backward would only cost time.

    NOTE: masked positions get IGNORE_INDEX rather than being removed with `hidden[mask]`: boolean indexing
    would wait for the device to know how many rows remain, and in pre-training almost every position counts.
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)  # (N, d)
    t = torch.where(mask.reshape(-1), targets.reshape(-1), IGNORE_INDEX)  # (N,)
    if h.shape[0] <= chunk:
        return _chunk_ce_sum(h, weight, t)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        total = total + checkpoint(
            _chunk_ce_sum, h[start : start + chunk], weight, t[start : start + chunk], use_reentrant=False
        )
    return total


def _chunk_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """hidden (c, d), weight (V, d), targets (c,) -> log softmax(hidden @ weight.T)[target], (c,) fp32."""
    logits = F.linear(hidden, weight).float()  # (c, V), one chunk at a time
    return -F.cross_entropy(logits, targets, reduction="none")


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 2048) -> Tensor:
    """log p(target) of every position, (B, T) fp32: log softmax(hidden @ weight.T) at `targets` (B, T).

    The per-token form of `chunked_cross_entropy` (sequence log-probabilities for DPO, per-token ones for
    RL): the same chunks, each under activation checkpointing when gradients are needed, so at most one
    (c, V) block of logits exists at a time and the logits are recomputed in the backward pass.
    """
    d = hidden.shape[-1]
    h, t = hidden.reshape(-1, d), targets.reshape(-1)  # (N, d), (N,)
    pieces = []
    for start in range(0, h.shape[0], chunk):
        hc, tc = h[start : start + chunk], t[start : start + chunk]
        if torch.is_grad_enabled() and h.shape[0] > chunk:
            pieces.append(checkpoint(_chunk_logprobs, hc, weight, tc, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(hc, weight, tc))
    return torch.cat(pieces).view(targets.shape)


def global_target_tokens(masks: list[Tensor], group: dist.ProcessGroup | None = None) -> Tensor:
    """Number of target tokens in the global batch: this rank's micro-batch masks, summed over the ranks of
    `group` (default: all; under tensor parallelism, the data-parallel ranks, which read different batches).

    masks: the (B, T) bool loss masks of every micro-batch of this step on this rank -> int64 scalar.
    """
    count = sum(m.sum(dtype=torch.int64) for m in masks)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count
