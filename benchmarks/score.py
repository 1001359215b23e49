"""`LLMEngine.score()` against a pre-fill of the same tokens through the engine.

    PYTHONPATH=src python3 benchmarks/score.py                 # CPU: a small model with Llama 2's vocabulary
    PYTHONPATH=src python3 benchmarks/score.py --device cuda   # GPU: Llama-2-7B shapes, bf16, random weights
    PYTHONPATH=src python3 benchmarks/score.py --quick         # tiny shapes (smoke test, seconds)

The workload is N sequences of mixed lengths (uniform in [L/4, L]); the same token ids are

    prefill   added to the engine with max_new_tokens 1 and stepped to the end: every token computed into the
              paged cache, one vocabulary projection per sequence (its last token), one token sampled
    score     engine.score(seqs): every token computed, every position projected to the vocabulary,
              log-softmax, the log-prob of the next token (and with --top_k, the k most likely)

so score does the pre-fill's work plus (T - N) more rows of the vocabulary projection and its softmax; that
extra work alone is timed as "projection" (`score_rows` on (T - N, d) hidden states). Times are the median of
--repeats runs after one warm-up run. Prints one JSON line (score_over_prefill_plus_projection near 1: no
cost beyond the work that scoring adds to a pre-fill).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from serving import build_model  # benchmarks/ is on the path when this script runs

from lmforge import ModelConfig
from lmforge.infer.engine import LLMEngine
from lmforge.infer.engine.scoring import score_rows
from lmforge.infer.sampling import SamplingParams


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_s(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="the tiny preset and a few short sequences")
    ap.add_argument("--sequences", type=int, default=None, help="N (default 16; 64 on CUDA)")
    ap.add_argument("--max_len", type=int, default=None, help="L (default 512; 1024 on CUDA)")
    ap.add_argument("--top_k", type=int, default=0, help="also return the k most likely tokens per position")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size of the CPU model (default 32000)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    args = ap.parse_args(argv)
    device, cuda = args.device, args.device.startswith("cuda")
    threads = torch.get_num_threads()
    if args.threads or args.quick:  # NOTE: tiny matrices gain nothing from threads on a busy machine
        torch.set_num_threads(args.threads or 1)
    try:
        return run(args, device, cuda)
    finally:
        torch.set_num_threads(threads)


def run(args, device: str, cuda: bool) -> dict:
    if args.quick:
        config, N, L = ModelConfig.from_name("tiny"), 4, 64
    elif cuda:
        config, N, L = ModelConfig.from_name("llama2-7b"), 64, 1024
    else:  # NOTE: a small model, but the real vocabulary: the projection score adds is 32,000 wide
        config = ModelConfig(dim=256, n_layers=4, n_heads=4, ffn_dim=688, vocab_size=args.vocab or 32000,
                             max_seq_len=1024)
        N, L = 16, 512
    N, L = args.sequences or N, args.max_len or L
    torch.manual_seed(0)
    model = build_model(config, device, torch.bfloat16 if cuda else torch.float32)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(L // 4, L + 1, (N,), generator=g).tolist()
    seqs = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    tokens = sum(lengths)
    engine = LLMEngine(model, block_size=16, num_blocks=N * (-(-L // 16) + 1), max_num_batched_tokens=8192,
                       max_num_seqs=N)

    def prefill():
        engine.block_manager.reset_prefix_cache()  # NOTE: else repeats find every prompt's blocks cached
        engine.generate(seqs, SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True))

    def score():
        engine.score(seqs, top_k=args.top_k) if args.top_k else engine.score(seqs)

    extra_rows = tokens - 2 * N  # score projects T - N rows, the pre-fill N
    hidden = torch.randn(extra_rows, config.dim, device=device, dtype=next(model.parameters()).dtype)
    targets = torch.randint(0, config.vocab_size, (extra_rows,), device=device)

    def projection():
        with torch.no_grad():
            score_rows(model.output, hidden, targets, config.vocab_size, args.top_k)

    t_prefill = _median_s(prefill, args.repeats, device)
    t_score = _median_s(score, args.repeats, device)
    t_projection = _median_s(projection, args.repeats, device)
    row = {"device": torch.cuda.get_device_name() if cuda else "cpu", "threads": torch.get_num_threads(),
           "dim": config.dim, "layers": config.n_layers, "vocab": config.vocab_size, "sequences": N,
           "tokens": tokens, "top_k": args.top_k, "prefill_s": round(t_prefill, 4), "score_s": round(t_score, 4),
           "projection_s": round(t_projection, 4), "score_tok_per_s": round(tokens / t_score),
           "score_over_prefill": round(t_score / t_prefill, 3),
           "score_over_prefill_plus_projection": round(t_score / (t_prefill + t_projection), 3)}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
