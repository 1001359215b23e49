"""Hugging Face and Meta / Mistral checkpoint interop through one declarative name map.

Our names are Meta's (`tok_embeddings`, `layers.N.attention.wq`, ...), so a Meta / Mistral
`consolidated.*.pth` needs no renaming, only per-expert stacking for Mixtral and concatenation of model-parallel
shards. Hugging Face folders go through `NAME_MAP` below plus the rotary permutation of the q and k projections:

Meta rotates adjacent pairs (x[2p], x[2p+1]) of each head; Hugging Face rotates halves (x[p], x[p + D/2]).
The rows of wq (and wk, with Hkv heads) are reordered so both compute the same function. Worked example,
one head with D = 4: Meta row order [p0.re, p0.im, p1.re, p1.im] = rows [0, 1, 2, 3] becomes Hugging Face
order [p0.re, p1.re, p0.im, p1.im] = rows [0, 2, 1, 3].

A Hugging Face folder written here (`save_hf_folder`) is what vLLM and transformers load: config.json
(LlamaForCausalLM, MistralForCausalLM with its sliding_window, or MixtralForCausalLM), generation_config.json
(the ids that start and end a sequence: <s> = 1, </s> = 2 in these families), and the weights under Hugging
Face's names. The tokenizer files are added by `lmforge.export`, which knows about text; this module does not.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from lmforge.io import output_dir
from lmforge.models.config import ConfigError, ModelConfig, MoEConfig
from lmforge.models.files import (
    CheckpointError,
    load_safetensors_folder,
    read_checkpoint_json,
    read_config_json,
    write_safetensors_folder,
)

# (our name, Hugging Face name, rotary permutation). {i}: layer index; {e}: expert index, stacked along
# dim 0 on our side (our `feed_forward.w1` is (E, f, d); HF holds E tensors of (f, d)).
COMMON_MAP = [
    ("tok_embeddings.weight", "model.embed_tokens.weight", None),
    ("norm.weight", "model.norm.weight", None),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight", "q"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight", "k"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight", None),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", None),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight", None),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", None),
]
DENSE_FFN_MAP = [
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight", None),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight", None),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight", None),
]
MOE_FFN_MAP = [
    ("layers.{i}.feed_forward.gate.weight", "model.layers.{i}.block_sparse_moe.gate.weight", None),
    ("layers.{i}.feed_forward.w1", "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", None),
    ("layers.{i}.feed_forward.w2", "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", None),
    ("layers.{i}.feed_forward.w3", "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", None),
]
# The head, by ModelConfig.head: a language model's vocabulary projection, or a reward model's regression head
# (transformers' *ForSequenceClassification with num_labels 1 calls it `score`).
HEAD_MAP = {"lm": [("output.weight", "lm_head.weight", None)],
            "reward": [("reward_head.weight", "score.weight", None)]}
FAMILIES = ("Llama", "Mistral", "Mixtral")
ARCH_SUFFIX = {"lm": "ForCausalLM", "reward": "ForSequenceClassification"}
SUPPORTED_HF = tuple(f + suffix for suffix in ARCH_SUFFIX.values() for f in FAMILIES)
# NOTE: transformers' sequence classifiers read the score at the rightmost token that is not `pad_token_id`
# (so left and right padding both work). Our sequences end with </s> (id 2), where our reward is read, so the
# pad id must not be </s>: a reward model's export pads with <unk> (id 0), which never ends a sequence.
REWARD_PAD_ID = 0
# HF buffers that are recomputed, never weights.
_IGNORED_HF = re.compile(r".*rotary_emb\.inv_freq$")


def _name_pairs(config: ModelConfig) -> list[tuple[str, str | list[str], str | None]]:
    """Every (our name, [HF names], permutation) of a model. One HF name maps one tensor; a list of E names
    (the experts of one MoE layer) stacks into one of ours along dim 0."""
    table = COMMON_MAP + HEAD_MAP[config.head] + (MOE_FFN_MAP if config.moe else DENSE_FFN_MAP)
    pairs = []
    for ours, theirs, perm in table:
        layers = range(config.n_layers) if "{i}" in ours else [None]
        for i in layers:
            o, t = ours.format(i=i), theirs.replace("{i}", str(i))
            hf = [t.format(e=e) for e in range(config.moe.num_experts)] if "{e}" in t else t
            pairs.append((o, hf, perm))
    return pairs


def _permute_to_hf(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Meta pair-interleaved rows -> HF half-split rows, per head (see the module docstring)."""
    return w.view(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def _permute_from_hf(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    return w.view(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def _heads(config: ModelConfig, perm: str) -> int:
    return config.n_heads if perm == "q" else config.n_kv_heads


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for ours, hf, perm in _name_pairs(config):
        t = state[ours]
        if perm:
            t = _permute_to_hf(t, _heads(config, perm), config.head_dim)
        if isinstance(hf, str):
            out[hf] = t.contiguous()
        else:
            out.update({name: t[e].contiguous() for e, name in enumerate(hf)})
    return out


def _unfuse_transformers_v5_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 keeps Mixtral experts fused in memory (`mlp.experts.gate_up_proj` (E, 2f, d),
    `mlp.experts.down_proj` (E, d, f), `mlp.gate`); a state dict taken from such a model in memory is mapped
    back to the per-expert names that `save_pretrained` and vLLM use."""
    out = {}
    for name, t in state.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)", name)
        if not m:
            out[name] = t
            continue
        prefix = f"model.layers.{m[1]}.block_sparse_moe"
        if m[2] == "gate.weight":
            out[f"{prefix}.gate.weight"] = t
        elif m[2] == "experts.down_proj":
            out.update({f"{prefix}.experts.{e}.w2.weight": t[e] for e in range(t.shape[0])})
        else:
            w1, w3 = t.chunk(2, dim=1)
            out.update({f"{prefix}.experts.{e}.w1.weight": w1[e] for e in range(t.shape[0])})
            out.update({f"{prefix}.experts.{e}.w3.weight": w3[e] for e in range(t.shape[0])})
    return out


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], config: ModelConfig, source: str = "HF state") -> dict:
    """Map HF names to ours, listing every missing and unexpected HF tensor in one error."""
    hf_state = {k: v for k, v in _unfuse_transformers_v5_experts(hf_state).items() if not _IGNORED_HF.match(k)}
    pairs = _name_pairs(config)
    wanted = {name for _, hf, _ in pairs for name in ([hf] if isinstance(hf, str) else hf)}
    missing, unexpected = sorted(wanted - set(hf_state)), sorted(set(hf_state) - wanted)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match its config: missing tensors {missing}, unexpected tensors {unexpected}"
        )
    out = {}
    for ours, hf, perm in pairs:
        t = hf_state[hf] if isinstance(hf, str) else torch.stack([hf_state[n] for n in hf])
        if perm:
            if t.shape[0] != _heads(config, perm) * config.head_dim:
                raise CheckpointError(f"{source}: {hf} has shape {tuple(t.shape)}, config.json disagrees")
            t = _permute_from_hf(t, _heads(config, perm), config.head_dim)
        out[ours] = t
    return out


def hf_config_to_model_config(hf: dict, source: str = "config.json") -> ModelConfig:
    """Our ModelConfig from a Hugging Face Llama / Mistral / Mixtral `config.json` dict (*ForCausalLM, or a
    reward model: *ForSequenceClassification with one label)."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in SUPPORTED_HF:
        raise ConfigError(f"{source}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_HF)}")
    head = "reward" if arch.endswith(ARCH_SUFFIX["reward"]) else "lm"
    family = arch.removesuffix(ARCH_SUFFIX[head])
    labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
    if head == "reward" and labels != 1:
        raise ConfigError(f"{source}: a {arch} with {labels} labels is a classifier; a reward model has one "
                          "(num_labels 1)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ("default", None):
        raise ConfigError(f"{source}: rope scaling {rope_type!r} is not supported (only plain rotary)")
    moe = None
    if family == "Mixtral":
        moe = MoEConfig(
            num_experts=hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"],
            aux_loss_coef=hf.get("router_aux_loss_coef", 0.02),
        )
    if hf.get("tie_word_embeddings", False):
        raise ConfigError(f"{source}: tied input/output embeddings are not part of these model families")
    return ModelConfig(
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 4096),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        sliding_window=hf.get("sliding_window") if family != "Llama" else None,
        moe=moe,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        head=head,
    )


def model_config_to_hf_config(config: ModelConfig, dtype: torch.dtype = torch.float32, bos_id: int = 1,
                              eos_id: int = 2) -> dict:
    """A `config.json` that transformers 5 and vLLM both read. Architecture: Mixtral if MoE, Mistral if a
    sliding window (it is always written, null when absent), else Llama; *ForCausalLM, or for a reward model
    *ForSequenceClassification with one label and pad_token_id REWARD_PAD_ID. `rope_theta` stays top-level for
    vLLM."""
    family = "Mixtral" if config.moe else "Mistral" if config.sliding_window else "Llama"
    arch = family + ARCH_SUFFIX[config.head]
    dtype_name = str(dtype).removeprefix("torch.")
    hf = {
        "architectures": [arch],
        "model_type": family.lower(),
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
    if config.head == "reward":
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=REWARD_PAD_ID)
    if family == "Llama":
        hf["mlp_bias"] = False
    else:
        hf["sliding_window"] = config.sliding_window
    if config.moe:
        hf.update(
            num_local_experts=config.moe.num_experts,
            num_experts_per_tok=config.moe.top_k,
            router_aux_loss_coef=config.moe.aux_loss_coef,
            output_router_logits=False,
            router_jitter_noise=0.0,
        )
    return hf


def read_hf_folder(path: Path, progress: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config = hf_config_to_model_config(read_config_json(path), str(path / "config.json"))
    return config, from_hf_state_dict(load_safetensors_folder(path, progress), config, str(path))


def hf_generation_config(bos_id: int = 1, eos_id: int = 2, pad_id: int | None = None) -> dict:
    """`generation_config.json`: the ids generation starts with, stops at (vLLM and transformers read eos from
    here) and pads with, if the tokenizer has a pad piece (Llama 2's and Mistral's have none)."""
    config = {"bos_token_id": bos_id, "eos_token_id": eos_id}
    if pad_id is not None and pad_id >= 0:
        config["pad_token_id"] = pad_id
    return config


def write_hf_files(model, folder: Path, dtype: torch.dtype | None = None, *, bos_id: int = 1, eos_id: int = 2,
                   pad_id: int | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json, generation_config.json and the weights (Hugging Face names) into the existing
    `folder` (no atomicity or output rule here: the callers' `output_dir` gives both)."""
    dtype = dtype or next(model.parameters()).dtype
    state = {k: v.detach().to(dtype).cpu() for k, v in model.state_dict().items()}
    hf_state = to_hf_state_dict(state, model.config)
    config = model_config_to_hf_config(model.config, dtype, bos_id, eos_id)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if model.config.head == "lm":  # a reward model generates nothing
        (folder / "generation_config.json").write_text(json.dumps(hf_generation_config(bos_id, eos_id, pad_id),
                                                                  indent=2) + "\n")
    write_safetensors_folder(hf_state, folder, max_shard_bytes)


def save_hf_folder(model, path: str | Path, *, overwrite: bool = False, dtype: torch.dtype | None = None,
                   max_shard_bytes: int = 5 * 2**30) -> Path:
    """Export `model` as a Hugging Face folder (`write_hf_files`), atomically, under lmforge's output rule:
    `path` must be missing, empty or (with `overwrite`) a folder lmforge wrote. With a tokenizer:
    `lmforge.export.export_hf`."""
    with output_dir(path, "save_hf_folder", overwrite, flag="overwrite=True") as tmp:
        write_hf_files(model, tmp, dtype, max_shard_bytes=max_shard_bytes)
    return Path(path)


# Meta / Mistral `consolidated.NN.pth`: model-parallel shards split these along dim 0 (column-parallel)
# or dim 1 (row-parallel and the embedding); everything else (norms, router) is replicated.
_META_CAT_DIM0 = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "w1.weight", "w3.weight", "output.weight")
_META_CAT_DIM1 = ("attention.wo.weight", "w2.weight", "tok_embeddings.weight")


def read_meta_folder(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read `params.json` + `consolidated.*.pth` (loaded with weights_only=True: no arbitrary unpickling)."""
    params = read_checkpoint_json(path / "params.json")
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{path} has params.json but no consolidated.*.pth")
    shards = [_load_pth(f) for f in files]
    state = {}
    for name in shards[0]:
        if name == "rope.freqs":  # a precomputed table in Llama 2 files; we compute angles on the fly
            continue
        parts = [s[name] for s in shards]
        if len(parts) > 1 and name.endswith(_META_CAT_DIM0):
            state[name] = torch.cat(parts, dim=0)
        elif len(parts) > 1 and name.endswith(_META_CAT_DIM1):
            state[name] = torch.cat(parts, dim=1)
        else:
            state[name] = parts[0]
    # Mixtral (mistral-inference): layers.N.feed_forward.experts.E.wK.weight -> stacked layers.N.feed_forward.wK
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name in [n for n in state if ".experts." in n]:
        m = re.fullmatch(r"(layers\.\d+\.feed_forward)\.experts\.(\d+)\.(w[123])\.weight", name)
        if m is None:
            raise CheckpointError(f"{path}: unexpected tensor {name}")
        experts.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = state.pop(name)
    for name, by_e in experts.items():
        state[name] = torch.stack([by_e[e] for e in sorted(by_e)])
    moe = params.get("moe")
    config = ModelConfig(
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"),
        ffn_dim=state["layers.0.feed_forward.w1.weight" if not moe else "layers.0.feed_forward.w1"].shape[-2],
        vocab_size=state["tok_embeddings.weight"].shape[0],  # Llama 2's params.json says -1
        max_seq_len=params.get("max_seq_len", 4096),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0),
        sliding_window=params.get("sliding_window"),
        moe=MoEConfig(num_experts=moe["num_experts"], top_k=moe["num_experts_per_tok"]) if moe else None,
        head_dim=params.get("head_dim"),
    )
    return config, state



def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one `.pth` file (weights_only=True: tensors and plain containers only, no code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} cannot be read as a PyTorch weights file ({first})") from None
