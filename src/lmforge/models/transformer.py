"""The transformer of Llama 2, Mistral 7B and Mixtral, top to bottom as the papers describe it.

Notation: B batch, T tokens, d model width, H query heads, Hkv key/value heads, D head dim, f feed-forward
width, V vocabulary. Parameter names are Meta's reference names (`tok_embeddings`, `layers.N.attention.wq`,
`feed_forward.w1`, `attention_norm`, `ffn_norm`, `norm`, `output`), so Meta and Mistral checkpoints load
without renaming; Hugging Face names go through `lmforge.models.convert`.

The model is single-device and holds no training, parallelism or sampling logic. Build large models on the
meta device and materialise them explicitly:

    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name("llama2-7b"))
    model.to_empty(device="cuda")
    model.init_weights()
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.models.attention import Backend, KVCache, causal_attention
from lmforge.models.config import ModelConfig
from lmforge.models.moe import MoE, RouterLosses


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back (as Meta's reference)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, each (..., T, D/2) in float32, for integer positions (..., T).

    Pair p of a head rotates by angle pos * theta^(-2p / D). Angles are computed from the positions on the
    fly, so there is no table to outgrow: a sliding-window model can decode past `max_seq_len`.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float().unsqueeze(-1) * inv_freq  # (..., T, D/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2p], x[2p+1]) of each head by the angles (Meta's interleaved layout).

    x: (B, heads, T, D); cos, sin: (T, D/2) or (B, T, D/2).
    """
    if cos.dim() == 3:  # per-sequence positions: (B, T, D/2) -> (B, 1, T, D/2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.float().unflatten(-1, (-1, 2))  # (B, heads, T, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, heads, T, D/2, 2)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings and an optional sliding window."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.window = config.sliding_window
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.backend: Backend = "auto"
        # wq | wk | wv stacked, with the three weights views into it (lmforge.infer.fuse); not saved
        self.register_buffer("wqkv", None, persistent=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, document_ids: Tensor | None
    ) -> Tensor:
        B, T, _ = x.shape
        # NOTE: head counts are read off the shapes (-1), not the config: under tensor parallelism each rank
        # holds H / tp query and Hkv / tp key/value heads (lmforge.parallel.apply_tensor_parallel).
        if self.wqkv is not None and not torch.is_grad_enabled():  # one product instead of three (no autograd)
            q, k, v = F.linear(x, self.wqkv).split([w.weight.shape[0] for w in (self.wq, self.wk, self.wv)], -1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            out = causal_attention(q, k, v, window=self.window, document_ids=document_ids, backend=self.backend)
        else:
            out = cache.attend(self.layer_id, q, k, v)  # the cache applies the causal / window rule
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H * D)
        return self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Returns (output, None): the same shape of result as `MoE`."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)
        self.register_buffer("w13", None, persistent=False)  # w1 | w3 stacked, as Attention.wqkv

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        if self.w13 is not None and not torch.is_grad_enabled():
            gate, up = F.linear(x, self.w13).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up), None
        return self.w2(F.silu(self.w1(x)) * self.w3(x)), None


