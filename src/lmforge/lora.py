"""LoRA: low-rank adapters on the projections of a frozen Transformer, applied from outside the model.

Notation: W a frozen projection of shape (out, in), r the rank, alpha the scale numerator, s = alpha / r.

    y = W x + s * B A dropout(x)        A: (r, in), B: (out, r); only A and B are trained
    merged:  W' = W + s * B A           the same function as one plain matrix (dropout is off at inference)

A starts Kaiming-uniform and B at zero, so an adapted model computes exactly its base's function until the
first update. The experts of an MoE layer are stacked, W: (E, out, in) (`lmforge.models.moe`); each expert e
gets a pair of its own, A: (E, r, in) and B: (E, out, r), and the layer runs on W'_e = W_e + s B_e A_e,
formed for all experts at every forward pass.

Targets are our projection names: wq wk wv wo (attention) and w1 w2 w3 (the SwiGLU feed-forward, or every
expert of an MoE layer). Worked example, the `tiny` preset (d 64, H 4, Hkv 2, D 16, f 176) at rank 8: wq
gains A (8, 64) and B (64, 8); wk gains A (8, 64) and B (32, 8); w2 gains A (8, 176) and B (64, 8).

Our names. An adapter is named after the parameter it adapts (in adapter folders and `lora_state_dict`):

    layers.0.attention.wq.weight (H*D, d)  ->  layers.0.attention.wq.lora_A (r, d),    .lora_B (H*D, r)
    layers.0.feed_forward.w1     (E, f, d) ->  layers.0.feed_forward.w1.lora_A (E, r, d), .lora_B (E, f, r)

peft does the layers. `apply_lora` hands the model to peft's `inject_adapter_in_model`: projections (nn.Linear)
become `peft.tuners.lora.Linear` (peft's `target_modules`); expert stacks, which are nn.Parameters and not
Linear modules, are wrapped by `lora.ParamWrapper` (peft's `target_parameters`), which re-parametrises the
stack as W + s B A during each forward. So no forward code is written by hand: peft's layers are the ones
Hugging Face users train with, and they compile with fullgraph=True inside our blocks. What is written here
is the mapping between peft's module tree (`wq.base_layer.weight`, `wq.lora_A.default.weight`; for experts,
nested wrappers and peft's packing of the E pairs as (E * r, in) and (out, r * E) matrices) and the flat
names above, and the merge, which is one line of math on state dicts: exports and FSDP-gathered states have
no peft model to merge in.

NOTE: peft refuses dropout on expert stacks (dropout of x cannot be factored out of a re-parametrised weight),
so an MoE model whose w1 / w2 / w3 are targeted needs dropout 0.

Dtype policy: the base keeps the dtype it was loaded in (bf16 on the GPU: `load_model(..., dtype=torch.bfloat16)`);
adapters are always float32, the optimizer's master weights (under bf16 autocast their products run in bf16
like the rest). Merging computes W + s B A in float32 and rounds once to the base dtype.

Parallelism: call `apply_lora` on the loaded single-device model, then `lmforge.parallel.parallelize`.
Activation checkpointing, compile and FSDP2 wrap the adapted blocks like any others (FSDP2 shards the frozen
base and the float32 adapters of a block together; only trainable parameters must share a dtype). Tensor
parallelism does not split adapters and refuses LoRA models.

Storage: `save_lora` writes an adapter folder; `load_lora` checks it against a base model before loading it.

    adapter/
      config.json           {"format": "lmforge-lora/1", "lora": LoraConfig, "tensors": {name: shape},
                             "base": {"config": ModelConfig, "fingerprint": ..., "path": ...}}
      adapter.safetensors   the adapters under our names, float32
      .lmforge-output       the output rule's marker (lmforge.io)

The base's fingerprint: sha256 over every base tensor's name, shape and 4096 evenly spaced elements rounded
to bf16. It is the same for a float32 checkpoint and its bf16 copy on the GPU, and differs for any other
trained or random weights (checkpoints that differ in only a few elements may share it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lmforge.io import output_dir
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer

FORMAT = "lmforge-lora/1"
Target = Literal["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
ALL_TARGETS: tuple[Target, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
ADAPTER_DTYPE = torch.float32
_ADAPTER = "default"  # peft's name for the one adapter a model carries
# Module-path segments that wrap a module without renaming its parameters: peft's `base_layer`, and
# activation checkpointing's `_checkpoint_wrapped_module` (lmforge.parallel).
_WRAPPERS = re.compile(r"\.(base_layer|_checkpoint_wrapped_module)(?=\.|$)")
_TARGET = re.compile(r"layers\.\d+\.(attention|feed_forward)\.(?P<proj>w[qkvo123])(\.weight)?")


class LoraError(ValueError):
    """A LoRA configuration, adapter folder or base model that does not fit."""


@dataclass
class LoraConfig:
    """Low-rank adapters on the projections of a frozen model: each adapted W becomes W + (alpha / rank) B A.

    Attributes:
        rank: Rank r of every adapter (A is (r, in), B is (out, r)); 0 means no LoRA (the whole model trains).
        alpha: Scale numerator: the update of W is (alpha / rank) B A.
        dropout: Dropout on each adapter's input while training; must be 0 when MoE experts are targeted.
        targets: Projections to adapt: wq wk wv wo (attention), w1 w2 w3 (the feed-forward, or every expert of
            an MoE layer).
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[Target, ...] = ALL_TARGETS

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise LoraError(f"lora.rank must be an integer >= 0 (0: no LoRA), got {self.rank!r}")
        if not self.alpha > 0:
            raise LoraError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in ALL_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise LoraError(f"lora.targets must be distinct names among {' '.join(ALL_TARGETS)}, got "
                            f"{list(self.targets)}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """s = alpha / r, the factor of B A."""
        return self.alpha / self.rank


@dataclass
class BaseIdentity:
    """What an adapter was trained on: the base's config, weight fingerprint and (if known) folder."""

    config: ModelConfig
    fingerprint: str
    path: str | None = None


def require_peft():
    """The peft module, or one LoraError line saying how to install it."""
    try:
        import peft
    except ImportError as e:  # NOTE: a ValueError, so that the CLI ends with this one line
        raise LoraError(f"LoRA needs peft, which is not installed ({e}): pip install 'lmforge[lora]'") from None
    return peft


def is_lora(model: nn.Module) -> bool:
    """Whether `apply_lora` has added adapters to `model`."""
    return getattr(model, "lora_config", None) is not None


def base_fingerprint(state: Mapping[str, Tensor], samples: int = 4096) -> str:
    """The base's fingerprint (module docstring) from its state dict under the plain Transformer's names."""
    digest = hashlib.sha256()
    for name in sorted(state):
        flat = state[name].detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)][:samples]  # evenly spaced, at most `samples`
        digest.update(f"{name}{tuple(state[name].shape)}".encode())
        digest.update(picked.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return digest.hexdigest()


def _peft_targets(config: ModelConfig, cfg: LoraConfig) -> tuple[list[str], list[str]]:
    """peft's (target_modules, target_parameters): name suffixes of the Linear modules and expert stacks."""
    attention = [f"attention.{t}" for t in cfg.targets if t in ("wq", "wk", "wv", "wo")]
    ffn = [f"feed_forward.{t}" for t in cfg.targets if t in ("w1", "w2", "w3")]
    if config.moe is None:
        return attention + ffn, []
    if ffn and cfg.dropout:
        raise LoraError(f"lora.dropout must be 0 when the experts of an MoE model are targeted (w1 w2 w3), got "
                        f"{cfg.dropout}: peft cannot apply dropout inside an expert stack")
    return attention, ffn


def apply_lora(model: Transformer, cfg: LoraConfig, *, base_path: str | Path | None = None) -> Transformer:
    """Add adapters to the targets of `model` in place and freeze every other parameter; returns `model`.

    Call it on the loaded base, before `lmforge.parallel.parallelize`. Adapters are float32 whatever the base
    dtype. `base_path`: the folder the base came from, recorded with the adapters as part of its identity.
    """
    if not cfg.enabled:
        raise LoraError("lora.rank is 0, so there is no adapter to add (pass e.g. --lora.rank 16)")
    if is_lora(model):
        raise LoraError("the model already has LoRA adapters")
    if any(p.is_meta or isinstance(p, DTensor) for p in model.parameters()):
        raise LoraError("apply_lora needs the loaded single-device base: call it after loading the weights and "
                        "before parallelize")
    target_modules, target_parameters = _peft_targets(model.config, cfg)
    peft = require_peft()
    path = None if base_path is None else str(base_path)
    identity = BaseIdentity(model.config, base_fingerprint(model.state_dict()), path)
    peft_cfg = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                               target_modules=target_modules, target_parameters=target_parameters or None)
    peft.inject_adapter_in_model(peft_cfg, model, adapter_name=_ADAPTER)
    model.requires_grad_(False)
    for layer in _adapted_layers(model).values():
        for factors in (layer.lora_A[_ADAPTER], layer.lora_B[_ADAPTER]):
            factors.to(ADAPTER_DTYPE).requires_grad_(True)
    model.lora_config, model.lora_base = cfg, identity
    return model


