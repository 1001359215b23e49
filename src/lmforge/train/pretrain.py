"""`lmforge pretrain`: next-token pre-training with Llama 2's recipe, as one loop you can read top to bottom.

One optimizer step (REFERENCE.md section 3; losses.py for the normalisation):

    batches  = accum micro-batches of micro_batch_size x seq_len tokens from the packed loader
    n_tokens = target tokens in all of them, summed over dp ranks         (counted before any backward)
    for each micro-batch:  (CE_sum * dp_size / n_tokens + router_aux / accum).backward()
    clip the global gradient norm to 1.0; stop if the loss or the norm is not finite
    AdamW step; lr for the next step from the warm-up + cosine schedule

Around it: the run folder (runinfo.py), metrics (metrics.py), validation (evaluate.py) and checkpoints that
resume bit-for-bit (checkpointing.py). SIGTERM (a scheduler's pre-emption notice) saves a checkpoint at the
next step boundary and returns normally; `--run.resume auto` continues the same curve.
"""

from __future__ import annotations

import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from lmforge.data.loader import PackedLoader
from lmforge.data.shards import read_manifest
from lmforge.models.checkpoint import load_model, save_model
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.train.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from lmforge.train.config import DataConfig, RunConfig, TrainConfig, TrainConfigError
from lmforge.train.evaluate import autocast_context, check_vocabulary, evaluate_loss, perplexity, split_batches
from lmforge.train.linear_ce import linear_cross_entropy
from lmforge.train.losses import global_target_tokens
from lmforge.train.metrics import MetricsLogger, SpikeDetector, flops_per_token, peak_flops
from lmforge.train.optim import OptimConfig, build_optimizer, build_scheduler
from lmforge.train.profiling import StepProfiler
from lmforge.parallel import (
    ParallelConfig,
    clip_grad_norm_,
    data_parallel_rank,
    full_model_state_dict,
    init_distributed,
    parallelize,
    training_mesh,
)
from lmforge.train.runinfo import to_plain, write_run_info


