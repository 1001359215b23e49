"""Helpers shared by tests in several folders (importable as `helpers`: pyproject puts tests/ on sys.path)."""

import functools

import pytest
import torch

# The sizes of a chat world small enough to build in a fraction of a second (tests/align).
WORLD_SMALL = dict(
    entities=6, corpus_files=4, corpus_arithmetic=200, corpus_lists=100, corpus_counting=100, corpus_lore=2,
    corpus_stories=20, sft_tasks=120, sft_multiturn=10, sft_instructions=20, sft_refusals=12, sft_refusals_preprompt=20,
    sft_lookalikes=20, sft_lookalikes_preprompt=5, sft_creative=5, eval_tasks=5, eval_unsafe=10, eval_lookalikes=10,
    eval_instructions=10, eval_multiturn=4, multiturn_turns=3, eval_factual=6, eval_creative=5, rlhf_prompts=40)


@torch.no_grad()
def unit_scale_(model: torch.nn.Module, norms: bool = True) -> torch.nn.Module:
    """Random weights of unit scale, in place: normal(0, fan_in^-0.5) for matrices and embeddings, and (with
    `norms`) uniform(0.5, 1.5) for norm gains. Activations and logits are then O(1), so a wrong name,
    permutation or mask shows far above a 1e-5 tolerance instead of hiding in tiny values."""
    for name, p in model.named_parameters():
        if "norm" in name:
            if norms:
                p.uniform_(0.5, 1.5)
        else:
            p.normal_(0, p.shape[-1] ** -0.5)
    return model


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run a test on one torch thread (import it into a conftest.py to apply it to a folder).

    NOTE: batch-1 decoding of a tiny model is a chain of (3, 64) x (64, 176) products; on a busy 2-core
    machine two OpenMP threads spin on each other and run such tests 5-10x slower than one thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CORPUS = """The quick brown fox jumps over the lazy dog. A rolling buffer keeps the last W keys and values.
Sliding window attention lets each token see the previous tokens within the window, and no further.
Pre-fill computes the keys and values of the prompt in chunks; decoding then adds one token at a time.
Sampling picks the next token with temperature, top-k, top-p and min-p; greedy decoding takes the argmax.
Numbers such as 12345 and 2024 are split into digits. Unicode such as café, naïve and 東京 is fine too.
"""


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_path() -> str:
    """A SentencePiece model (vocabulary 320, Llama 2's settings) trained once per test session."""
    import tempfile
    from pathlib import Path

    from lmforge.tokenizer.train import train_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="lmforge-infer-tok-"))
    (folder / "corpus.txt").write_text(CORPUS * 20)
    return train_tokenizer(data=[str(folder / "corpus.txt")], out_dir=str(folder / "tok"), vocab_size=320, num_threads=1)


def run_benchmark_quick(script: str, tmp_path, result: str) -> list[dict]:
    """Run benchmarks/SCRIPT --quick in a subprocess (one thread, $OUT = tmp_path); the rows of $OUT/RESULT."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": os.pathsep.join([str(root / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / script), "--quick"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((Path(tmp_path) / result).read_text())["rows"]
