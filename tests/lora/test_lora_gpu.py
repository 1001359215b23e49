"""On CUDA: a bf16 base with float32 adapters trains through per-block torch.compile and activation
checkpointing like the eager model (losses within bf16 tolerance), the base stays bit for bit, and the merged
model served by the engine (CUDA-graph decode) gives the adapter model's logits. Run on the device machine
(`pytest -m gpu tests/lora`); skipped elsewhere.

Tolerances: bf16 autocast rtol 2e-2 on losses (8 bits of mantissa; fused and unfused kernels round at different
points); fp32 logits 1e-5 of the largest logit, as on the CPU.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")

from test_lora import CFG, assert_logits_close, base_model, randomize_adapters_  # noqa: E402

from lmforge.lora import apply_lora, base_state_dict, lora_state_dict, merge_lora  # noqa: E402
from lmforge.parallel import ParallelConfig, parallelize  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


def _losses(preset, compile, checkpointing, steps=4):
    torch._dynamo.reset()
    model = apply_lora(base_model(preset).to(CUDA, torch.bfloat16), CFG)
    base = {k: v.clone() for k, v in base_state_dict(model.state_dict()).items()}
    net = parallelize(model, ParallelConfig(compile=compile, activation_checkpointing=checkpointing), CUDA)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    x = torch.randint(0, 512, (4, 65), generator=torch.Generator().manual_seed(0)).to(CUDA)
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = net(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.equal(v, base[k]) for k, v in base_state_dict(model.state_dict()).items())
    assert {v.dtype for v in lora_state_dict(model).values()} == {torch.float32}
    return losses


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_compiled_checkpointed_lora_training_equals_eager(preset):
    eager = _losses(preset, compile=False, checkpointing="none")
    compiled = _losses(preset, compile=True, checkpointing="full")
    assert eager[-1] < eager[0]
    assert compiled == pytest.approx(eager, rel=2e-2)


@pytest.mark.parametrize("preset", ["tiny-swa", "tiny-moe"])
def test_engine_on_cuda_serves_the_merged_model(preset):
    """Teacher-forced logits of the engine (CUDA-graph decode steps) on the merged fp32 model equal the merged
    model's own logits without any cache, which equal the adapter model's."""
    from lmforge.infer.engine import LLMEngine
    from lmforge.infer.sampling import SamplingParams

    model = randomize_adapters_(apply_lora(base_model(preset), CFG)).to(CUDA)
    merged = merge_lora(model).eval()
    engine = LLMEngine(merged, block_size=4, num_blocks=64, max_num_batched_tokens=16, max_num_seqs=4,
                       decode_path="cuda_graph", attention="padded")
    seq = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    rid = engine.add_request(seq[:5], SamplingParams(temperature=0, max_new_tokens=len(seq) - 5, ignore_eos=True))
    got = []
    while engine.has_unfinished():  # teacher forcing: the test, not the sampler, picks each next token
        out, sampled, logits = engine._forward()
        got += [logits[k] for k, s in enumerate(sampled) if s.request_id == rid]
        engine._advance(out, sampled, [seq[s.num_tokens] for s in sampled])
    with torch.no_grad():
        x = torch.tensor([seq], device=CUDA)
        merged_logits, adapter_logits = merged(x)[0, 4:-1], model(x)[0, 4:-1]  # positions 4..22 predict 5..23
    assert_logits_close(torch.stack(got).float(), merged_logits)
    assert_logits_close(merged_logits, adapter_logits)
