"""`lmforge rm train`: a reward model from preference pairs, Llama 2's recipe, as one loop you can read top to bottom.

Llama 2's reward models (section 3.2.2): start from a chat checkpoint (here: the SFT model) with the next-token
head replaced by a regression head (align/reward_model.py); train one epoch (more over-fits) on pairs with the
ranking loss and a margin per degree of preference (align/preference_losses.py); the base model's AdamW
(0.9, 0.95, eps 1e-5, weight decay 0.1, clipping 1.0); peak learning rate 1e-5 (5e-6 at 70B), cosine down to
10%, warm-up 3% of the steps and at least 5; batches of 512 pairs (1024 rows). Two of them, each from its own
mix of the sources (align/preference_data.py):

    lmforge rm train runs/sft/model --data.sources [runs/prefs/helpfulness.jsonl,runs/prefs/safety.jsonl] \
        --run.dir runs/rm-helpfulness                                  # all helpfulness, as many safety pairs
    lmforge rm train runs/sft/model --config safety-rm.yaml            # sources safety (0.9), helpfulness (0.1)

    one step = batch_size pairs as accum micro-batches of micro_batch_size pairs per rank; each micro-batch
               is one forward of its 2m sequences (the chosen then the rejected answers), rewards read at
               each sequence's last token
               loss = mean over the step's pairs of -log sigma(r_c - r_r - m(degree))
    clip 1.0, stop if not finite, AdamW, schedule

Around the loop: the training harness (run folder, resume, SIGTERM, metrics, summary, plot, export), as in
`lmforge sft`. Returns the run folder; the reward model is in its model/ (our format, `head: reward`; `lmforge
convert RUN/model DST --to hf` exports it as a *ForSequenceClassification).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from lmforge.align.pair_training import PairTrainConfig, finish_pair_run, load_trainable, prepare_pairs, with_warmup
from lmforge.align.preference_data import (
    PairBatch,
    PreferenceDataConfig,
    PreferenceDataError,
    PreferenceSource,
    batches_of,
)
from lmforge.align.preference_losses import MarginTable, ranking_loss
from lmforge.align.reward_model import sequence_rewards
from lmforge.lora import LoraConfig
from lmforge.parallel import ParallelConfig, parallelize
from lmforge.train.config import RunConfig
from lmforge.train.evaluate import autocast_context
from lmforge.train import harness
from lmforge.train.lm_step import trainable
from lmforge.train.metrics import SpikeDetector
from lmforge.train.optim import OptimConfig, build_optimizer, build_scheduler


@dataclass
class RMLossConfig:
    """The ranking loss.

    Attributes:
        margin: The margin m(degree) subtracted from the reward gap: Llama 2's "small" (1, 2/3, 1/3, 0) or
            "large" (3, 2, 1, 0) table over significantly / better / slightly / negligibly better, "none" (0),
            or "column" (each pair's own numeric `margin` field, as TRL's RewardTrainer reads it).
    """

    margin: MarginTable = "small"


# NOTE: the rest of the base model's AdamW (betas 0.9 / 0.95, eps 1e-5, weight decay 0.1, clip 1.0) is
# OptimConfig's default; the warm-up is max(warmup_steps, 3% of the steps): at least 5.
RM_OPTIM = OptimConfig(lr=1e-5, warmup_steps=5)


@dataclass
class PairStats:
    """What one step measured: the mean loss and accuracy (r_c > r_r) over its pairs, the mean reward gap."""

    loss: float
    accuracy: float
    margin: float


def ranking_backward(train_net, batches: list[PairBatch], *, device, dp, precision: str, pairs: int,
                     poison: bool = False) -> PairStats:
    """Forward and backward every micro-batch of one step (the rewards of its 2m rows in one forward);
    gradients accumulate in the parameters. `pairs`: the pairs of the global batch, the loss's denominator."""
    totals = torch.zeros(3, device=device)  # summed loss, correct pairs, reward gaps
    for batch in batches:
        b = batch.to(device)
        m = len(b.pairs)
        with autocast_context(device, precision):
            rewards = sequence_rewards(train_net, b.tokens, b.lengths)  # (2m,): chosen then rejected
        chosen, rejected = rewards[:m], rewards[m:]
        loss_sum = ranking_loss(chosen, rejected, b.margin) * m
        if poison:
            loss_sum = loss_sum * math.nan
        # NOTE: data-parallel wrappers average gradients over dp ranks; * dp.size undoes that, so the gradient
        # is that of the mean over the global batch's pairs.
        (loss_sum * dp.size / pairs).backward()
        gap = (chosen - rejected).detach()
        totals += torch.stack([loss_sum.detach(), (gap > 0).sum(), gap.sum()])
    if dp.size > 1:
        dist.all_reduce(totals, group=dp.group)
    loss, correct, gaps = (totals / pairs).tolist()
    return PairStats(loss, correct, gaps)


