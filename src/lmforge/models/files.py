"""The files of a checkpoint folder: safetensors weights (one file, or shards with an index) and config.json.

Both our format (checkpoint.py) and Hugging Face's (convert.py) keep weights the same way:

    model.safetensors                                   every tensor, when they fit in one shard
    model-00001-of-00003.safetensors ...                otherwise, each at most `max_shard_bytes`
    model.safetensors.index.json                        {"metadata": {"total_size": bytes},
                                                         "weight_map": {tensor name: shard file}}

Worked example of the sharding, max_shard_bytes = 100 and tensors a (60 bytes), b (30), c (50), d (120):
a + b = 90 fit in shard 1; c would make 140, so shard 2 starts with c; d would make 170, so shard 3 holds d
alone (a tensor larger than the limit gets a shard of its own, it is never split).

Reading turns every way such a folder can be broken (a missing shard, a truncated or empty file, a config
that is not JSON) into one CheckpointError that names the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from lmforge.io import FileFormatError, publish_mode, read_json

INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder or state dict that does not match the model it should describe."""


def write_safetensors_folder(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = 5 * 2**30,
                             progress: bool = False) -> None:
    """Write `state` (contiguous CPU tensors) into the existing `folder`, sharded as the module docstring says."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        _save(shards[0], folder / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(tqdm(shards, desc="writing shards", disable=not progress)):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save(shard, folder / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, path, metadata={"format": "pt"})
    publish_mode(path)  # NOTE: safetensors writes through a temporary file of mode 0600 and keeps that mode


def load_safetensors_folder(path: Path, progress: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors`, or of every shard listed in `model.safetensors.index.json`."""
    if (path / INDEX_NAME).exists():
        index = read_checkpoint_json(path / INDEX_NAME)
        if not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{path / INDEX_NAME} has no weight_map")
        files = sorted(set(index["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path} holds neither model.safetensors nor {INDEX_NAME}")
    state: dict[str, torch.Tensor] = {}
    for fname in tqdm(files, desc="reading shards", disable=not progress or len(files) == 1):
        if not (path / fname).exists():
            raise CheckpointError(f"{path / fname} is listed in the index but missing")
        try:
            state.update(load_file(path / fname))
        except (SafetensorError, OSError) as e:
            # NOTE: safetensors says "header too small" / "invalid header length" / "incomplete metadata" for
            # an empty or cut-off file (an interrupted copy or download), without the file's name.
            raise CheckpointError(f"{path / fname} is not a complete safetensors file ({e}): it may be truncated; "
                                  "copy or write it again") from None
    return state


def read_checkpoint_json(path: Path) -> dict:
    """A JSON object from a checkpoint folder (config.json, params.json, the index), as a CheckpointError if not."""
    try:
        value = read_json(path)
    except FileFormatError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_config_json(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path} has no config.json (and no params.json of a Meta checkpoint)")
    return read_checkpoint_json(cfg_file)
