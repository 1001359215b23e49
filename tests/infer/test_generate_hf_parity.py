"""Greedy generation against Hugging Face transformers' own `generate` on the same tiny random models,
converted with the real converter (save_pretrained -> load_model).

Compared step by step: the sequences must agree at every step where our top-2 log-prob gap exceeds 1e-4;
at the first step where they differ (only allowed at a near-tie) the comparison of that prompt stops, since
the two continuations then condition on different tokens."""

import pytest
import torch

from helpers import unit_scale_

transformers = pytest.importorskip("transformers")

from lmforge.infer.generate import generate  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.models.checkpoint import load_model  # noqa: E402

# NOTE: no eos id: HF would suppress it below min_new_tokens (changing its argmax) or stop at it.
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, bos_token_id=1, eos_token_id=None, pad_token_id=0)
NEW = 24
GAP = 1e-4


def _hf_model(family):
    T = transformers
    if family == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**SMALL, num_key_value_heads=2))
    if family == "mistral":  # window 6 < prompt + output: HF's sliding cache and our rolling buffer both wrap
        return T.MistralForCausalLM(T.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=6))
    return T.MixtralForCausalLM(T.MixtralConfig(**SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))


@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral"])
def test_greedy_tokens_agree_with_transformers(family, tmp_path):
    torch.manual_seed(0)
    hf = _hf_model(family)
    unit_scale_(hf)
    hf.save_pretrained(tmp_path / "hf")
    hf = type(hf).from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ours = load_model(tmp_path / "hf").eval()
    if family == "mistral":
        assert ours.config.sliding_window == 6

    prompts = [torch.randint(3, 128, (n,)).tolist() for n in (5, 13, 9)]
    params = SamplingParams(temperature=0, max_new_tokens=NEW, ignore_eos=True, logprobs=True, top_logprobs=2)
    results = generate(ours, None, prompts, params)  # one batch of mixed lengths
    compared = 0
    for prompt, r in zip(prompts, results):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )
        theirs = out[0, len(prompt):].tolist()
        assert len(theirs) == len(r.token_ids) == NEW
        for step, (a, b, top) in enumerate(zip(r.token_ids, theirs, r.top_logprobs)):
            gap = top[0][1] - top[1][1]
            if a != b:
                assert gap <= GAP, f"{family}: step {step} differs ({a} vs {b}) with a clear top-2 gap {gap:.3g}"
                break
            compared += gap > GAP
    assert compared >= 2 * NEW  # most steps were real comparisons