def _adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Our name of each adapted base parameter (without the `.weight` of a Linear) -> the peft layer adapting it."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            found[f"{_WRAPPERS.sub('', name)}.{module.parameter_name}"] = module
        elif isinstance(module, LoraLayer):
            found[_WRAPPERS.sub("", name)] = module
    return found


def _is_expert_stack(layer: nn.Module) -> bool:
    from peft.tuners.lora import ParamWrapper

    return isinstance(layer, ParamWrapper) and layer.get_param().dim() == 3


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters under our names and layout (module docstring): detached copies, on their device.

    Sharded (FSDP2) adapters are gathered, so under torchrun call it on every rank.
    """
    out = {}
    for name, layer in _adapted_layers(model).items():
        A, B = _full(layer.lora_A[_ADAPTER].weight), _full(layer.lora_B[_ADAPTER].weight)
        if _is_expert_stack(layer):
            # peft packs expert e's pair as rows e*r .. e*r + r-1 of A and columns k*E + e (k < r) of B
            E = layer.num_experts
            A = A.reshape(E, -1, A.shape[-1])  # (E * r, in) -> (E, r, in)
            B = B.reshape(B.shape[0], -1, E).permute(2, 0, 1)  # (out, r * E) -> (out, r, E) -> (E, out, r)
        out[f"{name}.lora_A"] = A.detach().clone(memory_format=torch.contiguous_format)
        out[f"{name}.lora_B"] = B.detach().clone(memory_format=torch.contiguous_format)
    return out


def lora_shapes(config: ModelConfig, cfg: LoraConfig) -> dict[str, tuple[int, ...]]:
    """The name and shape of every adapter tensor that `cfg` adds to a model of `config`."""
    with torch.device("meta"):
        base = Transformer(config)
    shapes = {}
    for name, p in base.named_parameters():
        m = _TARGET.fullmatch(name)
        if m and m["proj"] in cfg.targets:
            *stack, out, inp = p.shape  # stack: (E,) for experts, () for a Linear
            prefix = name.removesuffix(".weight")
            shapes[f"{prefix}.lora_A"] = (*stack, cfg.rank, inp)
            shapes[f"{prefix}.lora_B"] = (*stack, out, cfg.rank)
    return shapes


def _short(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_lora_tensors(state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise LoraError (one line) naming missing, unexpected and mis-shaped adapter tensors."""
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    misshaped = [f"{n} {tuple(state[n].shape)} instead of {expected[n]}" for n in sorted(set(state) & set(expected))
                 if tuple(state[n].shape) != tuple(expected[n])]
    problems = ([f"missing {_short(missing)}"] if missing else []) + (
        [f"unexpected {_short(unexpected)}"] if unexpected else []) + (
        [f"mis-shaped {_short(misshaped)}"] if misshaped else [])
    if problems:
        raise LoraError(f"{source} does not match its LoRA config: " + "; ".join(problems))


