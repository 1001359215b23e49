"""`lmforge pretrain`: next-token pre-training with Llama 2's recipe, as one loop you can read top to bottom.

One optimizer step (losses.py for the normalisation; lm_step.py for the passes):

    batches  = accum micro-batches of micro_batch_size x seq_len tokens from the packed loader
    n_tokens = target tokens in all of them, summed over dp ranks         (counted before any backward)
    for each micro-batch:  (CE_sum * dp_size / n_tokens + router_aux / accum).backward()
    clip the global gradient norm to 1.0; stop if the loss or the norm is not finite
    AdamW step; lr for the next step from the warm-up + cosine schedule

Around it, the training harness (harness.py): the run folder, metrics, validation, checkpoints that resume
bit-for-bit, SIGTERM / Ctrl-C / stop_at, the end-of-run summary and plot, and the export of the model.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge.data.loader import PackedLoader
from lmforge.data.shards import read_manifest
from lmforge.models.checkpoint import load_model
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.parallel import ParallelConfig, parallelize
from lmforge.train.config import DataConfig, RunConfig, TrainConfig, TrainConfigError
from lmforge.train.evaluate import check_vocabulary, evaluate_loss, perplexity, split_batches
from lmforge.train import harness
from lmforge.train.lm_step import next_token_backward, trainable
from lmforge.train.metrics import SpikeDetector, flops_per_token, peak_flops
from lmforge.train.optim import OptimConfig, build_optimizer, build_scheduler

__all__ = ["pretrain"]


def pretrain(
    model: ModelConfig | None = None,
    preset: str | None = None,
    init_from: str | None = None,
    data: DataConfig = DataConfig(),
    train: TrainConfig = TrainConfig(),
    optim: OptimConfig = OptimConfig(),
    run: RunConfig = RunConfig(),
    parallel: ParallelConfig = ParallelConfig(),
) -> Path:
    """Pre-train a language model on token shards (Llama 2's recipe; configs/*.yaml hold scaled-down runs).

    Give the model in exactly one way: `model` (its fields, in a config file or as --model.dim ...), `preset`
    (a name from lmforge.models.config.PRESETS) or `init_from` (a folder in our format or Hugging Face's, to
    continue training from its weights). Returns the run folder; the trained model is in its model/.

    Args:
        model: Shapes of a new, randomly initialised model.
        preset: Name of a preset model (tiny, tiny-moe, llama2-7b, ...) to initialise randomly.
        init_from: Model folder (ours or Hugging Face) whose weights and shapes to start from.
        data: Token shards.
        train: Steps, batch, precision, safety nets.
        optim: AdamW and the learning-rate schedule.
        run: Run folder, checkpoints, validation, reporting.
        parallel: Data parallelism (FSDP2 / DDP under torchrun), activation checkpointing, torch.compile.
    """
    # ---- where we run, and how the global batch splits -----------------------------------------------
    place = harness.place_training(train, parallel.tensor_parallel)
    device, dp = place.device, place.dp
    accum = train.grad_accum_steps(dp.size)

    # ---- model, optimizer, schedule, data --------------------------------------------------------------
    net = _build_model(model, preset, init_from, device)
    # `train_net` is what the loop calls: `net` itself (FSDP2 shards it in place) or its DDP wrapper.
    # `net` keeps the Transformer's attributes (config, output projection) and serves evaluation.
    train_net = parallelize(net, parallel, device, place.mesh)
    manifest = read_manifest(data.dir)
    check_vocabulary(manifest, net.config.vocab_size, data.dir)
    if train.seq_len > net.config.max_seq_len:
        raise TrainConfigError(f"train.seq_len ({train.seq_len}) exceeds model.max_seq_len ({net.config.max_seq_len})")
    optimizer = build_optimizer(net, optim)
    scheduler = build_scheduler(optimizer, optim, train.steps)
    loader = PackedLoader(data.dir, split=data.train_split, seq_len=train.seq_len, batch_size=train.micro_batch_size,
                          rank=dp.rank, world_size=dp.size, seed=train.seed)

    # ---- run folder; resume ----------------------------------------------------------------------------
    # The resolved configuration: a preset is written out as its shapes, so the file alone reruns the run.
    config = {"model": None if init_from else net.config, "init_from": init_from, "data": data, "train": train,
              "optim": optim, "run": run, "parallel": parallel}
    state = harness.TrainState(modules={"model": net}, optimizers={"model": optimizer}, schedulers={"model": scheduler},
                       loaders={"train": loader})
    job = harness.open_run("pretrain", run, config, place, state, train.steps,
                   spikes=SpikeDetector(train.spike_window, train.spike_sigmas))

    def validate(at_step: int) -> None:
        if data.val_split is None or run.eval_every == 0:
            return
        val = PackedLoader(data.dir, split=data.val_split, seq_len=train.seq_len, batch_size=train.micro_batch_size,
                           rank=dp.rank, world_size=dp.size, shuffle=False)
        loss, n = evaluate_loss(net, split_batches(val, run.eval_batches), device=device,
                                precision=train.precision, loss_chunk=train.loss_chunk,
                                document_masking=data.document_masking, group=dp.group)
        job.log(at_step, {"val/loss": loss, "val/perplexity": perplexity(loss), "val/tokens": n})
        tqdm.write(f"[step {at_step}] validation loss {loss:.4f}, perplexity {perplexity(loss):.2f} ({n} tokens)")

    # ---- the loop -----------------------------------------------------------------------------------------
    flops = flops_per_token(net, train.seq_len)
    peak = peak_flops(device, run.peak_tflops)
    params = trainable(net)
    if job.step == 0:
        validate(0)
    net.train()
    try:
        for step in range(job.step + 1, train.steps + 1):
            job.profiler.before_step(step)
            t0 = time.perf_counter()
            batches = [next(loader) for _ in range(accum)]
            losses = next_token_backward(train_net, net, batches, device=device, dp=dp, precision=train.precision,
                                         loss_chunk=train.loss_chunk, document_masking=data.document_masking,
                                         poison=train.debug_nan_at_step == step)
            grad_norm = harness.clip_gradients(params, optim.grad_clip)
            harness.check_finite(job, step, losses.loss, grad_norm)
            lr = optimizer.param_groups[0]["lr"]  # the rate this update uses (optim.build_scheduler)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.counters["tokens_seen"] += train.global_batch_tokens

            # ---- report --------------------------------------------------------------------------------
            dt = time.perf_counter() - t0
            tok_s = train.global_batch_tokens / dt
            mfu = tok_s / place.world_size * flops / peak if peak else None
            record = {"loss": losses.loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_seen": state.counters["tokens_seen"], "tokens_per_s": tok_s, "mfu": mfu,
                      "step_time_s": dt}
            if net.config.moe is not None:
                record |= {"aux/load_balance": losses.load_balance, "aux/z_loss": losses.z_loss}
            job.log_step(step, record, show=("loss", "lr", "tokens_per_s", "mfu"))
            job.profiler.after_step(step)

            if run.eval_every and (step % run.eval_every == 0 or step == train.steps):
                validate(step)
            if harness.checkpoint_or_stop(job, step, train.steps, state):
                job.close()
                return job.dir
    except BaseException:
        job.close()
        raise
    harness.finish_run(job, state)
    if run.save_model:
        recorded = manifest.get("tokenizer")  # the tokenizer that made the shards, if it is still there
        harness.export_model(job, net, data.tokenizer or (recorded if recorded and Path(recorded).exists() else None))
    return job.dir


def _build_model(
    model: ModelConfig | None, preset: str | None, init_from: str | None, device: torch.device
) -> Transformer:
    """The model from exactly one of `model`, `preset`, `init_from`; new ones built on meta, then initialised."""
    given = [name for name, v in (("model", model), ("preset", preset), ("init_from", init_from)) if v is not None]
    if len(given) != 1:
        raise TrainConfigError(f"give exactly one of model, preset, init_from (got {given or 'none'})")
    if init_from is not None:
        return load_model(init_from, device=device, dtype=torch.float32)
    config = model if model is not None else ModelConfig.from_name(preset)
    with torch.device("meta"):
        net = Transformer(config)
    net.to_empty(device=device)
    net.init_weights()  # draws from the generator seeded with train.seed
    return net