class TransformerBlock(nn.Module):
    """Pre-norm residual block: attention, then a dense or mixture-of-experts feed-forward."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.attention = Attention(config, layer_id)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        if config.moe is None:
            self.feed_forward: FeedForward | MoE = FeedForward(config.dim, config.ffn_dim)
        else:
            self.feed_forward = MoE(config.dim, config.ffn_dim, config.moe)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, document_ids: Tensor | None
    ) -> tuple[Tensor, RouterLosses | None]:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, document_ids)
        ffn_out, router = self.feed_forward(self.ffn_norm(h))
        return h + ffn_out, router


class Transformer(nn.Module):
    """Token ids in, logits (or final hidden states) out.

    forward(tokens (B, T), positions=None, cache=None) -> logits (B, T, V), or for a reward model
    (config.head "reward") rewards (B, T, 1): one scalar per position, the sequence's score being the one at
    its last token.

    - positions: (T,) or (B, T) integer positions for rotary embeddings (default 0..T-1). Caches and packed
      batches pass them explicitly.
    - cache: an object following `lmforge.models.attention.KVCache`; None attends within `tokens` only.
    - document_ids: (B, T) ints; tokens attend only within their document (packed pre-training).
    - return_hidden: return the normalised final hidden states (B, T, d) instead of logits, e.g. for a
      chunked cross-entropy or a reward head.
    - logits_index: (B, K) positions along T whose logits are wanted (e.g. each prompt's last token);
      only those go through the head -> (B, K, V) (a reward model: (B, K, 1)).
    - return_aux: also return the `RouterLosses` averaged over the MoE layers (zeros for a dense model).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # The head, chosen here once: next-token logits, or the regression head of a reward model (Llama 2
        # replaces the next-token head of a chat model by one scalar output). NOTE: its own name, so that a
        # reward model's weights can never be read as a language model's (or the reverse) by mistake.
        if config.head == "reward":
            self.reward_head = nn.Linear(config.dim, 1, bias=False)  # (B, T, d) -> (B, T, 1)
        else:
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False)  # (B, T, d) -> (B, T, V)
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()

    @property
    def head(self) -> nn.Linear:
        """The final projection the model was built with: `output` (V logits) or `reward_head` (one scalar)."""
        return self.reward_head if self.config.head == "reward" else self.output

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Initialise every parameter in place (also after `to_empty()` from the meta device).

        - embeddings and every input projection (wq, wk, wv, w1, w3, router): normal(0, std);
        - projections that write into the residual stream (wo, w2): normal(0, std / sqrt(2 * n_layers)),
          so that the residual's variance does not grow with depth (GPT-2's scaled initialisation);
        - the output projection: normal(0, d^-0.5), so initial logits have unit scale;
        - a reward head: normal(0, std / sqrt(d)), so initial rewards are small (about std times the hidden
          states' scale): the ranking loss starts near log 2 and the first steps do not push the trunk hard;
        - RMSNorm weights: ones.
        """
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name == "output.weight":
                nn.init.normal_(p, std=self.config.dim**-0.5)
            elif name == "reward_head.weight":
                nn.init.normal_(p, std=std * self.config.dim**-0.5)
            elif name.endswith(("wo.weight", "w2.weight", "feed_forward.w2")):
                nn.init.normal_(p, std=residual_std)
            else:
                nn.init.normal_(p, std=std)

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        *,
        document_ids: Tensor | None = None,
        return_hidden: bool = False,
        logits_index: Tensor | None = None,
        return_aux: bool = False,
    ) -> Tensor | tuple[Tensor, RouterLosses]:
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        h = self.tok_embeddings(tokens)  # (B, T, d)
        routers = []
        for layer in self.layers:
            h, router = layer(h, cos, sin, cache, document_ids)
            if router is not None:
                routers.append(router)
        h = self.norm(h)
        if logits_index is not None:
            h = torch.gather(h, 1, logits_index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, K, d)
        out = h if return_hidden else self.head(h)
        if not return_aux:
            return out
        return out, _mean_router_losses(routers, h)

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count; with `active`, only those one token uses (top_k of the experts of an MoE)."""
        total = sum(p.numel() for p in self.parameters())
        moe = self.config.moe
        if active and moe is not None:
            per_expert = 3 * self.config.dim * self.config.ffn_dim
            total -= (moe.num_experts - moe.top_k) * per_expert * self.config.n_layers
        return total


def _mean_router_losses(routers: list[RouterLosses], like: Tensor) -> RouterLosses:
    """Average the per-layer router losses (each layer balances its own experts)."""
    if not routers:
        zero = like.new_zeros((), dtype=torch.float32)
        return RouterLosses(zero, zero)
    n = len(routers)
    return RouterLosses(
        sum(r.load_balance for r in routers) / n,
        sum(r.z_loss for r in routers) / n,
    )
