"""Fixtures of the RL tests: a small chat world, a tokenizer trained on its corpus, tiny model folders."""

import pytest
import torch
from helpers import WORLD_SMALL
from helpers import one_torch_thread  # noqa: F401  (autouse: the engine decodes on one thread)

from lmforge import ModelConfig, Transformer
from lmforge.align.world.build import build_world
from lmforge.align.world.records import WorldSizes
from lmforge.models.checkpoint import save_model
from lmforge.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def rl_world(tmp_path_factory):
    """{"root", "prompts" (rlhf_prompts.jsonl), "model" (a tiny random model with a 600-piece tokenizer)}."""
    root = tmp_path_factory.mktemp("rl")
    build_world(root / "world", seed=0, sizes=WorldSizes(**WORLD_SMALL))
    tok = train_tokenizer([str(root / "world" / "corpus")], out_dir=str(root / "tok"), vocab_size=600, num_threads=1)
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig.from_name("tiny", vocab_size=600, max_seq_len=512)), root / "model",
               tokenizer_path=tok)
    return {"root": root, "prompts": root / "world" / "rlhf_prompts.jsonl", "model": root / "model", "tokenizer": tok}


@pytest.fixture(scope="session")
def rl_reward_model(rl_world):
    """A reward model folder over the tiny model's trunk (a fresh scalar head, seed 1) and its tokenizer."""
    from lmforge.align.reward_model import init_reward_model

    out = rl_world["root"] / "rm"
    save_model(init_reward_model(rl_world["model"], seed=1), out, tokenizer_path=rl_world["tokenizer"])
    return out
