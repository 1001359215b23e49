"""The training harness: what every lmforge trainer needs around its own step loop, as plain functions.

Each recipe (`pretrain`, `sft`, and the alignment trainers) keeps an explicit `for step` loop that reads top to
bottom; there is no trainer base class, no hooks and no callbacks. Around the loop it calls:

    place = place_training(train, parallel.tensor_parallel)     device, process group, (dp, tp) mesh, seeds
    ... build the model(s), parallelize, optimizer(s), schedule(s), loader(s) (the recipe's own) ...
    state = TrainState(modules={"model": net}, optimizers={"model": opt},
                       schedulers={"model": sched}, loaders={"train": loader})
    run = open_run("sft", run_cfg, config, place, state)        run folder (the output rule), resume, config.yaml,
                                                                 env.json, metrics, progress bar, stop flag
    for step in range(run.step + 1, total + 1):
        ... forward / backward of the recipe ...
        grad_norm = clip_gradients(params, optim.grad_clip)
        check_finite(run, step, loss, grad_norm)                 stops before the update
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
                                                                 (these three lines: apply_update)
        run.log_step(step, {"loss": loss, ...})
        if checkpoint_or_stop(run, step, total, state):          saves when due; True: SIGTERM / Ctrl-C / stop_at
            return run.dir
    finish_run(run, state)                                       summary (printed, summary.json), plot (loss.png)
    export_model(run, net, tokenizer)                            full weights gathered, rank 0 writes dir/model

A run folder (`RunConfig.dir`, default runs/<verb>, e.g. runs/sft, runs/rm-train) holds:

    config.yaml        the resolved configuration, headed by the command that reruns it (`lmforge VERB --config`)
    env.json           library versions, git revision (and whether the tree was dirty), device, command line
    metrics.jsonl      one record per step, validation and event (metrics.py); TensorBoard in tensorboard/
    checkpoints/       step_NNNNNN/: the named modules and optimizers (DCP), schedulers, loader cursors,
                       counters, RNG states (checkpointing.py)
    summary.json       the end-of-run summary; loss.png its plot
    model/             the trained model in our safetensors format (with its tokenizer)
    .lmforge-output    the marker of the output rule (lmforge.io): this folder is lmforge's own

The run folder follows the output rule of `lmforge.io`: a missing or empty folder starts a run; a folder that
lmforge wrote is continued with `--run.resume auto` (or a checkpoint path) and replaced only with
`--run.overwrite true`; any other non-empty folder is refused.

Stopping: SIGTERM (a scheduler's pre-emption notice) and the first Ctrl-C (SIGINT) set a flag the loop reads at
the next step boundary, where a checkpoint is saved and the verb returns normally; the same command with
`--run.resume auto` continues the same curve. A second Ctrl-C stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from lmforge.devices import resolve_device
from lmforge.io import atomic_file, claim_output_dir, is_lmforge_output, write_marker
from lmforge.parallel import DataParallelRank, clip_grad_norm_, data_parallel_rank, init_distributed, training_mesh
from lmforge.train.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from lmforge.train.config import RunConfig, TrainConfigError
from lmforge.train.metrics import MetricsLogger, SpikeDetector
from lmforge.train.profiling import StepProfiler
from lmforge.train.runinfo import to_plain, write_run_info


class NonFiniteLossError(ValueError):
    """The loss or gradient norm of a step was NaN or infinite; the step was not applied.

    NOTE: a ValueError, so that the verb ends with this one message (exit status 2) rather than a traceback,
    like the other errors a user acts on by changing the configuration (usually optim.lr).
    """


# ---- where the run happens ---------------------------------------------------------------------------------
@dataclass
class Placement:
    """The device and the processes of a run: this rank, the world, the (dp, tp) mesh and the dp ranks."""

    device: torch.device
    rank: int
    world_size: int
    mesh: Any  # DeviceMesh | None
    dp: DataParallelRank


def place_training(train: Any, tensor_parallel: int = 1) -> Placement:
    """Join torchrun's process group if there is one, build the (dp, tp) mesh and seed every generator.

    `train`: the recipe's train config (fields device, seed, threads, deterministic; see config.TrainBase).
    """
    device = resolve_device(train.device)
    rank, world_size = init_distributed(device.type)  # (0, 1) without torchrun
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    mesh = training_mesh(device, tensor_parallel)  # (dp, tp) ranks; None for one process
    if train.threads is not None:
        torch.set_num_threads(train.threads)
    if train.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(train.seed)
    random.seed(train.seed)
    np.random.seed(train.seed)
    return Placement(device, rank, world_size, mesh, data_parallel_rank(mesh))


# ---- what a checkpoint holds -------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Everything a checkpoint saves and a resume restores, by name.

    modules: the trained modules (pre-training: {"model": net}; PPO: a policy and a critic).
    optimizers: the optimizer of each module, keyed by the module's name.
    schedulers, loaders: objects with state_dict() / load_state_dict() (LR schedules, data cursors).
    counters: JSON-ready progress values; "step" is the number of completed optimizer steps.
    """

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    schedulers: dict[str, Any] = field(default_factory=dict)
    loaders: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=lambda: {"step": 0, "tokens_seen": 0})


