"""On CUDA: the attention probe reads the weights the model used (the model's attention runs SDPA's CUDA kernels,
the probe the reference softmax), and `eval gatt` measures 20 turns in a 4096-token context through the engine's
CUDA paths with no turn outgrowing the context."""

import json

import pytest
import torch
from helpers import unit_scale_
from stage_helpers import probe_reconstructions

from lmforge import ModelConfig, Transformer
from lmforge.align.eval_gatt import eval_gatt
from lmforge.infer.sampling import SamplingParams
from lmforge.models.checkpoint import save_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("preset", ["tiny", "tiny-swa"])
def test_probe_reproduces_each_attention_output_on_cuda(preset):
    torch.manual_seed(0)
    model = unit_scale_(Transformer(ModelConfig.from_name(preset))).cuda().eval()
    tokens = torch.randint(0, 512, (1, 200), device="cuda")
    seen = probe_reconstructions(model, tokens)
    assert len(seen) == model.config.n_layers
    for recomputed, output, _ in seen:  # fp32; SDPA's CUDA kernels sum in another order than the reference softmax
        torch.testing.assert_close(recomputed, output, atol=1e-4, rtol=1e-4)


def test_eval_gatt_measures_20_turns_on_cuda(stage_world, tmp_path):
    torch.manual_seed(0)
    model = unit_scale_(Transformer(ModelConfig.from_name("tiny", vocab_size=600, max_seq_len=4096)))
    save_model(model, tmp_path / "model", tokenizer_path=stage_world.root / "tok" / "tokenizer.model")
    # NOTE: answers of at most 16 tokens: a random model's invalid UTF-8 bytes re-encode three times longer, and
    # 20 turns of them must still fit the context (with 64 the context holds 20 turns of a trained model's answers)
    report = eval_gatt(tmp_path / "model", stage_world.world, out_dir=tmp_path / "eval", dialogues=8, max_turns=20,
                       attention_dialogues=2, sampling=SamplingParams(temperature=0, max_new_tokens=16),
                       device="cuda", progress=False)
    (m,) = report["models"].values()
    assert report["turns"] == 20 and m["overflows"] == 0 and len(m["attention"]) == 20
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["turns"] == 20