class NonFiniteLossError(ValueError):
    """The loss or gradient norm of a step was NaN or infinite; the step was not applied.

    NOTE: a ValueError, so that `lmforge pretrain` ends with this one message (exit status 2) rather than a
    traceback, like the other errors a user acts on by changing the configuration (usually optim.lr).
    """


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
    device = torch.device(train.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world_size = init_distributed(device.type)  # (0, 1) without torchrun
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    mesh = training_mesh(device, parallel.tensor_parallel)  # (dp, tp) ranks; None for one process
    dp = data_parallel_rank(mesh)  # which batch this rank reads; tp ranks of one dp rank read the same
    accum = train.grad_accum_steps(dp.size)
    if data.dir is None:
        raise TrainConfigError("data.dir is required: a folder written by `lmforge data prepare`")
    if train.threads is not None:
        torch.set_num_threads(train.threads)
    if train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(train.seed)
    random.seed(train.seed)
    np.random.seed(train.seed)

    # ---- model, optimizer, schedule, data --------------------------------------------------------------
    net = _build_model(model, preset, init_from, device)
    # `train_net` is what the loop calls: `net` itself (FSDP2 shards it in place) or its DDP wrapper.
    # `net` keeps the Transformer's attributes (config, output projection) and serves evaluation.
    train_net = parallelize(net, parallel, device, mesh)
    manifest = read_manifest(data.dir)
    check_vocabulary(manifest, net.config.vocab_size, data.dir)
    if train.seq_len > net.config.max_seq_len:
        raise TrainConfigError(f"train.seq_len ({train.seq_len}) exceeds model.max_seq_len ({net.config.max_seq_len})")
    optimizer = build_optimizer(net, optim)
    scheduler = build_scheduler(optimizer, optim, train.steps)
    loader = PackedLoader(data.dir, split=data.train_split, seq_len=train.seq_len, batch_size=train.micro_batch_size,
                          rank=dp.rank, world_size=dp.size, seed=train.seed)

    # ---- run folder; resume -------------------------------------------------------------------------
    run_dir = Path(run.dir)
    ckpt_root = run_dir / "checkpoints"
    resume_from = _resume_point(run.resume, ckpt_root)
    step, tokens_seen = 0, 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, net, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        step, tokens_seen = state["step"], state["tokens_seen"]
    # The resolved configuration: a preset is written out as its shapes, so the file alone reruns the run.
    config = {"model": None if init_from else net.config, "init_from": init_from, "data": data, "train": train,
              "optim": optim, "run": run, "parallel": parallel}
    if rank == 0:
        write_run_info(run_dir, config, device=str(device))
    logger = MetricsLogger(run_dir, enabled=rank == 0, tensorboard=run.tensorboard, wandb_project=run.wandb_project,
                           resume_step=step if resume_from is not None else None, config=to_plain(config))
    if resume_from is not None:
        logger.event(step, "resume", f"continuing from {resume_from}")

    def validate(at_step: int) -> None:
        if data.val_split is None or run.eval_every == 0:
            return
        val = PackedLoader(data.dir, split=data.val_split, seq_len=train.seq_len, batch_size=train.micro_batch_size,
                           rank=dp.rank, world_size=dp.size, shuffle=False)
        loss, n = evaluate_loss(net, split_batches(val, run.eval_batches), device=device,
                                precision=train.precision, loss_chunk=train.loss_chunk,
                                document_masking=data.document_masking, group=dp.group)
        logger.log(at_step, {"val/loss": loss, "val/perplexity": perplexity(loss), "val/tokens": n})
        tqdm.write(f"[step {at_step}] validation loss {loss:.4f}, perplexity {perplexity(loss):.2f} ({n} tokens)")

    # ---- the loop -----------------------------------------------------------------------------------------
    flops = flops_per_token(net, train.seq_len)
    peak = peak_flops(device, run.peak_tflops)
    spikes = SpikeDetector(train.spike_window, train.spike_sigmas)
    stop = _SigtermFlag()
    profiler = StepProfiler(run_dir, run.profile_at, run.profile_steps, enabled=rank == 0, device=device)
    params = [p for p in net.parameters() if p.requires_grad]
    bar = tqdm(total=train.steps, initial=step, desc="pretrain", disable=not run.progress or rank != 0,
               dynamic_ncols=True)
    if step == 0:
        validate(0)
    net.train()
    try:
        while step < train.steps:
            profiler.before_step(step + 1)
            t0 = time.perf_counter()
            batches = [next(loader) for _ in range(accum)]
            # Count every target token of the global batch first, so each micro-batch's loss can be divided
            # by the same number and the accumulated gradient is the gradient of the global mean (losses.py).
            # (clamped: a global batch without a single target, possible with loss masks, then trains nothing)
            n_tokens = global_target_tokens([b.loss_mask.to(device) for b in batches], dp.group).clamp(min=1)
            loss_sum = torch.zeros((), device=device)
            aux = torch.zeros(2, device=device)  # load-balance, z-loss; mean over micro-batches
            for batch in batches:
                inputs, targets, mask = (t.to(device, non_blocking=True)
                                         for t in (batch.inputs, batch.targets, batch.loss_mask))
                doc = batch.document_ids.to(device) if data.document_masking else None
                with autocast_context(device, train.precision):
                    hidden, router = train_net(inputs, document_ids=doc, return_hidden=True, return_aux=True)
                    ce_sum = linear_cross_entropy(hidden, net.output.weight, targets, mask, train.loss_chunk)
                if train.debug_nan_at_step == step + 1:
                    ce_sum = ce_sum * math.nan  # the test hook of the non-finite stop
                # NOTE: data-parallel wrappers average gradients over dp ranks; * dp.size undoes that, so the
                # gradient is of sum / n_tokens with n_tokens counted over all dp ranks.
                objective = ce_sum * dp.size / n_tokens + router.total / accum
                objective.backward()
                loss_sum += ce_sum.detach()
                aux += torch.stack([router.load_balance.detach(), router.z_loss.detach()]) / accum
            if dp.size > 1:
                dist.all_reduce(loss_sum, group=dp.group)
            max_norm = optim.grad_clip if optim.grad_clip > 0 else math.inf
            grad_norm = clip_grad_norm_(params, max_norm).item()
            loss = (loss_sum / n_tokens).item()

            # Safety net: a non-finite loss or gradient norm stops before the update, so the parameters and
            # the newest checkpoint stay as the last good step left them.
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                last = latest_checkpoint(ckpt_root)
                message = (f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step + 1}; the update "
                           f"was not applied. Last good checkpoint: {last or 'none'}")
                logger.event(step + 1, "non_finite", message)
                raise NonFiniteLossError(message)

            lr = optimizer.param_groups[0]["lr"]  # the rate this update uses (optim.build_scheduler)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += train.global_batch_tokens

            # ---- report --------------------------------------------------------------------------------
            dt = time.perf_counter() - t0
            tok_s = train.global_batch_tokens / dt
            mfu = tok_s / world_size * flops / peak if peak else None
            record = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_seen": tokens_seen,
                      "tokens_per_s": tok_s, "mfu": mfu, "step_time_s": dt}
            if net.config.moe is not None:
                record |= {"aux/load_balance": aux[0].item(), "aux/z_loss": aux[1].item()}
            logger.log(step, record)
            is_spike, threshold = spikes.update(loss)
            if is_spike:
                logger.event(step, "loss_spike", f"loss {loss:.4f} above {threshold:.4f} (mean + "
                             f"{train.spike_sigmas} std of the last {train.spike_window} steps)",
                             loss=loss, threshold=threshold)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
                            mfu=f"{mfu:.1%}" if mfu is not None else "n/a", refresh=False)
            bar.update(1)
            profiler.after_step(step)

            if run.eval_every and (step % run.eval_every == 0 or step == train.steps):
                validate(step)
            periodic = run.checkpoint_every > 0 and (step % run.checkpoint_every == 0 or step == train.steps)
            stopping = step < train.steps and (stop.requested or step == run.stop_at)
            if periodic or stopping:
                train_state = {"step": step, "tokens_seen": tokens_seen, "scheduler": scheduler.state_dict(),
                               "loader": loader.state_dict(), "config": to_plain(config)}
                path = save_checkpoint(ckpt_root, step, net, optimizer, train_state, keep=run.keep_checkpoints)
                if stopping:
                    logger.event(step, "sigterm" if stop.requested else "stop_at",
                                 f"saved {path}; continue with --run.resume auto")
                    return run_dir
    finally:
        profiler.close()
        bar.close()
        stop.restore()
        logger.close()

    if not run.save_model:
        return run_dir
    # Gathered to full tensors on every rank (a collective under FSDP2), written by rank 0 alone.
    full_state = full_model_state_dict(net)
    if rank == 0:
        recorded = manifest.get("tokenizer")  # the tokenizer that made the shards, if it is still there
        tokenizer = data.tokenizer or (recorded if recorded and Path(recorded).exists() else None)
        save_model(net, run_dir / "model", tokenizer_path=tokenizer, state_dict=full_state)
        tqdm.write(f"saved the trained model to {run_dir / 'model'}")
    return run_dir


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


def _resume_point(resume: str | None, ckpt_root: Path) -> Path | None:
    """The checkpoint to continue from, per `run.resume` (RunConfig's docstring)."""
    if resume is None:
        if latest_checkpoint(ckpt_root) is not None:
            raise TrainConfigError(f"{ckpt_root} already holds checkpoints: pass --run.resume auto to continue "
                                   "that run, or choose another --run.dir")
        return None
    if resume == "auto":
        return latest_checkpoint(ckpt_root)
    path = Path(resume)
    if not path.is_dir():
        raise TrainConfigError(f"run.resume: {path} is not a checkpoint folder")
    return path


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks at each step boundary (a checkpoint is never half-taken)."""

    def __init__(self) -> None:
        self.requested = False
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler, no flag
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