# ---- the run ------------------------------------------------------------------------------------------------
class StopFlag:
    """SIGTERM and the first Ctrl-C become a flag the loop reads at each step boundary (a checkpoint is never
    half-taken); a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.requested: str | None = None  # "sigterm" or "sigint" once asked
        self._previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler, no flag
                pass

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt
        self.requested = "sigint" if signum == signal.SIGINT else "sigterm"
        if signum == signal.SIGINT:
            tqdm.write("stopping after this step with a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


@dataclass
class Run:
    """One training run in progress: its folder, placement, reporting and stop flag (made by `open_run`)."""

    verb: str
    dir: Path
    cfg: RunConfig
    place: Placement
    config: dict
    logger: MetricsLogger
    stop: StopFlag
    profiler: StepProfiler
    bar: tqdm
    spikes: SpikeDetector | None
    started: float
    resumed_from: Path | None
    step: int  # completed optimizer steps when the run (re)started
    closed: bool = False

    @property
    def is_main(self) -> bool:
        return self.place.rank == 0

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    def log(self, step: int, record: dict[str, Any]) -> None:
        self.logger.log(step, record)

    def event(self, step: int, kind: str, message: str, **fields: Any) -> None:
        self.logger.event(step, kind, message, **fields)

    def log_step(self, step: int, record: dict[str, Any], show: tuple[str, ...] = ("loss", "lr")) -> None:
        """Log one training step (metrics.jsonl, TensorBoard), advance the progress bar (showing the `show`
        keys), and flag a loss spike (mean + k std of the recent losses) as an event."""
        self.logger.log(step, record)
        if self.spikes is not None and "loss" in record:
            is_spike, threshold = self.spikes.update(record["loss"])
            if is_spike:
                self.event(step, "loss_spike", f"loss {record['loss']:.4f} above {threshold:.4f} (mean + "
                           f"{self.spikes.sigmas} std of the last {self.spikes.history.maxlen} steps)",
                           loss=record["loss"], threshold=threshold)
        self.bar.set_postfix({k: _short(record[k]) for k in show if k in record}, refresh=False)
        self.bar.update(1)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop profiling, the progress bar, the signal handlers and the metric sinks (once; also on leaving a
        `with run:` block, however the loop inside it ends)."""
        if self.closed:
            return
        self.closed = True
        self.profiler.close()
        self.bar.close()
        self.stop.restore()
        self.logger.close()


def _short(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.2e}"
    return str(value)


