"""On CUDA: the reward model's step and DPO's sequence log-probabilities through per-block torch.compile agree with
the eager model, under bf16 autocast, and both verbs run there end to end. Run on the device machine
(`pytest -m gpu tests/align/test_rm_gpu.py`); skipped elsewhere.

Tolerances: float32 1e-4 relative (compiled kernels fuse and reorder sums); bf16 autocast 3e-2 relative against the
float32 values (8 bits of mantissa through 2 layers).
"""

import pytest
import torch

from helpers import unit_scale_
from lmforge import ModelConfig, Transformer
from lmforge.align.preference_data import preference_record, pair_batch, tokenize_pairs
from lmforge.align.reference_logps import sequence_logprobs
from lmforge.align.rm import ranking_backward
from lmforge.parallel import DataParallelRank, ParallelConfig, parallelize
from lmforge.tokenizer import Tokenizer
from pref_helpers import seeded_pairs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


def _batch(tokenizer_512):
    tok = Tokenizer(tokenizer_512)
    pairs = tokenize_pairs([preference_record(r, "x") for r in seeded_pairs(3, 6)], tok, 128, "small").splits["train"]
    return pair_batch(pairs)


@pytest.mark.parametrize("head", ["reward", "lm"])
def test_compiled_steps_agree_with_eager_in_fp32_and_bf16(tokenizer_512, head):
    torch.manual_seed(0)
    base = unit_scale_(Transformer(ModelConfig.from_name("tiny", head=head))).to(CUDA)
    batch = _batch(tokenizer_512)
    results = {}
    for compile in (False, True):
        for precision in ("fp32", "bf16"):
            torch._dynamo.reset()
            model = Transformer(base.config).to(CUDA)
            model.load_state_dict(base.state_dict())
            net = parallelize(model, ParallelConfig(compile=compile), CUDA)
            if head == "reward":
                stats = ranking_backward(net, [batch], device=CUDA, dp=DataParallelRank(), precision=precision,
                                         pairs=len(batch.pairs))
                results[compile, precision] = (stats.loss, model.reward_head.weight.grad.clone())
            else:
                b = batch.to(CUDA)
                with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
                    logp = sequence_logprobs(net, model, b.tokens, b.mask, loss_chunk=64)
                logp.sum().backward()
                results[compile, precision] = (logp.detach(), model.output.weight.grad.clone())
    for key, tol in (((True, "fp32"), 1e-4), ((False, "bf16"), 3e-2), ((True, "bf16"), 3e-2)):
        value, grad = results[key]
        ref_value, ref_grad = results[False, "fp32"]
        torch.testing.assert_close(torch.as_tensor(value), torch.as_tensor(ref_value), rtol=tol, atol=tol)
        assert (grad - ref_grad).norm() <= 10 * tol * ref_grad.norm()


def test_rm_train_and_dpo_run_on_cuda_with_compile(tiny_folders, tmp_path):
    from test_rm import rm_args
    from test_dpo import dpo_args
    from sft_helpers import write_jsonl
    from lmforge.cli import main
    from lmforge.train.metrics import read_step_metrics

    files = {"helpfulness": str(write_jsonl(tmp_path / "h.jsonl", seeded_pairs(0, 48))),
             "safety": str(write_jsonl(tmp_path / "s.jsonl", seeded_pairs(1, 16)))}
    for name, args in (("rm", rm_args), ("dpo", dpo_args)):
        argv = [a if a != "cpu" else "cuda" for a in args(tiny_folders["ours"], files, tmp_path / name)]
        main([*argv, "--parallel.compile", "true"])
        losses = [r["loss"] for r in read_step_metrics(tmp_path / name / "metrics.jsonl")]
        assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
        assert losses[-1] < losses[0]