def set_lora_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str = "adapter state") -> None:
    """Copy adapters given under our names and layout (`lora_state_dict`) into the LoRA model, in place."""
    check_lora_tensors(state, lora_shapes(model.config, model.lora_config), source)
    with torch.no_grad():
        for name, layer in _adapted_layers(model).items():
            A, B = state[f"{name}.lora_A"], state[f"{name}.lora_B"]
            if _is_expert_stack(layer):  # the inverse of lora_state_dict's unpacking
                A = A.reshape(-1, A.shape[-1])  # (E, r, in) -> (E * r, in)
                B = B.permute(1, 2, 0).reshape(B.shape[1], -1)  # (E, out, r) -> (out, r, E) -> (out, r * E)
            layer.lora_A[_ADAPTER].weight.copy_(A)
            layer.lora_B[_ADAPTER].weight.copy_(B)


def base_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The frozen base in a LoRA model's state dict (`model.state_dict()`, or `full_model_state_dict(model)`
    of lmforge.parallel when sharded), under the plain Transformer's names (those of `save_model`)."""
    return {_WRAPPERS.sub("", k): v for k, v in state.items() if ".lora_" not in k}


def merge_adapters(base: Mapping[str, Tensor], adapters: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """A plain state dict with W + scale * B A for every adapted W (W (out, in), or a stack (E, out, in) for
    which the product batches over the experts); computed in float32 and rounded once to W's dtype."""
    merged = dict(base)
    for prefix in {k.rsplit(".lora_", 1)[0] for k in adapters}:
        key = prefix if prefix in base else f"{prefix}.weight"  # expert stacks have no `.weight` suffix
        W = base[key]
        A, B = (adapters[f"{prefix}.lora_{x}"].to(W.device, torch.float32) for x in "AB")
        merged[key] = (W.float() + scale * (B @ A)).to(W.dtype)  # (out, r) @ (r, in), or (E, ...) batched
    return merged


def merge_lora(model: Transformer) -> Transformer:
    """A plain Transformer computing what the LoRA model computes without dropout: W + (alpha / r) B A.

    The LoRA model is left as it is; the new model shares the tensors of every weight that was not adapted.
    For a sharded (FSDP2) model, merge the gathered states instead (collectives: every rank calls both):

        base, adapters = base_state_dict(full_model_state_dict(model)), lora_state_dict(model)
        save_model(model, path, state_dict=merge_adapters(base, adapters, cfg.scale))   # on rank 0
    """
    from lmforge.models.checkpoint import model_from_state_dict

    state = merge_adapters(base_state_dict(model.state_dict()), lora_state_dict(model), model.lora_config.scale)
    return model_from_state_dict(model.config, state, "merged LoRA model")


# --- adapter folders ------------------------------------------------------------------------------------------


@dataclass
class LoraAdapter:
    """An adapter folder read back: its config, its base's identity, the adapters under our names."""

    lora: LoraConfig
    base: BaseIdentity
    state: dict[str, Tensor]


def save_lora(model: Transformer, path: str | Path, *, overwrite: bool = False,
              state: Mapping[str, Tensor] | None = None) -> Path:
    """Write the adapters of `model` as an adapter folder (module docstring), under the output rule.

    `state` replaces `lora_state_dict(model)`, e.g. adapters gathered on every rank before rank 0 writes.
    """
    from safetensors.torch import save_file

    cfg, base = model.lora_config, model.lora_base
    state = lora_state_dict(model) if state is None else state
    state = {k: v.detach().to("cpu", ADAPTER_DTYPE).contiguous() for k, v in state.items()}
    check_lora_tensors(state, lora_shapes(base.config, cfg), "the adapters to save")
    record = {
        "format": FORMAT,
        "lora": {**dataclasses.asdict(cfg), "targets": list(cfg.targets)},
        "base": {"config": base.config.to_dict(), "fingerprint": base.fingerprint, "path": base.path},
        "tensors": {k: list(v.shape) for k, v in sorted(state.items())},
    }
    with output_dir(path, "save_lora", overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(record, indent=2) + "\n")
        save_file(state, tmp / "adapter.safetensors", metadata={"format": "pt"})
    return Path(path)


def read_lora(path: str | Path) -> LoraAdapter:
    """Read and validate an adapter folder (every problem is one LoraError line naming the file)."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights = path / "config.json", path / "adapter.safetensors"
    if not path.is_dir():
        raise LoraError(f"{path} is not a folder (an adapter folder holds config.json and adapter.safetensors)")
    if not config_file.is_file():
        raise LoraError(f"{path} has no config.json, so it is not an adapter folder")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraError(f"{config_file} is not valid JSON: {e}") from None
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if fmt != FORMAT:
        raise LoraError(f"{config_file}: format {fmt!r} is not {FORMAT!r} (a model folder is not an adapter folder)")
    try:
        lora = LoraConfig(**raw["lora"])
        base = BaseIdentity(ModelConfig.from_dict(raw["base"]["config"]), str(raw["base"]["fingerprint"]),
                            raw["base"].get("path"))
    except (KeyError, TypeError, ValueError) as e:
        raise LoraError(f"{config_file} is not a valid adapter config: {type(e).__name__}: {e}") from None
    if not weights.is_file():
        raise LoraError(f"{path} has no adapter.safetensors")
    try:
        state = load_file(weights)
    except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
        raise LoraError(f"{weights} is not a readable safetensors file: {e}") from None
    check_lora_tensors(state, lora_shapes(base.config, lora), str(weights))
    return LoraAdapter(lora, base, state)


def check_base(model: Transformer, base: BaseIdentity, source: str) -> None:
    """Raise LoraError (one line) unless `model`'s base is the one the adapters in `source` were trained on."""
    if model.config != base.config:
        theirs, ours = dataclasses.asdict(base.config), dataclasses.asdict(model.config)
        diff = ", ".join(f"{k} {theirs[k]} (model: {ours[k]})" for k in theirs if theirs[k] != ours[k])
        raise LoraError(f"{source} was trained on a different base model: {diff}")
    fingerprint = base_fingerprint(base_state_dict(model.state_dict()))
    if fingerprint != base.fingerprint:
        where = f" (recorded base: {base.path})" if base.path else ""
        raise LoraError(f"{source} was trained on other base weights{where}: fingerprint {base.fingerprint[:12]}, "
                        f"this model's is {fingerprint[:12]}")


def load_lora(model: Transformer, path: str | Path) -> Transformer:
    """Load an adapter folder into `model` (a plain base, to which its adapters are added, or a LoRA model of
    the same config) after checking that `model` is the base it was trained on; returns `model`."""
    path = Path(path)
    adapter = read_lora(path)
    check_base(model, adapter.base, str(path))
    if not is_lora(model):
        apply_lora(model, adapter.lora, base_path=adapter.base.path)
    elif model.lora_config != adapter.lora:
        raise LoraError(f"{path} holds adapters for {adapter.lora}, the model has {model.lora_config}")
    set_lora_state_dict(model, adapter.state, str(path / "adapter.safetensors"))
    return model


def load_lora_model(adapter: str | Path, base: str | Path | None = None, device=None,
                    dtype: torch.dtype | None = None) -> Transformer:
    """The base model (`base`, default: the folder recorded in the adapter folder) with the adapters loaded."""
    from lmforge.models.checkpoint import load_model

    base = base if base is not None else read_lora(adapter).base.path
    if base is None:
        raise LoraError(f"{adapter} records no base folder: give the base model's folder")
    return load_lora(load_model(base, device=device, dtype=dtype), adapter)


__all__ = [
    "ADAPTER_DTYPE", "ALL_TARGETS", "BaseIdentity", "LoraAdapter", "LoraConfig", "LoraError", "apply_lora",
    "base_fingerprint", "base_state_dict", "check_base", "check_lora_tensors", "is_lora", "load_lora",
    "load_lora_model", "lora_shapes", "lora_state_dict", "merge_adapters", "merge_lora", "read_lora",
    "require_peft", "save_lora", "set_lora_state_dict",
]
