"""Pre-training: the loop (pretrain.py), its option groups, AdamW + schedule, losses, checkpoints, metrics."""

from lmforge.train.config import DataConfig, RunConfig, TrainConfig, TrainConfigError
from lmforge.train.evaluate import evaluate, evaluate_loss, perplexity
from lmforge.train.losses import chunked_cross_entropy
from lmforge.train.optim import OptimConfig, lr_factor
from lmforge.train.harness import NonFiniteLossError
from lmforge.train.pretrain import pretrain

__all__ = [
    "DataConfig", "NonFiniteLossError", "OptimConfig", "RunConfig", "TrainConfig", "TrainConfigError",
    "chunked_cross_entropy", "evaluate", "evaluate_loss", "lr_factor", "perplexity", "pretrain",
]
