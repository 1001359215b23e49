"""MFU arithmetic against ANCHORS.md, the loss-spike rule, and metrics.jsonl on resume."""

import json

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.train.metrics import MetricsLogger, SpikeDetector, flops_per_token, peak_flops, read_metrics


def test_flops_per_token_reproduces_the_anchor_mfu():
    """TinyLlama-1.1B shapes at 49.5k tok/s on one H100 are 36.6% MFU (ANCHORS.md)."""
    cfg = ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, vocab_size=32000, max_seq_len=2048)
    with torch.device("meta"):
        model = Transformer(cfg)
    n = model.num_parameters() - 32000 * 2048  # everything but the input embedding
    assert flops_per_token(model, 2048) == 6 * n + 12 * 22 * 2048 * 2048
    assert 49.5e3 * flops_per_token(model, 2048) / 989e12 == pytest.approx(0.366, abs=5e-4)


def test_flops_of_a_mixture_count_active_experts_only():
    with torch.device("meta"):
        moe = Transformer(ModelConfig.from_name("tiny-moe"))
    c = moe.config
    active = moe.num_parameters(active=True) - c.vocab_size * c.dim
    assert active < moe.num_parameters() - c.vocab_size * c.dim
    assert flops_per_token(moe, 64) == 6 * active + 12 * c.n_layers * c.dim * 64


def test_peak_flops_is_unknown_on_the_cpu_unless_given():
    assert peak_flops(torch.device("cpu"), None) is None
    assert peak_flops(torch.device("cpu"), 1.5) == 1.5e12


def test_spike_detector_worked_example():
    det = SpikeDetector(window=4, sigmas=3)
    for x in (2.0, 2.1, 1.9, 2.0):
        assert det.update(x)[0] is False  # window still filling
    spike, threshold = det.update(2.3)
    assert spike and threshold == pytest.approx(2.0 + 3 * 0.0707107, rel=1e-5)
    det = SpikeDetector(window=4, sigmas=3)
    for x in (2.0, 2.1, 1.9, 2.0):
        det.update(x)
    assert det.update(2.2)[0] is False


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        log.log(step, {"loss": float(step)})
    log.event(5, "loss_spike", "x")
    log.close()
    log = MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    log.log(4, {"loss": 40.0})
    log.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert all("event" not in r for r in records)
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
