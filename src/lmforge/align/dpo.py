"""`lmforge dpo`: Direct Preference Optimization on preference pairs, as one loop you can read top to bottom.

DPO (Rafailov et al. 2023) trains the policy on the pairs a reward model would be trained on, without the
reward model: the policy's log-probability ratio to a frozen reference (the SFT model) is its implicit reward,
and the loss is the Bradley-Terry loss of that reward (align/preference_losses.py, `dpo_loss`). Defaults are
the DPO paper's: beta 0.1, learning rate 1e-6 with 150 warm-up steps (lmforge then decays the cosine to 10%,
as everywhere else), batches of 64 pairs, one epoch; AdamW 0.9 / 0.95 with weight decay 0.1 and clipping 1.0
(the paper uses RMSprop).

    lmforge dpo runs/sft/model --data.sources [runs/prefs/helpfulness.jsonl,runs/prefs/safety.jsonl]

    before step 1  log pi_ref of both answers of every pair, once, into RUN/reference/ (align/reference_logps.py;
                   a resumed run reads them back, an interrupted pass continues from its finished chunks)
    one step       batch_size pairs as accum micro-batches of micro_batch_size pairs per rank; each micro-batch
                   is one forward of its 2m rows (chosen then rejected answers); log pi summed over answer tokens
                   loss = mean over the step's pairs of -log sigma(beta (log pi/pi_ref (y_c) - log pi/pi_ref (y_r)))
    clip, stop if not finite, AdamW, schedule; logged: implicit-reward accuracy and margin, rewards of each side

NOTE: the reference is the policy's starting point unless `ref_model` names another folder: then, and when
the cache must be rebuilt on a resumed run, the reference is loaded from its folder for the pass and freed.
Around the loop: the training harness (run folder, resume, SIGTERM, metrics, summary, plot, export), as in
`lmforge sft`. Returns the run folder; the trained policy is in its model/.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from lmforge.align.pair_training import PairTrainConfig, finish_pair_run, load_trainable, prepare_pairs, with_warmup
from lmforge.align.preference_data import PairBatch, PreferenceDataConfig, batches_of
from lmforge.align.preference_losses import dpo_loss
from lmforge.align.reference_logps import fill_reference, sequence_logprobs
from lmforge.lora import LoraConfig
from lmforge.parallel import ParallelConfig, parallelize
from lmforge.train import harness
from lmforge.train.config import RunConfig
from lmforge.train.evaluate import autocast_context
from lmforge.train.lm_step import trainable
from lmforge.train.metrics import SpikeDetector
from lmforge.train.optim import OptimConfig, build_optimizer, build_scheduler


@dataclass
class DPOLossConfig:
    """DPO's loss.

    Attributes:
        beta: Strength of the pull towards the reference (the KL penalty's coefficient in the objective DPO
            solves): the optimum is pi_ref(y) * exp(r(y) / beta), so a smaller beta moves further from it.
    """

    beta: float = 0.1

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"loss.beta must be > 0, got {self.beta}")


DPO_OPTIM = OptimConfig(lr=1e-6, warmup_steps=150)
DPO_TRAIN = PairTrainConfig(batch_size=64, warmup_fraction=0.0)


@dataclass
class DPOStats:
    """One step's means over its pairs: loss, implicit-reward accuracy and margin, each side's implicit reward."""

    loss: float
    accuracy: float
    margin: float
    chosen: float
    rejected: float


def dpo_backward(train_net, net, batches: list[PairBatch], *, device, dp, precision: str, beta: float, pairs: int,
                 loss_chunk: int, poison: bool = False) -> DPOStats:
    """Forward and backward every micro-batch of one step; gradients accumulate in the parameters.
    `pairs`: the pairs of the global batch, the loss's denominator."""
    totals = torch.zeros(5, device=device)  # summed loss, correct pairs, margins, chosen and rejected rewards
    for batch in batches:
        b = batch.to(device)
        m = len(b.pairs)
        with autocast_context(device, precision):
            logp = sequence_logprobs(train_net, net, b.tokens, b.mask, loss_chunk)  # (2m,)
        loss, r_c, r_r = dpo_loss(logp[:m], logp[m:], b.reference[:m], b.reference[m:], beta)
        loss_sum = loss * m
        if poison:
            loss_sum = loss_sum * math.nan
        (loss_sum * dp.size / pairs).backward()  # * dp.size: undo the wrappers' averaging over dp ranks
        r_c, r_r = r_c.detach(), r_r.detach()
        totals += torch.stack([loss_sum.detach(), (r_c > r_r).sum(), (r_c - r_r).sum(), r_c.sum(), r_r.sum()])
    if dp.size > 1:
        dist.all_reduce(totals, group=dp.group)
    return DPOStats(*(totals / pairs).tolist())