def open_run(verb: str, cfg: RunConfig, config: dict[str, Any], place: Placement, state: TrainState,
             total_steps: int, spikes: SpikeDetector | None = None) -> Run:
    """Claim the run folder (output rule), restore `state` from a checkpoint if resuming, write config.yaml
    and env.json, and start the metrics, the progress bar, the profiler and the stop flag.

    config: the resolved configuration (dataclasses and plain values); config.yaml reruns the run from it.
    """
    run_dir = Path(cfg.dir or f"runs/{verb.replace(' ', '-')}")  # "rm train" -> runs/rm-train
    resume_from = _claim_run_dir(run_dir, cfg, place)
    if resume_from is not None:
        saved = load_checkpoint(resume_from, state.modules, state.optimizers)
        for name, obj in state.schedulers.items():
            obj.load_state_dict(saved["schedulers"][name])
        for name, obj in state.loaders.items():
            obj.load_state_dict(saved["loaders"][name])
        state.counters.update(saved["counters"])
    plain = to_plain(config)
    if place.rank == 0:
        write_run_info(run_dir, plain, device=str(place.device), verb=verb)
    step = int(state.counters["step"])
    logger = MetricsLogger(run_dir, enabled=place.rank == 0, tensorboard=cfg.tensorboard,
                           wandb_project=cfg.wandb_project, resume_step=step if resume_from is not None else None,
                           config=plain)
    run = Run(verb=verb, dir=run_dir, cfg=cfg, place=place, config=plain, logger=logger, stop=StopFlag(),
              profiler=StepProfiler(run_dir, cfg.profile_at, cfg.profile_steps, place.rank == 0, place.device),
              bar=tqdm(total=total_steps, initial=step, desc=verb, disable=not cfg.progress or place.rank != 0,
                       dynamic_ncols=True),
              spikes=spikes, started=time.perf_counter(), resumed_from=resume_from, step=step)
    if resume_from is not None:
        run.event(step, "resume", f"continuing from {resume_from}")
    return run


