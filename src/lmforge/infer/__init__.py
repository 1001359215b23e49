"""Inference: KV caches (contiguous, rolling buffer), chunked pre-fill, sampling, batched generation, and the
serving engine (engine/)."""

from lmforge.infer.cache import ContiguousCache, RollingCache, make_cache
from lmforge.infer.decode_step import DecodeStep
from lmforge.infer.generate import GenerationError, GenerationResult, TokenEvent, generate, generate_stream
from lmforge.infer.sampling import SamplingParams, SamplingParamsError

__all__ = [
    "ContiguousCache", "DecodeStep", "GenerationError", "GenerationResult", "RollingCache", "SamplingParams",
    "SamplingParamsError", "TokenEvent", "generate", "generate_stream", "make_cache",
]
