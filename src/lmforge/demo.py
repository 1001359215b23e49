"""`make demo`: the main job. Until pre-training lands it builds a tiny model, saves it, loads it back and
runs a forward pass, showing what a newcomer needs to see."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from lmforge import ModelConfig, Transformer
from lmforge.models.checkpoint import load_model, save_model


def main() -> None:
    start = time.time()
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny-moe")
    model = Transformer(config)
    print(f"built preset 'tiny-moe': {model.num_parameters():,} parameters "
          f"({model.num_parameters(active=True):,} active per token)")
    out = Path(tempfile.mkdtemp(prefix="lmforge-demo-")) / "tiny-moe"
    save_model(model, out)
    back = load_model(out)
    tokens = torch.randint(0, config.vocab_size, (1, 16))
    with torch.no_grad():
        logits, aux = back(tokens, return_aux=True)
    print(f"saved and reloaded {out}: {sorted(p.name for p in out.iterdir())}")
    print(f"forward pass: tokens {tuple(tokens.shape)} -> logits {tuple(logits.shape)}, "
          f"router load-balance loss {aux.load_balance.item():.4f}")
    print(f"done in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
