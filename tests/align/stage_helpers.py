"""Helpers of the tests of the stages after SFT (gatt, eval gatt, distill-safety, redteam): a small world folder
with a tokenizer trained on its corpus and a tiny random model saved with it, and a stub answerer that records
what it was asked (importable as `stage_helpers`: pytest puts each test folder on sys.path)."""

from dataclasses import dataclass
from pathlib import Path

import torch
from helpers import WORLD_SMALL, unit_scale_

from lmforge import ModelConfig, Transformer
from lmforge.align.world.build import build_world
from lmforge.align.world.records import WorldSizes
from lmforge.models.checkpoint import save_model
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
