"""The serving engine: paged KV cache, continuous batching with chunked pre-fill, preemption and abort.

    sequence.py         request state (tokens still to compute)
    block_manager.py    blocks, reference counts, block tables, prefix sharing, forks (copy-on-write),
                        sliding-window freeing
    scheduler.py        one token budget per step; admission, preemption by recompute, abort
    paged_attention.py  the pool and attention over it for a packed batch (KVCache protocol)
    decode_graphs.py    decode-only steps at static (bucketed) shapes, replayed from CUDA graphs
    runner.py           tensors for a step, the model call, batched sampling
    llm.py              LLMEngine: add_request, add_samples, step, stream, abort, counters, score,
                        load_weights
"""

from lmforge.infer.engine.block_manager import BlockManager
from lmforge.infer.engine.llm import EngineCounters, LLMEngine, RequestOutput
from lmforge.infer.engine.scheduler import RefusalReason, RequestRefused, Scheduler, SchedulerConfig
from lmforge.infer.engine.sequence import FinishReason, Sequence, SequenceStatus

__all__ = [
    "BlockManager", "EngineCounters", "FinishReason", "LLMEngine", "RefusalReason", "RequestOutput",
    "RequestRefused", "Scheduler", "SchedulerConfig", "Sequence", "SequenceStatus",
]
