"""`lmforge sft`: supervised fine-tuning on dialogues, Llama 2's recipe, as one loop you can read top to bottom.

Llama 2's SFT: start from the pretrained model; cosine schedule from 2e-5 (lmforge decays to 10% of it, as
everywhere else), weight decay 0.1, batches of 64 rows of 4096 tokens, 2 epochs; the loss is zeroed on the
prompt (system and user) tokens, so only answer tokens (and each answer's closing </s>) are learned; many
dialogues are packed into one row.

    rows     = whole dialogues packed into seq_len-token rows (packing.py), attention kept within each
               dialogue and rotary positions restarting at 0, so a packed dialogue trains as if alone
    one step = batch_size rows as accum micro-batches of micro_batch_size rows per rank
               loss = sum of CE over answer tokens / number of answer tokens in the global batch (lm_step.py)
    clip 1.0, stop if not finite, AdamW, schedule

Data (sft_data.py): .jsonl / .parquet files in OpenAI / TRL formats, checked line by line, mixed by weight,
tokenised once into a cache. Around the loop: the training harness (run folder, resume, SIGTERM, metrics,
summary, plot, export), as in pre-training. Returns the run folder; the model is in its model/.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from lmforge.align.packing import PackedDialogues, PackingStats, pack
from lmforge.align.sft_data import SFTDataConfig, SFTDataError, TokenizedSource, mix_epoch, tokenize_source
from lmforge.lora import LoraConfig
from lmforge.models.checkpoint import load_model
from lmforge.parallel import ParallelConfig, parallelize
from lmforge.train.config import RunConfig, TrainBase, TrainConfigError
from lmforge.train.evaluate import evaluate_loss, perplexity, split_batches
from lmforge.train import harness
from lmforge.train.lm_step import next_token_backward, trainable
from lmforge.train.metrics import SpikeDetector
from lmforge.train.optim import OptimConfig, build_optimizer, build_scheduler


@dataclass
class SFTTrainConfig(TrainBase):
    """Batch shape and length of fine-tuning (defaults: Llama 2's SFT).

    Attributes:
        batch_size: Packed rows per optimizer step over all ranks (Llama 2: 64). Must be a multiple of
            micro_batch_size * data-parallel ranks; the quotient is the number of accumulation micro-batches.
        micro_batch_size: Rows per forward pass on one rank.
        seq_len: Tokens per packed row (Llama 2: 4096); at most the model's max_seq_len. Longer dialogues are
            dropped and counted, never cut.
        epochs: Passes over the data mix (Llama 2: 2); the run's steps are the full batches they make.
        steps: Optimizer steps instead of `epochs` (the data repeats as needed).
    """

    batch_size: int = 64
    micro_batch_size: int = 1
    seq_len: int = 4096
    epochs: float = 2.0
    steps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "micro_batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not self.epochs > 0 or (self.steps is not None and self.steps < 1):
            raise TrainConfigError("train.epochs must be > 0 and train.steps None or >= 1")

    def grad_accum_steps(self, dp_size: int) -> int:
        per_pass = self.micro_batch_size * dp_size
        if self.batch_size % per_pass:
            raise TrainConfigError(f"train.batch_size ({self.batch_size}) must be a multiple of micro_batch_size * "
                                   f"data-parallel ranks = {self.micro_batch_size} * {dp_size} = {per_pass}")
        return self.batch_size // per_pass


# NOTE: Llama 2 gives the initial learning rate and the cosine shape, not a warm-up: none here.
SFT_OPTIM = OptimConfig(lr=2e-5, warmup_steps=0)


def sft(
    init_from: str,
    data: SFTDataConfig = SFTDataConfig(),
    train: SFTTrainConfig = SFTTrainConfig(),
    optim: OptimConfig = SFT_OPTIM,
    run: RunConfig = RunConfig(),
    parallel: ParallelConfig = ParallelConfig(),
    lora: LoraConfig = LoraConfig(),
) -> Path:
    """Fine-tune a model on dialogues, learning the answers only (Llama 2's SFT recipe as defaults).

    Args:
        init_from: Model folder to start from (ours or Hugging Face's); its tokenizer.model encodes the data
            unless data.tokenizer says otherwise.
        data: Dialogue files (jsonl / parquet, OpenAI or TRL format), their mixing weights, the held-out split.
        train: Rows per step, row length, epochs or steps, precision, device.
        optim: AdamW and the schedule (defaults: peak 2e-5, cosine to 10%, weight decay 0.1, no warm-up).
        run: Run folder (default runs/sft), checkpoints, validation, reporting.
        parallel: FSDP2 / DDP under torchrun, activation checkpointing, torch.compile.
        lora: Low-rank adapters (--lora.rank 16 ...): only they train, the base stays frozen (bf16 on CUDA);
            the run writes the adapters to RUN/adapter and the merged model to RUN/model. Rank 0: off.
    """
    from lmforge.tokenizer import Tokenizer

    if not data.sources:
        raise SFTDataError("data.sources is empty: give one or more dialogue files (--data.sources chat.jsonl)")
    place = harness.place_training(train, parallel.tensor_parallel)
    device, dp = place.device, place.dp
    accum = train.grad_accum_steps(dp.size)

    # ---- model and data ------------------------------------------------------------------------------
    # fp32 master weights, as in pre-training; a frozen LoRA base needs none, so it stays bf16 on CUDA
    dtype = torch.bfloat16 if lora.enabled and device.type == "cuda" else torch.float32
    net = load_model(init_from, device=device, dtype=dtype)
    if lora.enabled:
        from lmforge.lora import apply_lora

        apply_lora(net, lora, base_path=init_from)  # freezes every base parameter
    if train.seq_len > net.config.max_seq_len:
        raise TrainConfigError(f"train.seq_len ({train.seq_len}) exceeds the model's max_seq_len "
                               f"({net.config.max_seq_len})")
    tok_path = Path(data.tokenizer) if data.tokenizer else Path(init_from) / "tokenizer.model"
    if not tok_path.is_file():
        raise SFTDataError(f"no tokenizer: {tok_path} does not exist (pass --data.tokenizer PATH/tokenizer.model)")
    tokenizer = Tokenizer(tok_path)
    if tokenizer.vocab_size > net.config.vocab_size:
        raise SFTDataError(f"{tok_path} has {tokenizer.vocab_size} pieces, the model only {net.config.vocab_size}")
    sources = [tokenize_source(s, tokenizer, data.val_fraction, train.seed, data.cache_dir) for s in data.sources]
    train_loader, plan = _train_loader(sources, data, train, dp)
    per_epoch = len(train_loader.rows_of_epoch(0)) // train.batch_size
    total = train.steps or max(1, math.floor(per_epoch * train.epochs))
    if per_epoch == 0 and train.steps is None:
        raise TrainConfigError(f"one epoch packs into {len(train_loader.rows_of_epoch(0))} rows, fewer than one "
                               f"batch of {train.batch_size}: lower train.batch_size or set train.steps")

    train_net = parallelize(net, parallel, device, place.mesh)
    optimizer = build_optimizer(net, optim)
    scheduler = build_scheduler(optimizer, optim, total)
    config = {"init_from": init_from, "data": data, "train": train, "optim": optim, "run": run, "parallel": parallel,
              "lora": lora}
    state = harness.TrainState(modules={"model": net}, optimizers={"model": optimizer}, schedulers={"model": scheduler},
                       loaders={"train": train_loader}, counters={"step": 0, "tokens_seen": 0, "answer_tokens": 0})
    job = harness.open_run("sft", run, config, place, state, total,
                           spikes=SpikeDetector(train.spike_window, train.spike_sigmas))
    stats = plan(0)[1]
    tqdm.write(f"sft: {stats.dialogues} dialogues an epoch in {stats.rows} rows of {train.seq_len} "
               f"(packing efficiency {stats.efficiency(train.seq_len):.1%}, {stats.dropped} too long and dropped); "
               f"{total} steps of {train.batch_size} rows")
    val_loader = _validation_loader(sources, train, dp)

    def validate(at_step: int) -> None:
        if val_loader is None or run.eval_every == 0:
            return
        val_loader.cursor = 0
        loss, n = evaluate_loss(net, split_batches(val_loader, run.eval_batches), device=device,
                                precision=train.precision, loss_chunk=train.loss_chunk, document_masking=True,
                                group=dp.group)
        job.log(at_step, {"val/loss": loss, "val/perplexity": perplexity(loss), "val/tokens": n})
        tqdm.write(f"[step {at_step}] validation loss {loss:.4f} over {n} answer tokens")

    # ---- the loop -----------------------------------------------------------------------------------------
    params = trainable(net)
    if job.step == 0:
        validate(0)
    net.train()
    try:
        for step in range(job.step + 1, total + 1):
            job.profiler.before_step(step)
            t0 = time.perf_counter()
            read_before = train_loader.positions_read
            batches = [next(train_loader) for _ in range(accum)]
            losses = next_token_backward(train_net, net, batches, device=device, dp=dp, precision=train.precision,
                                         loss_chunk=train.loss_chunk, document_masking=True,
                                         poison=train.debug_nan_at_step == step)
            grad_norm = harness.clip_gradients(params, optim.grad_clip)
            harness.check_finite(job, step, losses.loss, grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            dt = time.perf_counter() - t0
            real = _global_sum(train_loader.positions_read - read_before, dp, device)  # positions that are not padding
            state.counters["tokens_seen"] += real
            state.counters["answer_tokens"] += losses.target_tokens
            rows_per_epoch = max(1, len(train_loader.rows_of_epoch(0)))
            record = {"loss": losses.loss, "lr": lr, "grad_norm": grad_norm, "answer_tokens": losses.target_tokens,
                      "tokens_per_s": real / dt, "epoch": train_loader.cursor / rows_per_epoch, "step_time_s": dt}
            job.log_step(step, record, show=("loss", "lr", "tokens_per_s"))
            job.profiler.after_step(step)

            if run.eval_every and (step % run.eval_every == 0 or step == total):
                validate(step)
            if harness.checkpoint_or_stop(job, step, total, state):
                job.close()
                return job.dir
    except BaseException:
        job.close()
        raise
    harness.finish_run(job, state, extra={"packing_efficiency": stats.efficiency(train.seq_len), "dropped_dialogues":
                                  stats.dropped, "dialogues_per_epoch": stats.dialogues})
    if run.save_model:
        harness.export_model(job, net, tok_path)
    return job.dir


def _global_sum(value: int, dp, device: torch.device) -> int:
    """`value` summed over the data-parallel ranks."""
    if dp.size == 1:
        return value
    t = torch.tensor(value, dtype=torch.int64, device=device)
    dist.all_reduce(t, group=dp.group)
    return int(t.item())


def _train_loader(sources: list[TokenizedSource], data: SFTDataConfig, train: SFTTrainConfig, dp):
    """The rows of the training mix (epoch e: mix_epoch, then pack with a seeded row shuffle), and plan(e)."""
    sizes = [len(s.lengths["train"]) for s in sources]
    if sum(sizes) == 0:
        raise SFTDataError("no training dialogues: every one went to the validation split (lower data.val_fraction)")
    weights = [s.source.weight if n else 0.0 for s, n in zip(sources, sizes)]
    per_epoch = data.epoch_dialogues or sum(sizes)

    def plan(epoch: int) -> tuple[list[list[tuple[int, int]]], PackingStats]:
        pairs = mix_epoch(sizes, weights, per_epoch, train.seed, epoch)  # (N, 2) (source, dialogue)
        lengths = [int(sources[s].lengths["train"][d]) for s, d in pairs]
        rows, stats = pack(lengths, train.seq_len, rng=np.random.default_rng([train.seed, epoch, 1]))
        return [[(int(pairs[i][0]), int(pairs[i][1])) for i in row] for row in rows], stats

    loader = PackedDialogues([s.stream("train") for s in sources], lambda e: plan(e)[0], train.seq_len,
                             train.micro_batch_size, dp.rank, dp.size)
    return loader, plan


def _validation_loader(sources: list[TokenizedSource], train: SFTTrainConfig, dp) -> PackedDialogues | None:
    """Every held-out dialogue of every source once, packed in file order (no shuffling)."""
    pairs = [(s, d) for s, src in enumerate(sources) for d in range(len(src.lengths["validation"]))]
    if not pairs:
        return None
    rows, _ = pack([int(sources[s].lengths["validation"][d]) for s, d in pairs], train.seq_len)
    rows = [[pairs[i] for i in row] for row in rows]
    if not rows:
        return None
    streams = [s.stream("validation") if len(s.lengths["validation"]) else None for s in sources]
    return PackedDialogues(streams, lambda e: rows, train.seq_len, train.micro_batch_size, dp.rank, dp.size)


__all__ = ["SFTTrainConfig", "sft"]
