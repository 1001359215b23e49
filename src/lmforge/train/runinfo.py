"""The run folder: what was run, with which code and libraries, so that a result can be traced and repeated.

    runs/<name>/
      config.yaml          the resolved configuration; `lmforge VERB --config runs/<name>/config.yaml`
                           runs it again (VERB: pretrain, sft, ...)
      env.json             library versions, git revision (and whether the tree was dirty), python, device,
                           command line, start time
      metrics.jsonl        one JSON record per step or event (metrics.py)
      tensorboard/         TensorBoard events (`tensorboard --logdir runs`)
      checkpoints/         step_000100/, step_000200/ ... (checkpointing.py)
      model/               the final model in our safetensors format (`lmforge.models.checkpoint`)
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from lmforge.io import atomic_file

LIBRARIES = ("lmforge", "torch", "numpy", "sentencepiece", "safetensors", "jsonargparse", "tensorboard", "transformers")


def to_plain(obj: Any) -> Any:
    """Dataclasses, tuples and paths turned into dicts, lists and strings that YAML and JSON can hold."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def library_versions() -> dict[str, str | None]:
    """Installed version of each library in LIBRARIES (None where it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    # torch's own version string names its build (e.g. 2.11.0+cu130); the package metadata may not
    import torch

    versions["torch"] = torch.__version__
    return versions


def git_revision(path: Path | None = None) -> dict[str, Any] | None:
    """{"revision": sha, "dirty": bool} of the checkout holding this source file, or None outside git."""
    cwd = path or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True,
            check=True, timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"revision": sha, "dirty": bool(status.strip())}


def write_run_info(run_dir: Path, config: dict[str, Any], device: str, verb: str = "pretrain") -> None:
    """Write config.yaml (headed by the command that reruns it: `lmforge VERB --config ...`) and env.json into
    `run_dir` (each atomically). `verb` may be two words ("rm train")."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(run_dir / "config.yaml", "w") as f:
        f.write("# Resolved configuration of this run; rerun it with:\n")
        f.write(f"# lmforge {verb} --config {run_dir / 'config.yaml'}\n")
        yaml.safe_dump(to_plain(config), f, sort_keys=False)
    env = {
        "libraries": library_versions(),
        "git": git_revision(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device,
        "argv": sys.argv,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_file(run_dir / "env.json", "w") as f:
        f.write(json.dumps(env, indent=2) + "\n")
