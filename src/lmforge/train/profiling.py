"""Profile a few training steps with torch.profiler, to see what stands between a run and its peak MFU.

    lmforge pretrain ... --run.profile_at 3 --run.profile_steps 2     # steps 3 and 4 (after compile warm-up)

writes, on rank 0 only (the other ranks run the same program):

    RUN_DIR/profile/trace.json    Chrome / Perfetto trace of the profiled steps (open in ui.perfetto.dev)
    RUN_DIR/profile/top_ops.txt   the operators and kernels with the most self time on the device (CUDA) or
                                  on the host (CPU runs), as torch.profiler's key_averages table

Steps count from 1, as in metrics.jsonl; the profiler starts before step `profile_at` and stops after step
`profile_at + profile_steps - 1` (or at the end of the run, whichever comes first). The profiled steps run
slower than the others (the profiler records every launch), so their tokens/s should not be quoted.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    """Starts and stops torch.profiler around steps [first, first + count) of the training loop."""

    def __init__(self, run_dir: Path, first: int | None, count: int, enabled: bool, device: torch.device):
        self.out = run_dir / "profile"
        self.first, self.last = (first, first + count - 1) if first is not None else (None, None)
        self.enabled = enabled and first is not None
        self.device = device
        self._prof: profile | None = None

    def before_step(self, step: int) -> None:
        """`step`: the step about to run (1-based)."""
        if self.enabled and step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._prof = profile(activities=activities)
            self._prof.__enter__()

    def after_step(self, step: int) -> None:
        """`step`: the step just completed."""
        if self._prof is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        """Stop and write the files, if profiling (a run that ends inside the window writes what it has)."""
        if self._prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out / "trace.json"))
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=90)
        (self.out / "top_ops.txt").write_text(f"steps {self.first}-{self.last}, sorted by {sort_by}\n{table}\n")
