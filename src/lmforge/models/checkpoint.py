"""Our checkpoint format: a folder with `config.json`, safetensors weights and (optionally) `tokenizer.model`.

    my-model/
      config.json                      ModelConfig plus {"format": "lmforge/1"}
      model.safetensors                reference parameter names (tok_embeddings, layers.N.attention.wq, ...)
      tokenizer.model                  SentencePiece model, if one was given
    or, when the weights pass `max_shard_bytes`:
      model-00001-of-00003.safetensors ... and model.safetensors.index.json {"weight_map": {name: file}}

Loading never unpickles: weights are safetensors; Meta `.pth` files go through `torch.load(weights_only=True)`
in `convert.py`. `load_model` also accepts Hugging Face and Meta folders and converts them on the fly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from lmforge.io import atomic_dir
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer

INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder or state dict that does not match the model it should describe."""


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError listing every missing, unexpected and mis-shaped tensor of `state`."""
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{n}: checkpoint {tuple(state[n].shape)} vs model {expected[n]}"
        for n in set(expected) & set(state)
        if tuple(state[n].shape) != expected[n]
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {misshaped}")
    if problems:
        raise CheckpointError(f"{source} does not match the model config:\n  " + "\n  ".join(problems))


def model_from_state_dict(
    config: ModelConfig, state: dict[str, torch.Tensor], source: str, device=None, dtype=None
) -> Transformer:
    """Build a Transformer on the meta device and adopt the (validated) tensors of `state` as parameters."""
    with torch.device("meta"):
        model = Transformer(config)
    check_state_dict(model, state, source)
    state = {k: v.to(device=device or v.device, dtype=dtype or v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def save_model(
    model: Transformer,
    path: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` to the folder `path` in our format, atomically (the folder appears complete or not at all).

    `state_dict` replaces `model.state_dict()`, e.g. the full tensors gathered from a sharded model.
    """
    state = state_dict if state_dict is not None else model.state_dict()
    state = {k: v.detach().to(dtype=dtype or v.dtype).cpu().contiguous() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(tqdm(shards, desc="writing shards", disable=not progress)):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    return Path(path)


def load_safetensors_folder(path: Path, progress: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors`, or of every shard listed in `model.safetensors.index.json`."""
    if (path / INDEX_NAME).exists():
        files = sorted(set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path} holds neither model.safetensors nor {INDEX_NAME}")
    state: dict[str, torch.Tensor] = {}
    for fname in tqdm(files, desc="reading shards", disable=not progress or len(files) == 1):
        if not (path / fname).exists():
            raise CheckpointError(f"{path / fname} is listed in the index but missing")
        state.update(load_file(path / fname))
    return state


def read_config_json(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path} has no config.json (and no params.json of a Meta checkpoint)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e


def require_head(config: ModelConfig, head: str | None, source: str) -> None:
    """CheckpointError unless the model of `source` has the head `head` ("lm", "reward"; None: either)."""
    if head is None or config.head == head:
        return
    if head == "reward":
        raise CheckpointError(f"{source} is a language model (next-token head), not a reward model: train one with "
                              "`lmforge rm train --init_from` this folder")
    raise CheckpointError(f"{source} is a reward model (one score per sequence), not a language model: it cannot "
                          "generate or be fine-tuned as one; score with it (`lmforge rm score`) instead")


def load_model(path: str | Path, device=None, dtype: torch.dtype | None = None, progress: bool = False,
               head: str | None = "lm") -> Transformer:
    """Load our folder, a Hugging Face folder (Llama / Mistral / Mixtral) or a Meta / Mistral `.pth` folder.

    head: the kind of model the caller needs: "lm" (the default: every verb that generates or trains next-token
    prediction), "reward" (a reward model: ours, or a Hugging Face *ForSequenceClassification folder), or None
    (either, e.g. `convert`). A folder of the other kind is one CheckpointError saying what it is.
    """
    from lmforge.models import convert  # convert imports this module

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder")
    if (path / "params.json").exists() and not (path / "config.json").exists():
        config, state = convert.read_meta_folder(path)
        require_head(config, head, str(path))
        return model_from_state_dict(config, state, str(path), device, dtype)
    raw = read_config_json(path)
    if "format" in raw:  # ours; from_dict rejects a format version it does not know
        config = ModelConfig.from_dict(raw)
        require_head(config, head, str(path))
        state = load_safetensors_folder(path, progress)
    else:
        config, state = convert.read_hf_folder(path, progress)
        require_head(config, head, str(path))
    return model_from_state_dict(config, state, str(path), device, dtype)
