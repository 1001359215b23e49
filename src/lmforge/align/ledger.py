"""Verbs made of stages (`lmforge rs`, `lmforge rlhf`): a run folder that records each stage once it is complete.

    RUN/stages.json      [{"name": "iteration_1/sample", "result": {...}, "time": ...}, ...]   (atomic writes)
    RUN/<stage folders>  whatever each stage writes: files written atomically, or a training run folder with
                         its own checkpoints

A stage is recorded only after everything it wrote is in place, so after SIGTERM, SIGKILL or a crash the same
command with `--run.resume auto` skips the recorded stages (their results come from the ledger) and runs the
one in flight again: a stage that trains resumes from its own run folder's checkpoints, one that writes files
simply writes them again (each is a function of its inputs and seeds).

The run folder follows the output rule of `lmforge.io`, as a training run's does: a missing or empty folder
starts afresh; a folder lmforge wrote is continued with `--run.resume auto` and replaced only with
`--run.overwrite true`; any other non-empty folder is refused.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.io import atomic_file, claim_output_dir, is_lmforge_output, read_json, write_marker

LEDGER = "stages.json"


class StageLedger:
    """The ledger of a staged run in `run_dir` (module docstring); claims the folder when made.

    resume: True continues a folder lmforge wrote (its recorded stages are skipped); False starts afresh in a
    missing or empty folder, or with `overwrite` in one lmforge wrote (deleting it first).
    """

    def __init__(self, run_dir: str | Path, verb: str, resume: bool = False, overwrite: bool = False):
        self.dir = Path(run_dir)
        flag = "--run.resume auto to continue it, or --run.overwrite true"
        if resume:
            if self.dir.exists() and any(self.dir.iterdir()) and not is_lmforge_output(self.dir):
                claim_output_dir(self.dir, False)  # raises: a folder lmforge did not write is never used
        elif claim_output_dir(self.dir, overwrite, flag=flag):
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not is_lmforge_output(self.dir):
            write_marker(self.dir, f"lmforge {verb}")
        path = self.dir / LEDGER
        self.entries: list[dict] = read_json(path) if path.is_file() else []

    def done(self, name: str) -> bool:
        return any(e["name"] == name for e in self.entries)

    def result(self, name: str) -> Any:
        for e in self.entries:
            if e["name"] == name:
                return e["result"]
        raise KeyError(f"stage {name!r} is not recorded in {self.dir / LEDGER}")

    def record(self, name: str, result: Any = None) -> None:
        """Record stage `name` as complete with its (JSON-ready) result."""
        self.entries = [e for e in self.entries if e["name"] != name]
        self.entries.append({"name": name, "result": result, "time": round(time.time(), 3)})
        with atomic_file(self.dir / LEDGER, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.entries, indent=1) + "\n")

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """The recorded result of stage `name`, or fn()'s, recorded once fn returns (module docstring)."""
        if self.done(name):
            return self.result(name)
        result = fn()
        self.record(name, result)
        return result


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """`records` as a .jsonl file, written atomically."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path


def read_jsonl(path: Path) -> list[dict]:
    """The records of a .jsonl file, one per "\n"-ended line.

    NOTE: not `str.splitlines()`, which also breaks at U+2028, U+0085, \x1c .. \x1e, characters a sampled answer
    can hold and that `json.dumps(ensure_ascii=False)` leaves unescaped."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


__all__ = ["LEDGER", "StageLedger", "read_jsonl", "write_jsonl"]
