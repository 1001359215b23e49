"""What a training run reports: model FLOPs utilisation, loss-spike detection, and the metric sinks.

Every record goes to `metrics.jsonl` (one JSON object per line: `{"step": ..., "loss": ...}` for a training
step, `{"step": ..., "event": "loss_spike", ...}` for an event) and to TensorBoard; Weights & Biases only when
a project is named and the package is installed. Only rank 0 writes.

MFU (the PaLM / torchtitan convention, which Llama 2's training figures follow):

    flops per token = 6 N + 12 L d T       N parameters excluding the input embedding (for a mixture of
                                           experts, those one token uses), L layers, d width, T sequence
    MFU = tokens/s per device * flops per token / peak FLOP/s of the device

The attention term is not halved for causality. Worked example, TinyLlama-1.1B shapes (22 layers of 44.04M
plus the 65.5M output projection: N = 1.0345e9; L = 22, d = 2048, T = 2048): 6 N = 6.21e9 plus
12 L d T = 1.11e9 is 7.31e9 FLOPs per token; 49.5k tokens/s on one H100 is 3.62e14 FLOP/s = 36.6% of 989e12
(the H100's dense bf16 peak).
"""

from __future__ import annotations

import json
import math
import shutil
from collections import deque
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmforge.models.transformer import Transformer

# Dense bf16 peak FLOP/s by device name (the substring is matched against torch.cuda.get_device_name()).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def flops_per_token(model: Transformer, seq_len: int) -> float:
    """6 N + 12 L d T (module docstring); N counts the parameters one token uses, minus the input embedding."""
    c = model.config
    n = model.num_parameters(active=True) - c.vocab_size * c.dim
    return 6 * n + 12 * c.n_layers * c.dim * seq_len


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device: the override if given, else looked up for known GPUs, else None (n/a)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_FLOPS.items():
            if key in name:
                return flops
    return None


class SpikeDetector:
    """Flags a loss above mean + sigmas * std of the previous `window` losses (once the window is full).

    Worked example, window 4, sigmas 3: after losses 2.0, 2.1, 1.9, 2.0 (mean 2.0, std 0.0707) the threshold
    is 2.21, so 2.3 is a spike and 2.2 is not. Every loss joins the window, spikes included, so a lasting
    shift in level stops being flagged after about `window` steps.
    """

    def __init__(self, window: int, sigmas: float):
        self.sigmas = sigmas
        self.history: deque[float] = deque(maxlen=window)

    def update(self, loss: float) -> tuple[bool, float]:
        """Add `loss`; return (is_spike, threshold), threshold inf while the window is filling."""
        threshold = math.inf
        if len(self.history) == self.history.maxlen:
            n = len(self.history)
            mean = sum(self.history) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / n)
            threshold = mean + self.sigmas * std
        self.history.append(loss)
        return loss > threshold, threshold


class MetricsLogger:
    """Writes records to `metrics.jsonl`, TensorBoard and (optionally) W&B; a no-op on ranks other than 0.

    On resume from step `resume_step`, records of later steps (written by the interrupted run after its
    last checkpoint) are dropped from `metrics.jsonl` and purged from TensorBoard, so both read like one
    uninterrupted run.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        resume_step: int | None = None,
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:  # a fresh run in this folder: forget an earlier, checkpoint-less attempt
            self.path.unlink(missing_ok=True)
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        self.file = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        if wandb_project is not None:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("run.wandb_project is set but wandb is not installed (pip install wandb)") from e
            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config, resume="allow")

    def log(self, step: int, values: dict[str, Any]) -> None:
        """One record: JSONL gets everything, TensorBoard / W&B the numeric values under `train/...` or as named."""
        if not self.enabled:
            return
        self._write({"step": step, **values})
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for key, value in numeric.items():
                self.tb.add_scalar(key if "/" in key else f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)

    def event(self, step: int, kind: str, message: str, **fields: Any) -> None:
        """Something a reader should notice (a loss spike, a stop): printed above the progress bar and logged."""
        if not self.enabled:
            return
        tqdm.write(f"[step {step}] {kind}: {message}")
        self._write({"step": step, "event": kind, "message": message, **fields})
        if self.tb is not None:
            self.tb.add_text(f"events/{kind}", message, step)

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    """All records of a `metrics.jsonl` file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_step_metrics(path: Path) -> list[dict]:
    """The training-step records of a `metrics.jsonl` file (loss, lr, ...), in order: no validation records
    and no events (a loss_spike event carries its loss too)."""
    return [r for r in read_metrics(path) if "loss" in r and "event" not in r]
