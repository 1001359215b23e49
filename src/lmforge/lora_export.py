"""Exporting an adapter folder (`lmforge.lora`): merged into its base, or as a peft adapter for Hugging Face.

    lmforge lora export runs/sft/adapter models/merged    --to lmforge   # full model, our format
    lmforge lora export runs/sft/adapter export/merged-hf --to hf        # full model, Hugging Face format
    lmforge lora export runs/sft/adapter export/adapter   --to peft      # adapter_config.json, adapter_model.safetensors

Merged ("lmforge", "hf"): the base (the folder the adapter folder records, or `--base`) with W + (alpha / r) B A
in every adapted weight, written like any model (`lmforge convert` and the engine take it as it is).

peft: an adapter for the Hugging Face export of the base (`lmforge convert BASE DST --to hf`), which
transformers + peft (`PeftModel.from_pretrained`) and vLLM's LoRA serving load. Tensor names follow peft's
`base_model.model.<Hugging Face module>.lora_A.weight`, with the Hugging Face module names of
`lmforge.models.convert`'s name map. That export reorders the rows of wq and wk for Hugging Face's rotary
layout (pairs (x[2p], x[2p+1]) become halves (x[p], x[p + D/2])): W becomes P W for a row permutation P.
Then P (W + s B A) = P W + s (P B) A, so the same permutation applies to B's rows (the adapter's outputs)
and A is left as it is. Worked example, one head with D = 4: B's rows [0, 1, 2, 3] go out as [0, 2, 1, 3].

NOTE: adapters of MoE experts are not exported to peft: transformers 5 keeps Mixtral's experts fused in one
parameter, which peft adapts with a packing of its own, and vLLM's expert LoRA expects yet another layout.
Such adapters export merged; attention adapters of an MoE model export to peft like any others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from lmforge.io import claim_output_dir, output_dir
from lmforge.lora import LoraAdapter, LoraError, load_lora_model, merge_lora, read_lora, require_peft
from lmforge.models.checkpoint import save_model
from lmforge.models.convert import _heads, _name_pairs, _permute_to_hf

PEFT_PREFIX = "base_model.model."  # how peft names the model it wraps


def peft_state_dict(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """The adapters under peft's Hugging Face names, with B's rows of wq and wk permuted (module docstring)."""
    config, out, exported = adapter.base.config, {}, set()
    for ours, hf, perm in _name_pairs(config):
        prefix = ours.removesuffix(".weight")
        if f"{prefix}.lora_A" not in adapter.state:
            continue
        if not isinstance(hf, str):
            raise LoraError(f"{prefix} adapts the experts of an MoE layer, which do not export to peft: export "
                            "the merged model instead (--to lmforge or --to hf)")
        A, B = adapter.state[f"{prefix}.lora_A"], adapter.state[f"{prefix}.lora_B"]
        if perm:
            B = _permute_to_hf(B, _heads(config, perm), config.head_dim)  # (out, r): rows reordered, like W's
        module = PEFT_PREFIX + hf.removesuffix(".weight")
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = A.contiguous(), B.contiguous()
        exported.add(prefix)
    left = {k.rsplit(".lora_", 1)[0] for k in adapter.state} - exported
    if left:  # every adapter name comes from the same model's name map, so this means a bug, not bad input
        raise AssertionError(f"adapters without a Hugging Face name: {sorted(left)}")
    return out


def save_peft_adapter(adapter: LoraAdapter, dst: str | Path, overwrite: bool = False) -> Path:
    """Write `adapter` as a peft adapter folder (adapter_config.json, adapter_model.safetensors)."""
    from safetensors.torch import save_file

    peft = require_peft()
    state = peft_state_dict(adapter)
    modules = sorted({name.split(".")[-3] for name in state})  # ...self_attn.q_proj.lora_A.weight -> q_proj
    alpha = adapter.lora.alpha
    config = peft.LoraConfig(r=adapter.lora.rank, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
                             lora_dropout=adapter.lora.dropout, target_modules=modules, bias="none",
                             task_type="CAUSAL_LM")
    with output_dir(dst, "lora export --to peft", overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file(state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return Path(dst)


def export_lora(
    adapter: Path,
    dst: Path,
    to: Literal["lmforge", "hf", "peft"] = "lmforge",
    base: Path | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    overwrite: bool = False,
) -> None:
    """Export a LoRA adapter folder: merged into its base as a full model, or as a peft adapter folder.

    Args:
        adapter: the adapter folder (written by training with --lora.rank > 0, or by `lmforge.lora.save_lora`).
        dst: output folder (missing or empty; an earlier lmforge output is replaced only with --overwrite true).
        to: "lmforge" (the merged model in our format), "hf" (the merged model as a Hugging Face folder), or
            "peft" (adapter_config.json + adapter_model.safetensors for the Hugging Face export of the base).
        base: the base model's folder; default: the one recorded in the adapter folder. Its weights are checked
            against the adapter's record. Not needed for "peft".
        dtype: dtype of the merged weights (default: the base's); the merge itself runs in float32.
        overwrite: replace `dst` if an earlier lmforge command wrote it.
    """
    adapter, dst = Path(adapter), Path(dst)
    claim_output_dir(dst, overwrite)  # refuse before any work, not after the merge
    record = read_lora(adapter)
    if to == "peft":
        save_peft_adapter(record, dst, overwrite)
        print(f"wrote {dst} (peft adapter for the Hugging Face export of the base)")
        return
    source = base if base is not None else record.base.path
    merged = merge_lora(load_lora_model(adapter, source))
    tokenizer = Path(source) / "tokenizer.model"
    tokenizer = tokenizer if tokenizer.is_file() else None
    torch_dtype = getattr(torch, dtype) if dtype else None
    if to == "hf":
        from lmforge.export import export_hf

        export_hf(merged, dst, tokenizer_path=tokenizer, overwrite=overwrite, dtype=torch_dtype)
    else:
        save_model(merged, dst, tokenizer_path=tokenizer, dtype=torch_dtype, overwrite=overwrite)
    print(f"wrote {dst} (merged model, {to} format)")


__all__ = ["export_lora", "peft_state_dict", "save_peft_adapter"]
