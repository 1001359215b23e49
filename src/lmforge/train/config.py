"""The option groups of `lmforge pretrain`: data, training, run folder (the optimizer's is in optim.py).

Each group is a dataclass, so the command line gets dotted options (`--train.steps 100`, `--optim.lr 1e-3`)
and a YAML file the same keys nested; the `Attributes:` sections below are the `--help` text of each option.
Defaults are Llama 2's pre-training recipe (4M-token batches of 4096-token sequences, about 477k steps for 2T
tokens); the shipped configs/*.yaml scale it down. `TrainBase` and `RunConfig` are shared by every trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class TrainConfigError(ValueError):
    """A training configuration that cannot run, with the option to change named in the message."""


@dataclass
class DataConfig:
    """Token shards to train on.

    Attributes:
        dir: Folder written by `lmforge data prepare` (manifest.json plus token shards); its default is where
            `lmforge data prepare` writes by default.
        train_split: Split to train on.
        val_split: Split for the periodic validation loss; None switches validation off.
        document_masking: Let tokens attend only within their own document of a packed sequence (the
            loader's document ids go to attention); off, a sequence attends across document boundaries as
            in Llama 2.
        tokenizer: tokenizer.model copied into the final model folder; None takes the one recorded in the
            data manifest, if any.
    """

    dir: str = "runs/data"
    train_split: str = "train"
    val_split: str | None = "validation"
    document_masking: bool = False
    tokenizer: str | None = None


@dataclass
class TrainBase:
    """Fields every trainer's `train` group has (pretrain, sft, reward models, RL): where and how exactly to run.

    Attributes:
        seed: Seed of parameter initialisation, data order and sampling.
        precision: "auto" is bf16 autocast on CUDA and fp32 on the CPU; "bf16" or "fp32" force one.
            Parameters, gradients and optimizer state stay fp32 either way.
        device: "cpu", "cuda", "cuda:1", ...; None picks CUDA when available.
        loss_chunk: Token positions whose logits are computed at once by the chunked cross-entropy.
        threads: CPU threads for torch (None: torch's default).
        deterministic: torch.use_deterministic_algorithms(True) (slower on CUDA; bitwise-repeatable runs).
        spike_window: Recent steps whose losses define a loss spike.
        spike_sigmas: A loss above mean + spike_sigmas * std of the window is logged as a loss_spike event.
        debug_nan_at_step: Testing only: make the loss of this step NaN (steps count from 1) to exercise the
            non-finite stop.
    """

    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: str | None = None
    loss_chunk: int = 2048
    threads: int | None = None
    deterministic: bool = False
    spike_window: int = 100
    spike_sigmas: float = 4.0
    debug_nan_at_step: int | None = None

    def __post_init__(self) -> None:
        for name in ("loss_chunk", "spike_window"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainConfig(TrainBase):
    """Steps, batch shape, precision and safety nets of pre-training.

    Attributes:
        steps: Optimizer steps of the whole run (Llama 2: 2T tokens / 4M tokens a step = about 477k).
        global_batch_tokens: Tokens per optimizer step over all ranks and micro-batches (Llama 2: 4M =
            1024 sequences of 4096). Must be a multiple of micro_batch_size * seq_len * dp_size (dp_size:
            processes / parallel.tensor_parallel); the quotient is the number of gradient-accumulation
            micro-batches.
        micro_batch_size: Sequences per forward pass on one rank.
        seq_len: Tokens per training sequence (Llama 2: 4096); at most model.max_seq_len.
    """

    steps: int = 476_837
    global_batch_tokens: int = 4_194_304
    micro_batch_size: int = 1
    seq_len: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "global_batch_tokens", "micro_batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")

    def grad_accum_steps(self, dp_size: int) -> int:
        """Micro-batches per optimizer step on each rank:
        global_batch_tokens / (micro_batch_size * seq_len * dp_size), dp_size the number of data-parallel ranks.

        Worked example: 4,194,304 tokens, micro-batch 2 of 4096 tokens, 64 ranks -> 4,194,304 / 524,288 = 8.
        """
        per_pass = self.micro_batch_size * self.seq_len * dp_size
        if self.global_batch_tokens % per_pass != 0:
            lower = max(per_pass, self.global_batch_tokens // per_pass * per_pass)
            raise TrainConfigError(
                f"train.global_batch_tokens ({self.global_batch_tokens}) must be a multiple of "
                f"micro_batch_size * seq_len * data-parallel ranks = {self.micro_batch_size} * {self.seq_len} * "
                f"{dp_size} = {per_pass} tokens; nearest valid values: {lower} or {lower + per_pass}"
            )
        return self.global_batch_tokens // per_pass


@dataclass
class RunConfig:
    """The run folder, checkpoints and reporting (the same group for every trainer: train/harness.py).

    Attributes:
        dir: Run folder (config.yaml, env.json, metrics.jsonl, tensorboard/, checkpoints/, summary.json,
            loss.png, model/); None: runs/<verb>, e.g. runs/pretrain.
        resume: "auto" continues from the newest complete checkpoint in dir/checkpoints (or starts afresh if
            there is none); a path continues from that checkpoint; None starts afresh in a missing or empty
            folder and refuses an earlier run's folder (see overwrite).
        overwrite: Start afresh in the folder of an earlier lmforge run, deleting it first. A non-empty
            folder that lmforge did not write is refused whatever this says.
        checkpoint_every: Save a training checkpoint every this many steps (and at the end, and on SIGTERM);
            0 saves none but those of SIGTERM and stop_at (the final model is written all the same).
        stop_at: End the run when it completes this step, with a checkpoint, as SIGTERM does; the schedule still
            runs to train.steps, and the same command with `--run.resume auto` continues past it to the end.
        keep_checkpoints: Complete checkpoints kept; older ones are deleted after each save.
        save_model: Write the trained model to dir/model at the end (off: runs that only measure steps, such
            as benchmarks/two_gpus.py's 7B run, skip gathering and writing 27 GB).
        eval_every: Compute the validation loss every this many steps (and at the end); 0 switches it off.
        eval_batches: Batches of data.val_split per validation: the split's first samples in order, each at
            most once (a large value covers the whole split).
        tensorboard: Write TensorBoard events to dir/tensorboard.
        wandb_project: Also log to this Weights & Biases project (needs `pip install wandb`).
        peak_tflops: Peak dense TFLOP/s of one device for MFU; None looks up known GPUs (H100: 989) and
            reports n/a elsewhere.
        progress: Show a progress bar.
        profile_at: Profile steps profile_at .. profile_at + profile_steps - 1 (counting from 1) with
            torch.profiler; rank 0 writes dir/profile/trace.json and top_ops.txt (train/profiling.py). None: off.
        profile_steps: Steps in the profiled window.
    """

    dir: str | None = None
    resume: str | None = None
    overwrite: bool = False
    checkpoint_every: int = 1000
    stop_at: int | None = None
    keep_checkpoints: int = 2
    save_model: bool = True
    eval_every: int = 1000
    eval_batches: int = 10
    tensorboard: bool = True
    wandb_project: str | None = None
    peak_tflops: float | None = None
    progress: bool = True
    profile_at: int | None = None
    profile_steps: int = 2

    def __post_init__(self) -> None:
        if (self.profile_at is not None and self.profile_at < 1) or self.profile_steps < 1:
            raise TrainConfigError(f"run.profile_at and run.profile_steps must be >= 1, got {self.profile_at} and "
                                   f"{self.profile_steps}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1 or self.eval_every < 0 or self.eval_batches < 1:
            raise TrainConfigError(
                "run.keep_checkpoints and run.eval_batches must be >= 1, run.checkpoint_every and run.eval_every >= 0"
            )
        if self.stop_at is not None and self.stop_at < 1:
            raise TrainConfigError(f"run.stop_at must be >= 1, got {self.stop_at}")
