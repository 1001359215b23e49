"""Tokenizer: SentencePiece wrapper and trainer (Llama 2 settings), Llama 2 chat format with loss masks, and
the Hugging Face export."""

from lmforge.tokenizer.chat import CHAT_TEMPLATE, ChatEncoding, ChatFormatError, encode_chat
from lmforge.tokenizer.hf_export import export_hf_tokenizer
from lmforge.tokenizer.tokenizer import Tokenizer, TokenizerError
from lmforge.tokenizer.train import train_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "ChatEncoding",
    "ChatFormatError",
    "Tokenizer",
    "TokenizerError",
    "encode_chat",
    "export_hf_tokenizer",
    "train_tokenizer",
]
