"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    checkpoints/
      step_000200/                    complete (renamed into place after every file was written)
        .metadata, __0_0.distcp ...   the named modules and their optimizers through torch.distributed.checkpoint
                                      (DCP): {"modules": {name: state}, "optimizers": {name: state}}
        train_state.json              step, counters, scheduler and data-loader states, the run's config
        rng/rank_00000.json           torch (CPU and CUDA), python and numpy generator states of each rank
      step_000300.tmp/                being written, or left by a crash: never resumed from

A checkpoint is complete once `step_NNNNNN.tmp` has been renamed to `step_NNNNNN`: a run killed while
saving leaves only a `.tmp` folder, and `latest_checkpoint` returns the previous complete one. After each save
only the newest `keep` complete checkpoints remain.

Modules are named, so one checkpoint holds every trained module of a recipe (pre-training: "model"; PPO: a
policy and a critic, each with its own optimizer). A module's optimizer is saved under the module's name; a
module without an optimizer is saved alone. They go through `get_state_dict` / `set_state_dict` and DCP, which
work in one process without `init_process_group` and, unchanged, with FSDP-sharded parameters (each rank
writes its shards, a later run may load them with another number of ranks). Everything else is small and
goes to JSON.

NOTE: DCP stores non-tensor optimizer entries (param_groups) and its `.metadata` with pickle, so resume only
from checkpoints your own runs wrote. Models meant to be shared are the safetensors folders of `save_model`.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from lmforge.io import atomic_file

STEP_DIR = re.compile(r"^step_(\d+)$")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _dcp(fn, *args, **kwargs):
    """Call dcp.save / dcp.load, silencing its warning that one process without a process group is assumed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return fn(*args, **kwargs)


def _tensor_to_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _b64_to_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """The generator states of this process as JSON-ready values."""
    np_state = np.random.get_state()
    state = {
        "torch_cpu": _tensor_to_b64(torch.get_rng_state()),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [_tensor_to_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_b64_to_tensor(state["torch_cpu"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_b64_to_tensor(s) for s in state["torch_cuda"]])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _dcp_state(modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """{"modules": {name: state}, "optimizers": {name: state}}: tensors of the right shapes and shardings for
    DCP to write, or to load into. An optimizer is keyed by the name of the module it updates.
    NOTE: for an optimizer without state yet, get_state_dict first runs one zero-lr step to create its
    exp_avg / exp_avg_sq, so that there is something to load into.
    NOTE: frozen parameters (a LoRA model's base) are left out: they come from the base model's folder, so a
    checkpoint holds only what trains."""
    unknown = sorted(set(optimizers) - set(modules))
    if unknown:
        raise KeyError(f"optimizers {unknown} name no module (modules: {sorted(modules)})")
    state: dict[str, dict] = {"modules": {}, "optimizers": {}}
    for name, module in modules.items():
        if name in optimizers:
            state["modules"][name], state["optimizers"][name] = get_state_dict(module, optimizers[name],
                                                                               options=_TRAINED)
        else:
            state["modules"][name] = get_model_state_dict(module, options=_TRAINED)
    return state


_TRAINED = StateDictOptions(ignore_frozen_params=True)
# Loading: the checkpoint holds no frozen parameters, so they are not "missing" (dcp.load has checked that every
# key asked for was there).
_LOAD_TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)


def save_checkpoint(
    root: Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    train_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint `root/step_{step:06d}` (see the module docstring) and delete all but the newest `keep`.

    modules / optimizers: the trained modules by name, and the optimizer of each (keyed by the module's name).
    train_state: JSON-ready values (step, counters, scheduler and loader states, config), written by rank 0.
    """
    final = root / f"step_{step:06d}"
    tmp = root / f"{final.name}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    _dcp(dcp.save, _dcp_state(modules, optimizers), checkpoint_id=tmp)
    with atomic_file(tmp / "rng" / f"rank_{_rank():05d}.json", "w") as f:
        json.dump(rng_state(), f)
    if _rank() == 0:
        with atomic_file(tmp / "train_state.json", "w") as f:
            json.dump(train_state, f, indent=2)
    _barrier()
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)  # a re-save of the same step after a resume
        tmp.rename(final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(
    path: Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]
) -> dict[str, Any]:
    """Load the named modules, their optimizers and this rank's RNG states from `path` in place; return its
    train_state."""
    if not (path / "train_state.json").exists() or not (path / ".metadata").exists():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no train_state.json or .metadata)")
    state = _dcp_state(modules, optimizers)
    _dcp(dcp.load, state, checkpoint_id=path)
    for name, module in modules.items():
        if name in optimizers:
            set_state_dict(module, optimizers[name], model_state_dict=state["modules"][name],
                           optim_state_dict=state["optimizers"][name], options=_LOAD_TRAINED)
        else:
            set_model_state_dict(module, state["modules"][name], options=_LOAD_TRAINED)
    rng_file = path / "rng" / f"rank_{_rank():05d}.json"
    if rng_file.exists():  # absent when resuming with more ranks than saved: those start from their seed
        set_rng_state(json.loads(rng_file.read_text()))
    return json.loads((path / "train_state.json").read_text())
