"""The paged decode attention kernel in Triton (triton_decode.py) against the compiled kernel's eager form and
the reference attention: GQA of 1 to 4 query heads per kv head, scattered slots, masked keys, splits of a
row's keys; and the engine's static decode steps with it. On the CPU the kernel runs under Triton's
interpreter (tests/conftest.py); the GPU test (test_engine_gpu_speed.py) runs it compiled."""

import os

import pytest
import torch

from engine_helpers import forced_logits, random_seq
from infer_helpers import assert_logits_close, full_logits, tiny_model
from lmforge.infer.engine import LLMEngine
from lmforge.infer.engine.paged_attention import gathered_decode_attention
from lmforge.infer.engine.triton_decode import available, num_splits, paged_decode_attention
from lmforge.models.attention import reference_attention

pytestmark = pytest.mark.skipif(
    not available() or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs Triton (on the CPU, its interpreter)")


def test_the_split_worked_example():
    assert num_splits(1, 32, 512) == 9 and num_splits(64, 32, 512) == 1 and num_splits(1, 8, 40) == 2


@pytest.mark.parametrize("G, H, Hkv, D, K, splits", [(3, 4, 2, 16, 40, None), (1, 8, 8, 32, 70, None),
                                                   (2, 6, 2, 8, 33, None), (2, 4, 1, 16, 7, None),
                                                   (2, 4, 2, 16, 130, 1), (1, 2, 1, 16, 300, 3)])
def test_kernel_equals_the_reference(G, H, Hkv, D, K, splits):
    """r = 2, 1, 3 (padded to 4) and 4 query heads per kv head; keys in scattered pool slots, about 40% masked
    at random, a row's last keys masked (the bucket's tail); 1 to 3 splits per row of one iteration each, or
    splits of 4 or 5 iterations (where the running max and sums are rescaled)."""
    torch.manual_seed(G * 100 + K)
    S = 120
    q, kp, vp = torch.randn(G, H, D), torch.randn(S, Hkv, D), torch.randn(S, Hkv, D)
    slots = torch.randint(0, S, (G, K))
    allowed = torch.rand(G, K) < 0.6
    allowed[:, 0], allowed[0, K // 2 :] = True, False
    ours = paged_decode_attention(q, kp, vp, slots, allowed, splits)
    keys, values = kp[slots].permute(0, 2, 1, 3), vp[slots].permute(0, 2, 1, 3)  # (G, Hkv, K, D)
    reference = reference_attention(q[:, :, None], keys, values, allowed[:, None, None])[:, :, 0]
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, gathered_decode_attention(q, kp, vp, slots, allowed), rtol=1e-5, atol=1e-6)


def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA model"):
        LLMEngine(tiny_model("tiny"), num_blocks=64, decode_path="eager", decode_attention="triton")


@pytest.mark.slow
def test_engine_decode_steps_with_the_triton_kernel_compute_the_models_logits():
    """(slow only under the interpreter: every kernel call is run element by element in numpy)"""
    model = tiny_model("tiny-swa")  # W = 8: keys of freed blocks stay behind the window
    seqs, prompts = [random_seq(20, 80), random_seq(17, 81)], [5, 2]
    engine = LLMEngine(model, block_size=4, num_blocks=256, max_num_batched_tokens=16, max_num_seqs=8,
                       decode_path="eager", decode_attention="triton", check_invariants=True)
    ours = forced_logits(engine, seqs, prompts)
    assert engine.runner.decode.steps > 10 and engine.runner.decode.kernel is paged_decode_attention
    for seq, P, logits in zip(seqs, prompts, ours):
        assert_logits_close(logits, full_logits(model, seq)[P - 1 : -1])
