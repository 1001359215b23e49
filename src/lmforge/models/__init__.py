"""Model definition, configuration, checkpoint format and conversion."""

from lmforge.models.config import ConfigError, ModelConfig, MoEConfig, PRESETS
from lmforge.models.transformer import Transformer

__all__ = ["ConfigError", "ModelConfig", "MoEConfig", "PRESETS", "Transformer"]
