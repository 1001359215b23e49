"""lmforge: train, align and serve Llama 2 / Mistral / sparse-MoE language models with one PyTorch codebase."""

from lmforge.data import Batch, DataError, PackedLoader, prepare_data, write_token_documents
from lmforge.infer.generate import GenerationError, GenerationResult, generate, generate_stream
from lmforge.infer.engine import LLMEngine, RefusalReason, RequestOutput, RequestRefused
from lmforge.infer.sampling import SamplingParams, SamplingParamsError
from lmforge.models.config import ConfigError, ModelConfig, MoEConfig
from lmforge.models.transformer import Transformer
from lmforge.train import DataConfig, OptimConfig, RunConfig, TrainConfig, evaluate, pretrain
from lmforge.tokenizer import (
    ChatEncoding, ChatFormatError, Tokenizer, TokenizerError, encode_chat, export_hf_tokenizer, train_tokenizer,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "GenerationError", "GenerationResult", "ModelConfig", "MoEConfig", "SamplingParams",
    "SamplingParamsError", "Transformer", "__version__", "generate", "generate_stream",
    # tokenizer and data (issue 3)
    "Batch", "ChatEncoding", "ChatFormatError", "DataError", "PackedLoader", "Tokenizer", "TokenizerError",
    "encode_chat", "export_hf_tokenizer", "prepare_data", "train_tokenizer", "write_token_documents",
    # pre-training (issue 5)
    "DataConfig", "OptimConfig", "RunConfig", "TrainConfig", "evaluate", "pretrain",
    # serving engine (issue 7)
    "LLMEngine", "RefusalReason", "RequestOutput", "RequestRefused",
]