def dpo(init_from: str, data: PreferenceDataConfig = PreferenceDataConfig(), loss: DPOLossConfig = DPOLossConfig(),
        train: PairTrainConfig = DPO_TRAIN, optim: OptimConfig = DPO_OPTIM, run: RunConfig = RunConfig(),
        parallel: ParallelConfig = ParallelConfig(), lora: LoraConfig = LoraConfig(), ref_model: str | None = None):
    """Fine-tune a model on preference pairs with DPO against a frozen reference (`lmforge dpo`).

    Args:
        init_from: Model to start from (ours or Hugging Face's; normally the SFT model); its tokenizer.model
            encodes the data unless data.tokenizer says otherwise.
        data: Preference files (jsonl / parquet, TRL's format), their mixing weights, the held-out split.
        loss: beta of the DPO loss (0.1).
        train: Pairs per step (64), pairs per forward, longest sequence, epochs (1) or steps.
        optim: AdamW and the schedule (defaults: peak 1e-6, 150 warm-up steps, cosine to 10%).
        run: Run folder (default runs/dpo), checkpoints, validation, reporting.
        parallel: FSDP2 / DDP under torchrun, activation checkpointing, torch.compile.
        lora: Low-rank adapters (--lora.rank 16 ...): only they train; the run writes the adapters to RUN/adapter
            and the merged model to RUN/model. Rank 0: off.
        ref_model: The frozen reference model's folder; None: init_from (the policy's starting point).
    """
    from lmforge.lora import base_fingerprint, base_state_dict

    place = harness.place_training(train, parallel.tensor_parallel)
    device, dp = place.device, place.dp
    accum = train.grad_accum_steps(dp.size)

    # ---- model and data ------------------------------------------------------------------------------
    net = load_trainable(init_from, lora, device, reward=False, seed=train.seed)
    pairs = prepare_pairs(init_from, data, train, "none", net.config.vocab_size, net.config.max_seq_len, dp)
    total, loader = pairs.total, pairs.loader
    optim = with_warmup(optim, train, total)
    start_fingerprint = base_fingerprint(base_state_dict(net.state_dict()))  # before any update or sharding
    train_net = parallelize(net, parallel, device, place.mesh)
    optimizer, params = build_optimizer(net, optim), trainable(net)
    scheduler = build_scheduler(optimizer, optim, total)
    config = {"init_from": init_from, "ref_model": ref_model, "data": data, "loss": loss, "train": train,
              "optim": optim, "run": run, "parallel": parallel, "lora": lora}
    state = harness.TrainState(modules={"model": net}, optimizers={"model": optimizer},
                               schedulers={"model": scheduler}, loaders={"train": loader},
                               counters={"step": 0, "tokens_seen": 0, "pairs_seen": 0})
    job = harness.open_run("dpo", run, config, place, state, total,
                           spikes=SpikeDetector(train.spike_window, train.spike_sigmas))
    tqdm.write(f"dpo: {pairs.per_epoch} pairs an epoch from {len(pairs.sets)} sources ({pairs.dropped} longer than "
               f"{train.seq_len} tokens dropped); {total} steps of {train.batch_size} pairs, beta {loss.beta}")

    # ---- the reference's log-probs, once --------------------------------------------------------------
    net.train()  # (fill_reference switches a model to eval mode for its pass and back)
    cache = dict(device=device, precision=train.precision, batch_pairs=train.micro_batch_size,
                 loss_chunk=train.loss_chunk, is_main=job.is_main, progress=run.progress)
    if ref_model is None and job.step == 0:  # the policy has not moved yet: it is the reference
        fill_reference(pairs.sets, job.dir / "reference", net, start_fingerprint, **cache)
    else:
        from lmforge.models.checkpoint import load_model

        ref = load_model(ref_model or init_from, device=device, dtype=next(net.parameters()).dtype)
        fill_reference(pairs.sets, job.dir / "reference", ref, base_fingerprint(ref.state_dict()), **cache)
        del ref

    def validate(at_step: int) -> None:
        if not pairs.validation or run.eval_every == 0:
            return
        with torch.no_grad():
            s = dpo_figures(train_net, net, batches_of(pairs.validation, train.micro_batch_size), device,
                            train.precision, loss.beta, train.loss_chunk)
        job.log(at_step, {"val/loss": s.loss, "val/accuracy": s.accuracy, "val/margin": s.margin})
        tqdm.write(f"[step {at_step}] validation loss {s.loss:.4f}, implicit-reward accuracy {s.accuracy:.3f}")

    # ---- the loop -----------------------------------------------------------------------------------------
    if job.step == 0:
        validate(0)  # the reference itself: loss ln 2, every implicit reward 0
    with job:  # closes the run's progress bar, signal handlers and metric sinks however the loop ends
        for step in range(job.step + 1, total + 1):
            t0 = time.perf_counter()
            job.profiler.before_step(step)
            batches, tokens = pairs.next_step(accum, dp, device)
            s = dpo_backward(train_net, net, batches, device=device, dp=dp, precision=train.precision, beta=loss.beta,
                             pairs=train.batch_size, loss_chunk=train.loss_chunk, poison=train.debug_nan_at_step == step)
            grad_norm, lr = harness.apply_update(job, step, s.loss, params, optimizer, scheduler, optim.grad_clip)
            dt = time.perf_counter() - t0
            state.counters |= {"tokens_seen": state.counters["tokens_seen"] + tokens,
                               "pairs_seen": state.counters["pairs_seen"] + train.batch_size}
            job.log_step(step, {"loss": s.loss, "reward_accuracy": s.accuracy, "reward_margin": s.margin,
                                "reward_chosen": s.chosen, "reward_rejected": s.rejected, "lr": lr,
                                "grad_norm": grad_norm, "tokens_per_s": tokens / dt, "step_time_s": dt},
                         show=("loss", "reward_accuracy", "lr", "tokens_per_s"))
            if harness.end_step(job, step, total, state, validate):
                return job.dir
    return finish_pair_run(job, state, net, pairs, run.save_model, plot_keys=("loss", "reward_accuracy", "val/loss", "val/accuracy"))


def dpo_figures(train_net, net, batches: list[PairBatch], device, precision: str, beta: float,
                loss_chunk: int) -> DPOStats:
    """The DPO figures of `batches` without gradients (validation): means over their pairs."""
    rows = []
    for batch in batches:
        b = batch.to(device)
        m = len(b.pairs)
        with autocast_context(device, precision):
            logp = sequence_logprobs(train_net, net, b.tokens, b.mask, loss_chunk)
        rows.append(torch.stack([logp[:m], logp[m:], b.reference[:m], b.reference[m:]], dim=1))
    r = torch.cat(rows)  # (P, 4)
    loss, r_c, r_r = dpo_loss(r[:, 0], r[:, 1], r[:, 2], r[:, 3], beta)
    return DPOStats(loss.item(), (r_c > r_r).float().mean().item(), (r_c - r_r).mean().item(), r_c.mean().item(),
                    r_r.mean().item())


__all__ = ["DPOLossConfig", "DPOStats", "DPO_OPTIM", "DPO_TRAIN", "dpo", "dpo_backward"]
