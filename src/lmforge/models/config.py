"""Model configuration: one dataclass for Llama 2, Mistral and sparse-MoE models, plus named presets.

Variants are optional sub-configs chosen at construction, never flags tested in `forward`: `sliding_window`
(Mistral) is an int or None, `moe` (Mixtral) is a `MoEConfig` or None. Derived fields (`n_kv_heads` defaulting to
`n_heads`, `head_dim`) are filled and validated in `__post_init__`, so a bad config fails where it is made,
not deep inside a matrix product.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

FORMAT = "lmforge/1"
Head = Literal["lm", "reward"]
HEADS = ("lm", "reward")


class ConfigError(ValueError):
    """A model configuration that cannot describe a working model."""


@dataclass
class MoEConfig:
    """Sparse mixture of experts replacing the feed-forward block (Mixtral: 8 experts, top-2).

    `y = sum over the top_k experts e of softmax(top_k(x W_g))_e * SwiGLU_e(x)`; the softmax runs over the
    k selected router logits only. Training adds `aux_loss_coef * load_balance + z_loss_coef * z_loss`.

    Attributes:
        num_experts: Experts E per layer.
        top_k: Experts k each token is routed to.
        aux_loss_coef: alpha of the Switch-Transformer load-balancing loss (0.02 in the released Mixtral config).
        z_loss_coef: beta of the ST-MoE router z-loss (Mixtral: 0, off).
    """

    num_experts: int = 8
    top_k: int = 2
    # alpha of the Switch-Transformer load-balancing loss; 0.02 is the released Mixtral config's value.
    aux_loss_coef: float = 0.02
    # beta of the ST-MoE router z-loss; Mixtral does not use it (0 switches it off).
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ConfigError(f"moe.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"moe.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ConfigError("moe.aux_loss_coef and moe.z_loss_coef must be >= 0")


@dataclass
class ModelConfig:
    """Shapes of a decoder-only transformer with pre-norm RMSNorm, SwiGLU, rotary embeddings and GQA.

    Notation used across the model code: B batch, T sequence length, d = `dim`, H = `n_heads`,
    Hkv = `n_kv_heads`, D = `head_dim` = d / H, f = `ffn_dim`, V = `vocab_size`, W = `sliding_window`.

    Attributes:
        dim: Model width d.
        n_layers: Transformer blocks.
        n_heads: Query heads H.
        n_kv_heads: Key/value heads (grouped-query attention); None means n_heads (multi-head attention).
        ffn_dim: Hidden width f of each SwiGLU feed-forward (of each expert, for MoE).
        vocab_size: Vocabulary size V.
        max_seq_len: Context length trained on; a sliding-window model can generate past it.
        norm_eps: RMSNorm epsilon.
        rope_theta: Rotary embedding base (10000 for Llama 2 and Mistral v0.1; 1e6 for Mixtral).
        sliding_window: Window W (position i attends to keys j with i - W < j <= i); None for full attention.
        moe: Sparse mixture of experts replacing every feed-forward; None for a dense model.
        head_dim: Per-head width D; None means dim // n_heads.
        head: What the final hidden states are projected to: "lm", next-token logits (the `output` matrix,
            (V, d)); "reward", one scalar per position (the `reward_head` matrix, (1, d)): the regression head
            of Llama 2's reward models, whose score of a sequence is read at its last token.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads = n_heads)
    ffn_dim: int = 11008
    vocab_size: int = 32000
    max_seq_len: int = 4096  # the context trained on; a sliding-window model can generate past it
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = None  # W: position i attends to keys j with i - W < j <= i
    moe: MoEConfig | None = None
    head_dim: int | None = None  # None: dim // n_heads
    head: Head = "lm"  # "reward": a reward model (one scalar per position instead of V logits)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        for name in ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}): "
                "each group of n_heads / n_kv_heads query heads shares one key/value head"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads != 0:
                raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2 != 0:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be None or >= 1, got {self.sliding_window}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("norm_eps and rope_theta must be > 0")
        if self.head not in HEADS:
            raise ConfigError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (1 for MHA)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """The preset called exactly `name`, with fields replaced by `overrides`."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; valid names: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the format tag that marks our checkpoint folders."""
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        fmt = data.pop("format", FORMAT)
        if fmt != FORMAT:
            raise ConfigError(f"config format {fmt!r} is not {FORMAT!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


# Presets, looked up by exact name. Shapes from the papers and the released configs named below; each real
# preset's exact parameter count is tested against a model built on the meta device (tests/models/test_config.py).
PRESETS: dict[str, ModelConfig] = {
    # Llama 2 (Touvron et al. 2023), table 1 and the released params.json files.
    "llama2-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, ffn_dim=11008),
    "llama2-13b": ModelConfig(dim=5120, n_layers=40, n_heads=40, ffn_dim=13824),
    "llama2-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
    # Mistral 7B (Jiang et al. 2023), table 1: GQA with 8 kv heads, window 4096, context 8192.
    "mistral-7b": ModelConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=8192, sliding_window=4096
    ),
    # Mistral 7B v0.2 release notes: 32k context, no sliding window, rope theta 1e6.
    "mistral-7b-v0.2": ModelConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=32768, rope_theta=1e6
    ),
    # Mixtral 8x7B (Jiang et al. 2024): Mistral's trunk, 8 experts, top-2, rope theta 1e6, 32k context.
    "mixtral-8x7b": ModelConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=32768, rope_theta=1e6,
        moe=MoEConfig(num_experts=8, top_k=2, aux_loss_coef=0.02),
    ),
    # Tiny debug models for tests and CPU demos (not from a paper): GQA 4:2, small vocabulary.
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=512, max_seq_len=256),
    "tiny-swa": ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=512, max_seq_len=256,
        sliding_window=8,
    ),
    "tiny-moe": ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=512, max_seq_len=256,
        moe=MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.02, z_loss_coef=1e-3),
    ),
}

# Kept for readers who look for a list: the presets that describe released models.
REAL_PRESETS = tuple(name for name in PRESETS if not name.startswith("tiny"))

__all__ = ["ConfigError", "FORMAT", "HEADS", "Head", "ModelConfig", "MoEConfig", "PRESETS", "REAL_PRESETS"]