@torch.no_grad()
def evaluate_pairs(net, batches: list[PairBatch], device, precision: str) -> dict[str, float]:
    """Mean ranking loss (no margin), accuracy and reward gap over the pairs of `batches`."""
    rows = []
    for batch in batches:
        b = batch.to(device)
        m = len(b.pairs)
        with autocast_context(device, precision):
            rewards = sequence_rewards(net, b.tokens, b.lengths)
        rows.append(torch.stack([rewards[:m], rewards[m:]], dim=1))
    r = torch.cat(rows)  # (P, 2)
    gap = r[:, 0] - r[:, 1]
    return {"loss": ranking_loss(r[:, 0], r[:, 1]).item(), "accuracy": (gap > 0).float().mean().item(),
            "margin": gap.mean().item(), "pairs": len(r)}


def rm_train(init_from: str, data: PreferenceDataConfig = PreferenceDataConfig(), loss: RMLossConfig = RMLossConfig(),
             train: PairTrainConfig = PairTrainConfig(), optim: OptimConfig = RM_OPTIM, run: RunConfig = RunConfig(),
             parallel: ParallelConfig = ParallelConfig(), lora: LoraConfig = LoraConfig()):
    """Train a reward model on preference pairs (Llama 2's recipe as defaults): `lmforge rm train`.

    Args:
        init_from: Model to start from: a language model folder (ours or Hugging Face's; an SFT checkpoint),
            whose next-token head is replaced by a new reward head, or a reward model to train further. Its
            tokenizer.model encodes the data unless data.tokenizer says otherwise.
        data: Preference files (jsonl / parquet, TRL's format), their mixing weights, the held-out split.
        loss: The margin table of the ranking loss (small, large, none, or each pair's margin column).
        train: Pairs per step (512), pairs per forward, longest sequence, epochs (1) or steps, warm-up share.
        optim: AdamW and the schedule (defaults: peak 1e-5, cosine to 10%, warm-up 3% and at least 5 steps).
        run: Run folder (default runs/rm-train), checkpoints, validation, reporting.
        parallel: FSDP2 / DDP under torchrun, activation checkpointing, torch.compile.
        lora: Low-rank adapters (--lora.rank 16 ...): only they and the reward head train; the run writes the
            merged reward model to RUN/model. Rank 0: off.
    """
    place = harness.place_training(train, parallel.tensor_parallel)
    device, dp = place.device, place.dp
    accum = train.grad_accum_steps(dp.size)

    # ---- model and data ------------------------------------------------------------------------------
    net = load_trainable(init_from, lora, device, reward=True, seed=train.seed)
    pairs = prepare_pairs(init_from, data, train, loss.margin, net.config.vocab_size, net.config.max_seq_len, dp)
    total, loader = pairs.total, pairs.loader
    optim = with_warmup(optim, train, total)
    train_net = parallelize(net, parallel, device, place.mesh)
    optimizer = build_optimizer(net, optim)
    scheduler = build_scheduler(optimizer, optim, total)
    config = {"init_from": init_from, "data": data, "loss": loss, "train": train, "optim": optim, "run": run,
              "parallel": parallel, "lora": lora}
    state = harness.TrainState(modules={"model": net}, optimizers={"model": optimizer}, schedulers={"model": scheduler},
                       loaders={"train": loader}, counters={"step": 0, "tokens_seen": 0, "pairs_seen": 0})
    job = harness.open_run("rm train", run, config, place, state, total, spikes=SpikeDetector(train.spike_window, train.spike_sigmas))
    tqdm.write(f"rm: {pairs.per_epoch} pairs an epoch from {len(pairs.sets)} sources ({pairs.dropped} longer than "
               f"{train.seq_len} tokens dropped); {total} steps of {train.batch_size} pairs, warm-up "
               f"{optim.warmup_steps}, margin {loss.margin}")

    def validate(at_step: int) -> None:
        if not pairs.validation or run.eval_every == 0:
            return
        net.eval()
        figures = evaluate_pairs(train_net, batches_of(pairs.validation, train.micro_batch_size), device,
                                 train.precision)
        net.train()
        job.log(at_step, {f"val/{k}": v for k, v in figures.items()})
        tqdm.write(f"[step {at_step}] validation loss {figures['loss']:.4f}, accuracy {figures['accuracy']:.3f} "
                   f"over {figures['pairs']} pairs")

    # ---- the loop -----------------------------------------------------------------------------------------
    params = trainable(net)
    if job.step == 0:
        validate(0)
    net.train()
    with job:  # closes the run's progress bar, signal handlers and metric sinks however the loop ends
        for step in range(job.step + 1, total + 1):
            job.profiler.before_step(step)
            t0 = time.perf_counter()
            batches, tokens = pairs.next_step(accum, dp, device)
            stats = ranking_backward(train_net, batches, device=device, dp=dp, precision=train.precision,
                                     pairs=train.batch_size, poison=train.debug_nan_at_step == step)
            grad_norm, lr = harness.apply_update(job, step, stats.loss, params, optimizer, scheduler, optim.grad_clip)
            dt = time.perf_counter() - t0
            state.counters["tokens_seen"] += tokens
            state.counters["pairs_seen"] += train.batch_size
            job.log_step(step, {"loss": stats.loss, "accuracy": stats.accuracy, "reward_margin": stats.margin,
                                "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / dt,
                                "epoch": loader.cursor / pairs.per_epoch, "step_time_s": dt},
                         show=("loss", "accuracy", "lr", "tokens_per_s"))
            if harness.end_step(job, step, total, state, validate):
                return job.dir
    return finish_pair_run(job, state, net, pairs, run.save_model, plot_keys=("loss", "accuracy", "val/loss", "val/accuracy"))


