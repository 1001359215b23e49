"""`lmforge convert`, and the export of a model together with its tokenizer as one Hugging Face folder.

This is the one place where a model and its text meet: `lmforge.models` reads and writes weights and
configs and knows nothing of tokenizers (it only copies a tokenizer.model file as bytes), `lmforge.tokenizer`
knows nothing of weights. A Hugging Face folder that vLLM and transformers load needs both:

    export/llama-hf/
      config.json, generation_config.json, model.safetensors      lmforge.models.convert.write_hf_files
      tokenizer.model, tokenizer.json, tokenizer_config.json,      lmforge.tokenizer.hf_export
      special_tokens_map.json                                      (with the Llama 2 chat template)
      .lmforge-output                                              the output rule's marker (lmforge.io)

generation_config.json takes the tokenizer's own <s>, </s> (and pad, where it has one) ids, so that
generation in transformers and vLLM stops where ours does. A reward model (`head: reward`, from `lmforge rm
train`) exports as LlamaForSequenceClassification (Mistral..., Mixtral...) with one label, whose `score` is
our `reward_head`, and no generation_config.json; its pad_token_id is <unk> (id 0), never </s>: transformers
reads the score at the last token that is not padding, and our sequences end with </s>.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from lmforge.io import claim_output_dir, output_dir
from lmforge.models.checkpoint import load_model, save_model
from lmforge.models.convert import write_hf_files
from lmforge.models.transformer import Transformer


def export_hf(model: Transformer, path: str | Path, *, tokenizer_path: str | Path | None = None,
              overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write `model` (and the SentencePiece `tokenizer_path`, if given) as one Hugging Face folder, atomically.

    `path` must be missing, empty or (with `overwrite`) a folder lmforge wrote; any other folder is refused.
    """
    from lmforge.tokenizer import Tokenizer, export_hf_tokenizer

    tok = Tokenizer(tokenizer_path) if tokenizer_path is not None else None
    ids = dict(bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id) if tok is not None else {}
    with output_dir(path, "export_hf", overwrite, flag="overwrite=True") as tmp:
        write_hf_files(model, tmp, dtype, **ids)
        if tok is not None:
            export_hf_tokenizer(tok.path, tmp)
    return Path(path)


def convert(
    src: str,
    dst: str,
    to: Literal["lmforge", "hf", "peft"] = "lmforge",
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    overwrite: bool = False,
) -> None:
    """Convert a checkpoint folder between our format, Hugging Face and Meta / Mistral; an adapter folder
    (LoRA training's RUN/adapter) exports merged into its base, or as a peft adapter (`lmforge lora export`).

    Args:
        src: our folder, a Hugging Face Llama / Mistral / Mixtral folder, or a Meta folder (params.json +
            consolidated.*.pth); a reward model (ours, or a *ForSequenceClassification) converts too.
        dst: output folder: missing, empty, or one lmforge wrote (then --overwrite true replaces it); a
            folder with anything else in it is refused. Written under a temporary name, renamed when complete.
        to: "lmforge" (our safetensors format), "hf" (a folder transformers and vLLM load), or, for an adapter
            folder only, "peft" (adapter_config.json + adapter_model.safetensors for the base's "hf" export).
        dtype: cast the weights; default keeps the source dtype.
        overwrite: replace DST if it is an earlier lmforge output.
    """
    src_path, dst_path = Path(src), Path(dst)
    if (src_path / "adapter.safetensors").is_file():  # an adapter folder (lmforge.lora.save_lora)
        from lmforge.lora_export import export_lora

        return export_lora(src_path, dst_path, to=to, dtype=dtype, overwrite=overwrite)
    if to == "peft":
        raise ValueError(f"--to peft exports an adapter folder (config.json + adapter.safetensors); {src} is not one")
    claim_output_dir(dst_path, overwrite)  # before loading: a refusal should not wait for the weights
    torch_dtype = getattr(torch, dtype) if dtype else None
    with tqdm(total=2, desc=f"convert -> {to}", unit="step") as bar:
        model = load_model(src_path, dtype=torch_dtype, progress=True, head=None)  # a language or reward model
        bar.update()
        tokenizer = src_path / "tokenizer.model"
        tokenizer = tokenizer if tokenizer.exists() else None
        if to == "hf":
            export_hf(model, dst_path, tokenizer_path=tokenizer, overwrite=overwrite)
        else:
            save_model(model, dst_path, tokenizer_path=tokenizer, overwrite=overwrite, progress=True)
        bar.update()
    print(f"wrote {dst_path} ({to}, {model.num_parameters():,} parameters)")
