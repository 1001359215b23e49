"""The reward model: a transformer trunk whose head gives one scalar per sequence, read at its last token.

Llama 2's reward models are its chat model with the next-token head replaced by a regression head: the same
trunk (embeddings, blocks, final norm), then r = w . h_last with w of shape (1, d) and h_last the final
hidden state of the sequence's last token (its closing </s>). In lmforge that is a `Transformer` built with
`ModelConfig(head="reward")`: its forward returns (B, T, 1), one reward per position, and its weights are
saved like any model's, the head as `reward_head.weight` (a language model's is `output.weight`, (V, d)).

    init_reward_model(path)        the trunk of a language model (an SFT checkpoint), a fresh small head
    sequence_rewards(model, ...)   (B,) rewards of a right-padded batch, each read at its row's last real token
    score_sequences(model, seqs)   rewards of any number of token sequences, batched by length (PPO and
                                   rejection sampling score their rollouts with it)

Reading at the last real token: row b of a right-padded (B, T) batch has its last token at lengths[b] - 1; on
a causal model the padding after it changes nothing before it, so the score does not depend on how much
padding there is. A left-padded row works too if its padding is a document of its own and its positions
restart at 0 where the sequence starts (`document_ids`, `positions`): tests check both against the sequence
alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lmforge.models.transformer import Transformer


def init_reward_model(path: str | Path, device=None, dtype: torch.dtype | None = None, seed: int = 0) -> Transformer:
    """A reward model to train: from a language model folder (any format `load_model` reads), its trunk and
    a new head initialised small (`Transformer.init_weights`, seeded by `seed`); from a reward model folder,
    that model as it is (training it further)."""
    from lmforge.models.checkpoint import load_model, model_from_state_dict

    lm = load_model(path, device=device, dtype=dtype, head=None)
    if lm.config.head == "reward":
        return lm
    config = dataclasses.replace(lm.config, head="reward")
    state = {k: v for k, v in lm.state_dict().items() if k != "output.weight"}
    generator = torch.Generator().manual_seed(seed)
    head = torch.randn(1, config.dim, generator=generator) * (0.02 * config.dim**-0.5)  # as init_weights
    state["reward_head.weight"] = head.to(state["norm.weight"])
    return model_from_state_dict(config, state, f"reward model from {path}")


def sequence_rewards(model: torch.nn.Module, tokens: Tensor, lengths: Tensor, positions: Tensor | None = None,
                     document_ids: Tensor | None = None, last: Tensor | None = None) -> Tensor:
    """Rewards (B,) float32 of the rows of `tokens` (B, T), each read at its last real token.

    lengths: (B,) real tokens per right-padded row (the reward is read at index lengths - 1). `last` (B,)
    replaces lengths - 1 for other layouts (a left-padded row's last index is T - 1); positions and
    document_ids go to the model as in training (module docstring). Only the B last hidden states go through
    the head (`logits_index`).
    """
    index = (lengths - 1 if last is None else last)[:, None]  # (B, 1)
    out = model(tokens, positions, document_ids=document_ids, logits_index=index)  # (B, 1, 1)
    return out[:, 0, 0].float()


@torch.no_grad()
def score_sequences(model: torch.nn.Module, sequences: Sequence[Sequence[int]], max_batch_tokens: int = 16384,
                    precision_context=None) -> list[float]:
    """The reward of each token sequence (each ending where its score is read, normally at </s>).

    Sequences are sorted by length and batched, right-padded, into forwards of at most `max_batch_tokens`
    padded tokens (at least one sequence each), so memory stays bounded and little is padding; the results
    come back in the input order. `precision_context`: a context manager for the forwards (e.g. bf16 autocast).
    """
    from lmforge.align.preference_data import PAD_ID

    if not sequences:
        return []
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    if not sequences[order[0]]:
        raise ValueError(f"sequence {order[0]} is empty: a reward is read at a sequence's last token")
    scores = [0.0] * len(sequences)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and len(sequences[order[end]]) * (end + 1 - start) <= max_batch_tokens:
            end += 1  # sorted by length: the batch's longest is its last, so padded size = longest * rows
        group = order[start:end]
        T = len(sequences[group[-1]])
        tokens = torch.full((len(group), T), PAD_ID, dtype=torch.int64)
        for row, i in enumerate(group):
            tokens[row, : len(sequences[i])] = torch.as_tensor(list(sequences[i]), dtype=torch.int64)
        lengths = torch.tensor([len(sequences[i]) for i in group])
        with precision_context or contextlib.nullcontext():
            rewards = sequence_rewards(model, tokens.to(device), lengths.to(device))
        for i, r in zip(group, rewards.tolist()):
            scores[i] = r
        start = end
    return scores


__all__ = ["init_reward_model", "score_sequences", "sequence_rewards"]
