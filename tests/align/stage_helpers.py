"""Helpers of the tests of the stages after SFT (gatt, eval gatt, distill-safety, redteam): a small world folder
with a tokenizer trained on its corpus and a tiny random model saved with it, and a stub answerer that records
what it was asked, and the attention probe's reconstruction of every attention module's output (importable as
`stage_helpers`: pytest puts each test folder on sys.path)."""

from dataclasses import dataclass
from pathlib import Path

import torch
from helpers import WORLD_SMALL, unit_scale_

from lmforge import ModelConfig, Transformer
from lmforge.align.attention_probe import recompute_probs
from lmforge.align.world.build import build_world
from lmforge.align.world.records import WorldSizes
from lmforge.models.attention import repeat_kv
from lmforge.models.checkpoint import save_model
from lmforge.models.transformer import Attention
from lmforge.tokenizer import Tokenizer, train_tokenizer


@dataclass
class StageWorld:
    root: Path
    world: Path  # the world folder (WORLD_SMALL sizes, seed 0)
    model_dir: Path  # a tiny random model (unit scale: its greedy answers vary) with the world's tokenizer
    model: Transformer
    tokenizer: Tokenizer


def build_stage_world(root: Path, seed: int = 0) -> StageWorld:
    build_world(root / "world", seed=0, sizes=WorldSizes(**WORLD_SMALL))
    tok_path = train_tokenizer([str(root / "world" / "corpus")], out_dir=str(root / "tok"), vocab_size=600)
    torch.manual_seed(seed)
    model = unit_scale_(Transformer(ModelConfig.from_name("tiny", vocab_size=600, max_seq_len=512))).eval()
    save_model(model, root / "model", tokenizer_path=tok_path)
    return StageWorld(root, root / "world", root / "model", model, Tokenizer(tok_path))


class Recorder:
    """An answerer `answer(dialogues, sampling) -> texts` that answers each dialogue with `reply(dialogue)` and
    records every dialogue it was sent, in order."""

    def __init__(self, reply):
        self.reply, self.seen = reply, []

    def __call__(self, dialogues, sampling):
        self.seen += [[dict(m) for m in d] for d in dialogues]
        return [self.reply(d) for d in dialogues]


def probe_reconstructions(model: Transformer, tokens: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """One forward of `tokens`; per attention module, in order: (P v through wo, the module's own output, P),
    P (B, H, T, T) the weights `recompute_probs` reads from the module's input."""
    seen = []

    def hook(module, args, output):
        x, cos, sin, _, _ = args
        probs = recompute_probs(module, x, cos, sin, torch.arange(x.shape[1], device=x.device))  # (B, H, T, T)
        v = module.wv(x).view(*x.shape[:2], -1, module.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        out = (probs @ repeat_kv(v, probs.shape[1] // v.shape[1]).float()).transpose(1, 2).flatten(2)
        seen.append((module.wo(out.to(x.dtype)), output, probs))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Attention)]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    return seen
