"""On CUDA, the two sides of PPO's log-probs as PPO runs them: the engine samples from a bf16 copy of the fp32
policy (`make_engine`) and reports the log-probs of its tokens; the trainer recomputes them with the fp32 policy
under bf16 autocast (and in fp32). The sides differ by bf16 rounding only. The test prints the measured gap (the
figure in benchmarks/RESULTS.md, "bf16 gap") and bounds it: a token read one position off, the mistake the CPU
test at 1e-5 rules out in fp32, costs about 1.2 nats on average on this model, against ~0.01 for rounding (the
same model on the CPU: 0.013 mean, 0.065 largest)."""

import json

import pytest
import torch
from helpers import unit_scale_

from lmforge import ModelConfig, Transformer
from lmforge.align.rollout import batch_of, make_engine, response_logprobs, rollout
from lmforge.infer.sampling import SamplingParams
from lmforge.train.evaluate import autocast_context

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_engine_and_trainer_logprobs_differ_by_bf16_rounding_on_cuda():
    torch.manual_seed(0)
    model = unit_scale_(Transformer(ModelConfig.from_name("tiny"))).cuda().eval()  # fp32, as PPO's policy
    engine = make_engine(model, eos_id=2, batch_size=16, max_prompts=64)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(16)]
    samples = rollout(engine, prompts, SamplingParams(temperature=1.0, max_new_tokens=48, logprobs=True, seed=0), n=2)
    batch = batch_of(samples).to("cuda")
    engine_lp = torch.zeros(batch.mask.shape, device="cuda")
    for b, s in enumerate(samples):
        engine_lp[b, : len(s.engine_logprobs)] = torch.tensor(s.engine_logprobs)
    with torch.no_grad():
        fp32, _ = response_logprobs(model, batch, 1.0)
        with autocast_context(torch.device("cuda"), "bf16"):
            autocast, _ = response_logprobs(model, batch, 1.0)
    m = batch.mask
    gaps = {"engine_vs_autocast": (engine_lp - autocast)[m].abs(), "engine_vs_fp32": (engine_lp - fp32)[m].abs(),
            "autocast_vs_fp32": (autocast - fp32)[m].abs()}
    shifted = (engine_lp[:, 1:] - autocast[:, :-1])[m[:, 1:]].abs().mean()
    figures = {k: {"mean": v.mean().item(), "p99": v.quantile(0.99).item(), "max": v.max().item()}
               for k, v in gaps.items()}
    print(json.dumps({"bf16_gap": figures, "tokens": int(m.sum()), "shifted_mean": shifted.item()}))
    assert int(m.sum()) > 500 and shifted > 0.5
    for v in gaps.values():
        assert v.mean() < 0.05 and v.max() < 0.5