# Llama 2's two mixes of the sources (`preferences collect` writes helpfulness.jsonl and safety.jsonl): the first
# source of each is read once an epoch, the others in proportion to the weights (align/preference_data.py).
MIXES = {"helpfulness": (("helpfulness", 1.0), ("safety", 1.0)), "safety": (("safety", 0.9), ("helpfulness", 0.1))}


def train_reward_model(init_from: str, kind: str, preferences: str | Path, run_dir: str | Path, **options) -> Path:
    """`rm_train` of Llama 2's Helpfulness (`kind` "helpfulness") or Safety ("safety") reward model on the files of a
    `preferences collect` folder, into `run_dir`; `options`: rm_train's other groups (train=, optim=, loss=, ...)
    and `data_options` for PreferenceDataConfig's other fields. Returns the run folder (the model is in model/)."""
    if kind not in MIXES:
        raise PreferenceDataError(f"kind must be one of {', '.join(MIXES)}, got {kind!r}")
    sources = [PreferenceSource(str(Path(preferences) / f"{name}.jsonl"), weight) for name, weight in MIXES[kind]]
    data = PreferenceDataConfig(sources=sources, **options.pop("data_options", {}))
    run = dataclasses.replace(options.pop("run", RunConfig()), dir=str(run_dir))
    return rm_train(init_from, data=data, run=run, **options)


__all__ = ["MIXES", "PairStats", "RMLossConfig", "RM_OPTIM", "evaluate_pairs", "ranking_backward", "rm_train", "train_reward_model"]
