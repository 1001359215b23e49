"""Our checkpoint format: a folder with `config.json`, safetensors weights and (optionally) `tokenizer.model`.

    my-model/
      config.json                      ModelConfig plus {"format": "lmforge/1"}
      model.safetensors                reference parameter names (tok_embeddings, layers.N.attention.wq, ...)
      tokenizer.model                  SentencePiece model, if one was given
      .lmforge-output                  the marker of a folder lmforge wrote (lmforge.io's output rule)
    or, when the weights pass `max_shard_bytes`:
      model-00001-of-00003.safetensors ... and model.safetensors.index.json {"weight_map": {name: file}}

Loading never unpickles: weights are safetensors; Meta `.pth` files go through `torch.load(weights_only=True)`
in `convert.py`. `load_model` also accepts Hugging Face and Meta folders and converts them on the fly.
`check_model_folder` says what is wrong with a path that is not a model folder, before anything is loaded.

NOTE: the tokenizer file is copied as bytes, never read: the model package knows no text (the export of a
model together with its tokenizer lives in `lmforge.export`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lmforge.io import output_dir
from lmforge.models import convert
from lmforge.models.config import ModelConfig
from lmforge.models.files import (  # noqa: F401 - CheckpointError and INDEX_NAME are this module's API too
    INDEX_NAME,
    CheckpointError,
    load_safetensors_folder,
    read_config_json,
    write_safetensors_folder,
)
from lmforge.models.transformer import Transformer


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
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` to the folder `path` in our format, atomically (the folder appears complete or not at all).

    `path` must be missing, empty, or (with `overwrite`) a folder lmforge wrote; any other folder is refused
    (OutputExistsError), so nothing of the user's is ever replaced. `state_dict` replaces `model.state_dict()`,
    e.g. the full tensors gathered from a sharded model.
    """
    state = state_dict if state_dict is not None else model.state_dict()
    state = {k: v.detach().to(dtype=dtype or v.dtype).cpu().contiguous() for k, v in state.items()}
    with output_dir(path, "save_model", overwrite, flag="overwrite=True") as tmp:
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        write_safetensors_folder(state, tmp, max_shard_bytes, progress)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    return Path(path)


def check_model_folder(path: str | Path) -> Path:
    """`path` as a Path if it looks like a model folder `load_model` reads; else a CheckpointError saying why.

    Only names are checked (config.json, or Meta's params.json); the contents are checked when loading. A run
    folder of `lmforge pretrain` (its model is in RUN/model) gets the hint "did you mean RUN/model?".
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} is not a folder: it does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a model folder (config.json and weights)")
    if (path / "config.json").is_file() or (path / "params.json").is_file():
        return path
    inner = path / "model"
    if (inner / "config.json").is_file():
        raise CheckpointError(f"{path} is not a model folder (it has no config.json) but holds one in {inner}: "
                              f"did you mean {inner}?")
    raise CheckpointError(f"{path} is not a model folder: it has no config.json (ours or Hugging Face's) and no "
                          "params.json (Meta's)")


def require_head(config: ModelConfig, head: str | None, source: str) -> None:
    """CheckpointError unless the model of `source` has the head `head` ("lm", "reward"; None: either)."""
    if head is None or config.head == head:
        return
    if head == "reward":
        raise CheckpointError(f"{source} is a language model (a next-token head), not a reward model: train a reward "
                              f"model from it with `lmforge rm train {source}`")
    raise CheckpointError(f"{source} is a reward model (one score per sequence), not a language model: it cannot "
                          "generate or be fine-tuned as one; score with it (`lmforge rm score`) instead")


def load_model(path: str | Path, device=None, dtype: torch.dtype | None = None, progress: bool = False,
               head: str | None = "lm") -> Transformer:
    """Load our folder, a Hugging Face folder (Llama / Mistral / Mixtral) or a Meta / Mistral `.pth` folder.

    head: the kind of model the caller needs: "lm" (the default: every verb that generates or trains next-token
    prediction), "reward" (a reward model: ours, or a Hugging Face *ForSequenceClassification folder), or None
    (either, e.g. `convert`). A folder of the other kind is one CheckpointError saying what it is.
    """
    path = check_model_folder(path)
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
