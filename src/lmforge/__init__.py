"""lmforge: train, align and serve Llama 2 / Mistral / sparse-MoE language models with one PyTorch codebase."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the module it comes from. NOTE: imported on first use (PEP 562 `__getattr__`), not here: importing
# torch takes seconds, and `lmforge --help` or `lmforge.io` must not pay for it.
_EXPORTS = {
    # model (issue 1)
    "ConfigError": "lmforge.models.config", "ModelConfig": "lmforge.models.config", "MoEConfig": "lmforge.models.config",
    "Transformer": "lmforge.models.transformer",
    "CheckpointError": "lmforge.models.checkpoint", "load_model": "lmforge.models.checkpoint",
    "save_model": "lmforge.models.checkpoint",
    # inference
    "GenerationError": "lmforge.infer.generate", "GenerationResult": "lmforge.infer.generate",
    "generate": "lmforge.infer.generate", "generate_stream": "lmforge.infer.generate",
    "SamplingParams": "lmforge.infer.sampling", "SamplingParamsError": "lmforge.infer.sampling",
    # tokenizer and data (issue 3)
    "Batch": "lmforge.data", "DataError": "lmforge.data", "PackedLoader": "lmforge.data",
    "prepare_data": "lmforge.data", "write_token_documents": "lmforge.data",
    "ChatEncoding": "lmforge.tokenizer", "ChatFormatError": "lmforge.tokenizer", "Tokenizer": "lmforge.tokenizer",
    "TokenizerError": "lmforge.tokenizer", "encode_chat": "lmforge.tokenizer",
    "export_hf_tokenizer": "lmforge.tokenizer", "train_tokenizer": "lmforge.tokenizer",
    # pre-training (issue 5)
    "DataConfig": "lmforge.train", "OptimConfig": "lmforge.train", "RunConfig": "lmforge.train",
    "TrainConfig": "lmforge.train", "evaluate": "lmforge.train", "pretrain": "lmforge.train",
    # serving engine (issue 7)
    "LLMEngine": "lmforge.infer.engine", "RefusalReason": "lmforge.infer.engine",
    "RequestOutput": "lmforge.infer.engine", "RequestRefused": "lmforge.infer.engine",
    # export (issue 15)
    "export_hf": "lmforge.export",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
