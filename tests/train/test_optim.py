"""AdamW parameter groups and the warm-up + cosine schedule, against the formula written out by hand."""

import math

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.train.optim import OptimConfig, build_optimizer, build_scheduler, lr_factor, param_groups


def expected_lr(step, peak, warmup, decay, floor_ratio):
    """Llama 2's schedule (linear warm-up, cosine to floor_ratio of the peak), restated independently of optim.py."""
    floor = floor_ratio * peak
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= decay:
        return floor
    return floor + (peak - floor) * (1 + math.cos(math.pi * (step - warmup) / (decay - warmup))) / 2


def test_worked_example_of_the_docstring():
    got = [3e-4 * lr_factor(s, warmup_steps=2, decay_steps=10, min_lr_ratio=0.1) for s in (0, 1, 2, 6, 10, 11)]
    assert got == pytest.approx([1.5e-4, 3e-4, 3e-4, 1.65e-4, 3e-5, 3e-5], rel=1e-12)


@pytest.mark.parametrize("warmup, decay", [(0, 50), (5, 50), (10, 11), (2000, 476_837)])
def test_schedule_matches_formula(warmup, decay):
    steps = sorted({0, 1, warmup - 1, warmup, warmup + 1, (warmup + decay) // 2, decay - 1, decay, decay + 7} - {-1})
    for s in steps:
        expected = expected_lr(s, 1e-3, warmup, decay, 0.1)
        assert 1e-3 * lr_factor(s, warmup, decay, 0.1) == pytest.approx(expected, rel=1e-12)


def test_schedule_shape():
    f = [lr_factor(s, 20, 200, 0.1) for s in range(260)]
    assert f[19] == 1.0 and f[0] == pytest.approx(0.05)
    assert all(a < b for a, b in zip(f[:19], f[1:20]))  # warm-up rises
    assert all(a >= b for a, b in zip(f[20:], f[21:]))  # then never rises again
    assert min(f[20:]) == pytest.approx(0.1) and f[200:] == [0.1] * 60  # floor at 10% of the peak, reached at S


def test_scheduler_drives_the_optimizer_lr():
    """The lr each update sees (read before optimizer.step, as the loop does) follows the formula."""
    model = torch.nn.Linear(2, 2)
    cfg = OptimConfig(lr=2e-3, warmup_steps=3, min_lr_ratio=0.1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=12)
    seen = []
    for _ in range(15):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([expected_lr(s, 2e-3, 3, 12, 0.1) for s in range(15)], rel=1e-12)
    assert all(g["lr"] == opt.param_groups[0]["lr"] for g in opt.param_groups)


def test_norms_are_exempt_from_weight_decay_and_matrices_are_not():
    model = Transformer(ModelConfig.from_name("tiny-moe"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, OptimConfig())
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(n for n in names.values() if "norm" in n)
    assert all(p.dim() >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"tok_embeddings.weight", "output.weight", "layers.0.feed_forward.gate.weight"} <= decayed
    _, no_decay = param_groups(model, OptimConfig(no_decay=("norm.weight", "tok_embeddings.weight")))
    assert "tok_embeddings.weight" in {names[id(p)] for p in no_decay["params"]}


def test_weight_decay_acts_only_on_the_decay_group():
    """With zero gradients AdamW's update is the decay alone: p <- p * (1 - lr * wd) for matrices, none for norms."""
    model = Transformer(ModelConfig.from_name("tiny"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(lr=0.5, weight_decay=0.1))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 1.0 if n.endswith("norm.weight") else 1 - 0.5 * 0.1
        torch.testing.assert_close(p.detach(), before[n] * factor, rtol=1e-6, atol=0, msg=n)
