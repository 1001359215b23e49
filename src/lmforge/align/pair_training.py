"""What the two trainers on preference pairs share (`lmforge rm train`, `lmforge dpo`): the train option group,
the model with optional LoRA, the tokenizer, the data and the step count, the learning-rate warm-up.

Each recipe keeps its own loop (align/rm.py, align/dpo.py); these are the pieces they build it from.

    batch_size        pairs per optimizer step over all ranks (Llama 2's reward models: 512 pairs = 1024 rows)
    micro_batch_size  pairs per forward on one rank (2 * micro_batch_size rows: both answers of each pair)
    accum             batch_size / (micro_batch_size * dp ranks) micro-batches per step
    steps             epochs * (pairs per epoch) // batch_size, or train.steps
    warm-up           max(optim.warmup_steps, ceil(train.warmup_fraction * steps)) (Llama 2: 3%, at least 5)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.align.preference_data import (
    PairLoader,
    PairSet,
    PreferenceDataConfig,
    PreferenceDataError,
    epoch_size,
    load_pair_sets,
)
from lmforge.align.preference_losses import MarginTable
from lmforge.align.sft import SFTTrainConfig
from lmforge.lora import LoraConfig
from lmforge.train.config import TrainConfigError
from lmforge.train.optim import OptimConfig


@dataclass
class PairTrainConfig(SFTTrainConfig):
    """Batch shape, length and length of training on preference pairs (defaults: Llama 2's reward models).

    Attributes:
        batch_size: Pairs per optimizer step over all ranks (Llama 2: 512 pairs, 1024 rows). Must be a
            multiple of micro_batch_size * data-parallel ranks; the quotient is the number of micro-batches.
        micro_batch_size: Pairs per forward pass on one rank (both answers of each: twice as many rows).
        seq_len: Longest sequence (prompt and answer) in tokens; a pair with a longer one is dropped and counted.
        epochs: Passes over the data mix (Llama 2: 1; more over-fits).
        steps: Optimizer steps instead of `epochs` (the data repeats as needed).
        warmup_fraction: Warm-up steps as a share of the run's steps; the warm-up is the larger of this and
            optim.warmup_steps (Llama 2: 3% of the steps, at least 5).
    """

    batch_size: int = 512
    micro_batch_size: int = 1
    seq_len: int = 4096
    epochs: float = 1.0
    steps: int | None = None
    warmup_fraction: float = 0.03

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.warmup_fraction < 1:
            raise TrainConfigError(f"train.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")


def with_warmup(optim: OptimConfig, train: PairTrainConfig, total: int) -> OptimConfig:
    """`optim` with the run's warm-up: max(optim.warmup_steps, ceil(warmup_fraction * total)), at most total."""
    steps = max(optim.warmup_steps, math.ceil(train.warmup_fraction * total))
    return dataclasses.replace(optim, warmup_steps=min(steps, total))


def load_trainable(init_from: str, lora: LoraConfig, device: torch.device, reward: bool, seed: int):
    """The model to train from `init_from`: fp32 master weights (a frozen LoRA base stays bf16 on CUDA); a
    reward model (`reward`: the trunk of init_from and a new head, `init_reward_model`) or a language model.
    Under LoRA only the adapters train, and a reward model's head, which is new, trains in full."""
    from lmforge.models.checkpoint import load_model

    dtype = torch.bfloat16 if lora.enabled and device.type == "cuda" else torch.float32
    if reward:
        from lmforge.align.reward_model import init_reward_model

        net = init_reward_model(init_from, device=device, dtype=dtype, seed=seed)
    else:
        net = load_model(init_from, device=device, dtype=dtype)
    if lora.enabled:
        from lmforge.lora import apply_lora

        apply_lora(net, lora, base_path=init_from)  # freezes every base parameter
        if reward:
            net.reward_head.to(torch.float32).requires_grad_(True)
    return net


def resolve_tokenizer(init_from: str, tokenizer: str | None, vocab_size: int):
    """(path, Tokenizer) of `tokenizer`, or of init_from/tokenizer.model; refused in one line if it is missing or
    has more pieces than the model's vocabulary."""
    from lmforge.tokenizer import Tokenizer

    path = Path(tokenizer) if tokenizer else Path(init_from) / "tokenizer.model"
    if not path.is_file():
        raise PreferenceDataError(f"no tokenizer: {path} does not exist (pass --data.tokenizer PATH/tokenizer.model)")
    tok = Tokenizer(path)
    if tok.vocab_size > vocab_size:
        raise PreferenceDataError(f"{path} has {tok.vocab_size} pieces, the model only {vocab_size}")
    return path, tok


@dataclass
class PairData:
    """The data side of a run on pairs: the tokenizer's path, the sources, the training loader, the run's steps
    and one epoch's size."""

    tokenizer_path: Path
    sets: list[PairSet]
    loader: PairLoader
    total: int
    per_epoch: int

    @property
    def dropped(self) -> int:
        return sum(s.dropped for s in self.sets)

    def next_step(self, accum: int, dp, device: torch.device) -> tuple[list, int]:
        """The `accum` micro-batches of this rank's part of one step, and the real (not padding) tokens of the
        whole step over all data-parallel ranks."""
        from lmforge.align.sft import _global_sum

        before = self.loader.tokens_read
        batches = [next(self.loader) for _ in range(accum)]
        return batches, _global_sum(self.loader.tokens_read - before, dp, device)

    @property
    def validation(self) -> list:
        """Every held-out pair of every source once, in file order."""
        return [p for s in self.sets for p in s.splits["validation"]]


def prepare_pairs(init_from: str, data: PreferenceDataConfig, train: PairTrainConfig, margin: MarginTable,
                  vocab_size: int, max_seq_len: int, dp) -> PairData:
    """Tokenise and mix the pairs of `data` for a run of `train` on the data-parallel rank `dp`."""
    if train.seq_len > max_seq_len:
        raise TrainConfigError(f"train.seq_len ({train.seq_len}) exceeds the model's max_seq_len ({max_seq_len})")
    tok_path, tok = resolve_tokenizer(init_from, data.tokenizer, vocab_size)
    sets = load_pair_sets(data, tok, train.seq_len, margin, train.seed)
    sizes = [len(s.splits["train"]) for s in sets]
    weights = [s.source.weight for s in sets]
    per_epoch = epoch_size(sizes, weights, data.epoch_pairs)
    loader = PairLoader(sets, weights, per_epoch, train.micro_batch_size, train.seed, dp.rank, dp.size)
    total = train.steps or math.floor(per_epoch * train.epochs / train.batch_size)
    if total < 1:
        raise TrainConfigError(f"an epoch holds {per_epoch} pairs, fewer than one batch of {train.batch_size}: lower "
                               "train.batch_size or set train.steps")
    return PairData(tok_path, sets, loader, total, per_epoch)


def finish_pair_run(job, state, net, pairs: PairData, save_model: bool, plot_keys: tuple[str, ...]) -> Path:
    """The end of a completed run on pairs: the summary (with the data's counts) and the plot of `plot_keys`, then
    the trained model in RUN/model with its tokenizer (harness.finish_run, harness.export_model); the run folder."""
    from lmforge.train import harness

    harness.finish_run(job, state, extra={"pairs_per_epoch": pairs.per_epoch, "dropped_pairs": pairs.dropped},
                       plot_keys=plot_keys)
    if save_model:
        harness.export_model(job, net, pairs.tokenizer_path)
    return job.dir


__all__ = ["PairData", "finish_pair_run", "PairTrainConfig", "load_trainable", "prepare_pairs", "resolve_tokenizer", "with_warmup"]