def _claim_run_dir(run_dir: Path, cfg: RunConfig, place: Placement) -> Path | None:
    """Apply the output rule to the run folder; the checkpoint to resume from (None: a fresh run).

        folder                          resume None            resume auto              resume PATH
        missing / empty                 fresh run              fresh run                refused (no folder)
        ours, with checkpoints          refused (1)            continue the newest      continue PATH
        ours, without checkpoints       refused (1)            fresh run (2)            continue PATH
        anything else                   refused                refused                  refused
    (1) unless run.overwrite: the old run folder is then deleted first. (2) an attempt that died before its
    first checkpoint: nothing to continue, so it starts again in its own folder.
    """
    flag = "--run.resume auto to continue it, or --run.overwrite true"
    replacing = False
    if cfg.resume is None:
        replacing = claim_output_dir(run_dir, cfg.overwrite, flag=flag)
    elif run_dir.exists() and any(run_dir.iterdir()) and not is_lmforge_output(run_dir):
        claim_output_dir(run_dir, False)  # raises: a folder lmforge did not write is never used
    if cfg.resume == "auto":
        resume_from = latest_checkpoint(run_dir / "checkpoints")
    elif cfg.resume is not None:
        resume_from = Path(cfg.resume)
        if not resume_from.is_dir():
            raise TrainConfigError(f"run.resume: {resume_from} is not a checkpoint folder")
    else:
        resume_from = None
    _barrier()  # every rank has looked before rank 0 changes anything
    if place.rank == 0:
        if replacing:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not is_lmforge_output(run_dir):
            write_marker(run_dir, "lmforge run folder")
    _barrier()
    return resume_from


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---- inside the loop ----------------------------------------------------------------------------------------
def clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` (0: no clipping); the norm before clipping (a host sync)."""
    return clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf).item()


def apply_update(run: Run, step: int, loss: float, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                 scheduler: Any, grad_clip: float) -> tuple[float, float]:
    """The update of step `step` once its gradients are in: clip, `check_finite`, AdamW, schedule, zero the
    gradients. Returns (the gradient norm before clipping, the learning rate this update used)."""
    grad_norm = clip_gradients(params, grad_clip)
    check_finite(run, step, loss, grad_norm)
    lr = optimizer.param_groups[0]["lr"]  # the rate of this update (optim.build_scheduler)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def check_finite(run: Run, step: int, loss: float, grad_norm: float) -> None:
    """Safety net: a non-finite loss or gradient norm stops the run before the update is applied, so the
    parameters and the newest checkpoint stay as the last good step left them."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    last = latest_checkpoint(run.checkpoints)
    message = (f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}; the update was not "
               f"applied. Last good checkpoint: {last or 'none'}")
    run.event(step, "non_finite", message)
    raise NonFiniteLossError(message)


def checkpoint_or_stop(run: Run, step: int, total: int, state: TrainState) -> bool:
    """After step `step` of `total`: save a checkpoint when one is due (every run.checkpoint_every steps and at
    the end), or when the run must stop here (SIGTERM, Ctrl-C, run.stop_at). True: stop now, the loop returns.
    """
    state.counters["step"] = step
    every = run.cfg.checkpoint_every
    periodic = every > 0 and (step % every == 0 or step == total)
    reason = run.stop.requested or ("stop_at" if step == run.cfg.stop_at else None)
    stopping = step < total and reason is not None
    if not (periodic or stopping):
        return False
    train_state = {"counters": to_plain(state.counters),
                   "schedulers": {n: s.state_dict() for n, s in state.schedulers.items()},
                   "loaders": {n: loader.state_dict() for n, loader in state.loaders.items()},
                   "config": run.config}
    path = save_checkpoint(run.checkpoints, step, state.modules, state.optimizers, train_state,
                           keep=run.cfg.keep_checkpoints)
    if stopping:
        run.event(step, reason, f"saved {path}; continue with --run.resume auto")
    return stopping


def end_step(run: Run, step: int, total: int, state: TrainState, validate=None) -> bool:
    """The end of step `step` of `total`: close the profiler's step, `validate(step)` when due (every
    run.eval_every steps and at the end), then `checkpoint_or_stop`. True: stop now, the loop returns."""
    run.profiler.after_step(step)
    every = run.cfg.eval_every
    if validate is not None and every and (step % every == 0 or step == total):
        validate(step)
    return checkpoint_or_stop(run, step, total, state)


# ---- after the loop -----------------------------------------------------------------------------------------
def finish_run(run: Run, state: TrainState, extra: dict[str, Any] | None = None,
               plot_keys: tuple[str, ...] = ("loss", "val/loss")) -> dict[str, Any]:
    """End of a completed run: print and write the summary (summary.json) and plot `plot_keys` (loss.png).

    The summary: steps, wall time of this invocation, tokens seen, the last value of each plotted key, and
    `extra` (the recipe's own figures, e.g. packing efficiency).
    """
    from lmforge.train.metrics import read_metrics
    from lmforge.train.plots import plot_metrics

    run.close()
    seconds = time.perf_counter() - run.started
    counters = {k: v for k, v in to_plain(state.counters).items() if k != "step"}
    summary: dict[str, Any] = {"verb": run.verb, "steps": int(state.counters["step"]), "seconds": round(seconds, 2),
                               **counters}
    if run.is_main:
        records = read_metrics(run.dir / "metrics.jsonl") if (run.dir / "metrics.jsonl").exists() else []
        for key in plot_keys:
            values = [r[key] for r in records if key in r and "event" not in r]
            if values:
                summary[f"final {key}"] = values[-1]
                if len(values) > 1:
                    summary[f"first {key}"] = values[0]
        summary |= to_plain(extra or {})
        with atomic_file(run.dir / "summary.json", "w", encoding="utf-8") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
        plot_metrics(records, plot_keys, run.dir / "loss.png", title=f"lmforge {run.verb}: {run.dir}")
        lines = [f"{key}: {_short(value)}" for key, value in summary.items() if key != "verb"]
        tqdm.write(f"{run.verb} finished: " + ", ".join(lines) + f"\nsummary: {run.dir / 'summary.json'}, plot: "
                   f"{run.dir / 'loss.png'}")
    return summary


def export_model(run: Run, model: nn.Module, tokenizer: str | Path | None, name: str = "model") -> Path | None:
    """Gather the full weights (a collective under FSDP2: every rank calls this) and write them with rank 0 to
    run.dir/name in our format, with the tokenizer. The folder belongs to the run, so it is replaced if there.

    A LoRA model (lmforge.lora) is written twice: its adapters alone to run.dir/adapter (with the base's
    identity), and merged into the base weights to run.dir/name, a plain model that serves like any other.
    """
    from lmforge.models.checkpoint import save_model
    from lmforge.parallel import full_model_state_dict

    lora = getattr(model, "lora_config", None)
    if lora is not None:
        from lmforge.lora import base_state_dict, lora_state_dict, merge_adapters, save_lora

        adapters = lora_state_dict(model)
    full_state = full_model_state_dict(model)
    if not run.is_main:
        return None
    path = run.dir / name
    if lora is not None:
        save_lora(model, run.dir / "adapter", state=adapters, overwrite=True)
        full_state = merge_adapters(base_state_dict(full_state), adapters, lora.scale)
        tqdm.write(f"saved the adapters to {run.dir / 'adapter'}")
    save_model(model, path, tokenizer_path=tokenizer, state_dict=full_state, overwrite=True)
    tqdm.write(f"saved the trained model to {path}")
    return path
