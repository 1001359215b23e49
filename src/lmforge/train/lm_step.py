"""The forward and backward passes of one optimizer step of a next-token objective (pre-training and SFT).

Both recipes minimise the same loss (losses.py): the mean cross-entropy over every target token of the global
batch, the tokens counted before the first backward pass, so that accumulation and data parallelism never
change it. Only where the micro-batches come from differs (a token stream cut into samples, or whole
dialogues packed into rows with positions that restart at 0 for each: lmforge.align.packing).

    n_tokens = target tokens in all micro-batches, summed over dp ranks
    for each micro-batch:  (CE_sum * dp_size / n_tokens + router_aux / accum).backward()

The recipe then clips, checks and applies the update (train/harness.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from lmforge.data.loader import Batch
from lmforge.parallel import DataParallelRank
from lmforge.train.evaluate import autocast_context
from lmforge.train.linear_ce import linear_cross_entropy
from lmforge.train.losses import global_target_tokens


@dataclass
class StepLosses:
    """What one step's backward passes measured: the mean loss over the global batch's target tokens, their
    number, and the MoE router losses (mean over micro-batches; zeros for a dense model)."""

    loss: float
    target_tokens: int
    load_balance: float
    z_loss: float


def next_token_backward(
    train_net: nn.Module,
    net: nn.Module,
    batches: list[Batch],
    *,
    device: torch.device,
    dp: DataParallelRank,
    precision: str,
    loss_chunk: int,
    document_masking: bool,
    poison: bool = False,
) -> StepLosses:
    """Forward and backward every micro-batch of one step; gradients accumulate in the parameters.

    train_net: what to call (the model, or its DDP wrapper); net: the Transformer itself (its output
    projection feeds the fused cross-entropy). document_masking: keep attention within each document of a
    row (always on for packed dialogues). poison: make the loss NaN (the test hook of the non-finite stop).
    """
    # Count every target token of the global batch first, so each micro-batch's loss can be divided by the
    # same number and the accumulated gradient is the gradient of the global mean (losses.py). Clamped: a
    # global batch without a single target, possible with loss masks, then trains nothing.
    n_tokens = global_target_tokens([b.loss_mask.to(device) for b in batches], dp.group).clamp(min=1)
    loss_sum = torch.zeros((), device=device)
    aux = torch.zeros(2, device=device)  # load-balance, z-loss; mean over micro-batches
    for batch in batches:
        b = batch.to(device, non_blocking=True)
        doc = b.document_ids if document_masking else None
        with autocast_context(device, precision):
            hidden, router = train_net(b.inputs, b.positions, document_ids=doc, return_hidden=True, return_aux=True)
            ce_sum = linear_cross_entropy(hidden, net.output.weight, b.targets, b.loss_mask, loss_chunk)
        if poison:
            ce_sum = ce_sum * math.nan
        # NOTE: data-parallel wrappers average gradients over dp ranks; * dp.size undoes that, so the gradient
        # is of sum / n_tokens with n_tokens counted over all dp ranks.
        objective = ce_sum * dp.size / n_tokens + router.total / len(batches)
        objective.backward()
        loss_sum += ce_sum.detach()
        aux += torch.stack([router.load_balance.detach(), router.z_loss.detach()]) / len(batches)
    if dp.size > 1:
        dist.all_reduce(loss_sum, group=dp.group)
    lb, z = aux.tolist()
    return StepLosses((loss_sum / n_tokens).item(), int(n_tokens.item()), lb, z)


def trainable(net: nn.Module) -> list[Tensor]:
    """The parameters an optimizer updates and the clip measures (requires_grad; LoRA freezes the rest)."""
    return [p for p in net.parameters() if p.requires_grad]
