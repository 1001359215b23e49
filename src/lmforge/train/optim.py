"""AdamW with decay / no-decay parameter groups, and the cosine learning-rate schedule of Llama 2.

Llama 2's published recipe: AdamW (beta1 0.9, beta2 0.95, eps 1e-5), weight decay 0.1, 2000 warm-up steps,
cosine decay to 10% of the peak learning rate, gradient clipping at 1.0.

Notation: s the optimizer step (0 for the first update), W warm-up steps, S decay steps (the run's total by
default), peak the peak learning rate, floor = min_lr_ratio * peak.

    s <  W:        lr = peak * (s + 1) / W                                  linear warm-up, reaches peak at s = W - 1
    W <= s <= S:   lr = floor + (peak - floor) * (1 + cos(pi * (s - W) / (S - W))) / 2
    s >  S:        lr = floor

Worked example, peak 3e-4, W = 2, S = 10, floor 3e-5: s = 0 -> 1.5e-4, s = 1 -> 3e-4, s = 2 -> 3e-4,
s = 6 -> 1.65e-4 (half way down), s = 10 -> 3e-5.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (defaults: Llama 2's pre-training recipe).

    Attributes:
        lr: Peak learning rate (Llama 2: 3e-4 for 7B and 13B, 1.5e-4 for 34B and 70B).
        betas: AdamW (beta1, beta2).
        eps: AdamW epsilon.
        weight_decay: Decoupled weight decay applied to every parameter not exempted by `no_decay`.
        no_decay: Parameters whose name ends with one of these suffixes get no weight decay. The default
            exempts the RMSNorm gains (attention_norm, ffn_norm, norm) and decays every matrix, embeddings
            and output included, as Llama does; add "tok_embeddings.weight" to exempt the embeddings too.
        grad_clip: Clip the global gradient norm to this value (0 switches clipping off; the norm is still
            computed and logged).
        warmup_steps: Linear warm-up steps W.
        decay_steps: Steps S at which the cosine reaches the floor; None means the run's total steps.
        min_lr_ratio: The floor as a fraction of the peak learning rate (Llama 2: 0.1).
        fused: Use the fused CUDA AdamW kernel (ignored on the CPU).
    """

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.1
    no_decay: tuple[str, ...] = ("norm.weight",)
    grad_clip: float = 1.0
    warmup_steps: int = 2000
    decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    fused: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("optim.warmup_steps, optim.weight_decay and optim.grad_clip must be >= 0")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two AdamW groups: parameters with weight decay, and those named by `cfg.no_decay` without it."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(tuple(cfg.no_decay)) else decay).append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`; lr is the peak, the scheduler scales it by `lr_factor` every step."""
    fused = cfg.fused and next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True if fused else None
    )


def lr_factor(step: int, warmup_steps: int, decay_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (the formula in the module docstring)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying `lr_factor`; its state (just the step count) goes into training checkpoints.

    NOTE: LambdaLR sets the lr for step 0 when it is built and for step s + 1 on `scheduler.step()` after the
    s-th update, so `optimizer.param_groups[0]["lr"]` is always the rate of the next update.
    """
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else total_steps
    factor = functools.partial(
        lr_factor, warmup_steps=cfg.warmup_steps, decay_steps=decay_steps, min_lr_ratio=cfg.min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
