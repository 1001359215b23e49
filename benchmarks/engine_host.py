"""Host-side cost of one engine decode step, on the CPU: what the Python side adds to every step whatever the
GPU does (the device work is measured by benchmarks/serving.py).

    PYTHONPATH=src python3 benchmarks/engine_host.py

64 running requests with contexts of about 200 to 390 tokens, block size 16, seeded sampling (per-request
generators), vocabulary 32,000. Times, median of --repeats calls after warm-up:

    fill            the static-shape decode step's inputs: block-table slices, positions (decode_graphs.py)
    sampling_batch  per-request sampling parameters and generators for the step (runner.py)
    schedule        the scheduler's step: budget, blocks, chunks; and step_done's book-keeping

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lmforge import ModelConfig, Transformer
from lmforge.infer.engine import LLMEngine
from lmforge.infer.engine.decode_graphs import _Shape, batch_bucket, key_bucket
from lmforge.infer.engine.runner import sampling_batch
from lmforge.infer.sampling import SamplingParams


def median_us(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1e6 * statistics.median(times), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=128, vocab_size=32000, max_seq_len=1024)
    model = Transformer(config).eval()
    engine = LLMEngine(model, block_size=16, num_blocks=4096, max_num_seqs=256, max_num_batched_tokens=8192,
                       decode_path="eager")
    for i in range(args.rows):  # prompts of 200 + 3 i tokens: contexts differ, as in real traffic
        params = SamplingParams(temperature=1.0, max_new_tokens=10_000, ignore_eos=True, seed=i)
        engine.add_request(list(range(1, 201 + 3 * i)), params)
    while engine.counters.waiting or any(s.num_to_compute > 1 for s in engine.scheduler.running):
        engine.step()
    engine.step()
    step = engine.scheduler.schedule()  # a decode step, its blocks allocated (not run: measured below)
    seqs = [c.seq for c in step.chunks]
    positions = [c.start for c in step.chunks]
    tokens, tables, lo = [s.token_ids[p] for s, p in zip(seqs, positions)], [s.block_table for s in seqs], [0] * len(seqs)
    decode = engine.runner.decode
    shape = _Shape(batch_bucket(len(seqs)), key_bucket(max(positions) + 1), 16, "cpu")

    row = {
        "rows": len(seqs), "max_context": max(positions) + 1, "torch": torch.__version__,
        "fill_us": median_us(lambda: decode._fill(shape, tokens, positions, tables, lo), args.repeats),
        "sampling_batch_us": median_us(lambda: sampling_batch(seqs, config.vocab_size, "cpu"), args.repeats),
    }
    engine._advance(step, seqs, [1] * len(seqs))
    t = time.perf_counter()  # schedule + book-keeping of 20 steps, each forcing token 1 without a forward
    for _ in range(20):
        out = engine.scheduler.schedule()
        engine._advance(out, [c.seq for c in out.chunks], [1] * len(out.chunks))
    row["schedule_and_advance_us"] = round(1e6 * (time.perf_counter() - t) / 20, 1)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
