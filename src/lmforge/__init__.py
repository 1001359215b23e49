"""lmforge: train, align and serve Llama 2 / Mistral / sparse-MoE language models with one PyTorch codebase."""

from lmforge.models.config import ConfigError, ModelConfig, MoEConfig
from lmforge.models.transformer import Transformer

__version__ = "0.1.0"

__all__ = ["ConfigError", "ModelConfig", "MoEConfig", "Transformer", "__version__"]
