"""Tiny random models for the inference tests: CPU, float32, weights of unit-ish scale.

`init_weights()` shrinks the residual branches, so that attention barely moves the logits of a fresh model;
unit-scale weights make every attention mistake (a wrong window, a stale slot) show far above 1e-5.
"""

import functools

import torch

from helpers import CORPUS, tiny_tokenizer_path, unit_scale_  # noqa: F401 - re-exported

from lmforge import ModelConfig, Transformer


@functools.lru_cache(maxsize=None)
def tiny_model(preset: str = "tiny", **overrides) -> Transformer:
    """A cached random model; tests must not modify it."""
    torch.manual_seed(1234)
    model = Transformer(ModelConfig.from_name(preset, **overrides))
    return unit_scale_(model).eval()


def assert_logits_close(ours: torch.Tensor, reference: torch.Tensor, tol: float = 1e-5) -> None:
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    assert reference.abs().max() > 1.0  # a comparison of meaningful logits, not of near-zero ones
    err = (ours - reference).abs().max().item()
    assert err <= tol, f"max |difference| {err:.3g} > {tol}"


def full_logits(model: Transformer, seq: list[int]) -> torch.Tensor:
    """Logits (T, V) of one sequence by a forward pass without any cache (the model's own masking)."""
    with torch.no_grad():
        return model(torch.tensor([seq]))[0]


def cached_logits(model, seqs, prompt_lens, chunk, kind="auto", attention="sdpa"):
    """Teacher-forced logits (T_b, V) of each sequence through a cache: the prompts (of lengths prompt_lens)
    pre-filled together, left-padded, in chunks of `chunk` columns with every column's logits kept; then the
    rest of each sequence fed one token per step, all rows at once (every row has the same number of steps)."""
    from lmforge.infer.cache import make_cache
    from lmforge.infer.generate import _left_pad

    steps = {len(s) - p for s, p in zip(seqs, prompt_lens)}
    assert len(steps) == 1, "every row decodes the same number of steps"
    n_steps = steps.pop()
    B = len(seqs)
    cache = make_cache(model.config, B, max(len(s) for s in seqs) + 1, kind=kind, attention=attention)
    tokens, positions = _left_pad([s[:p] for s, p in zip(seqs, prompt_lens)], "cpu")
    T = tokens.shape[1]
    out = [[] for _ in range(B)]
    with torch.no_grad():
        for start in range(0, T, chunk):
            tok, pos = tokens[:, start : start + chunk], positions[:, start : start + chunk]
            logits = model(tok, pos, cache=cache.prefill(pos, int(pos.max()) + 1))
            for b in range(B):
                out[b].extend(logits[b, c] for c in range(tok.shape[1]) if pos[b, c] >= 0)
        for t in range(n_steps):
            tok = torch.tensor([[s[p + t]] for s, p in zip(seqs, prompt_lens)])
            pos = torch.tensor([[p + t] for p in prompt_lens])
            logits = model(tok, pos, cache=cache.decode(pos))[:, -1]
            for b in range(B):
                out[b].append(logits[b])
    return [torch.stack(rows) for rows in out], cache
