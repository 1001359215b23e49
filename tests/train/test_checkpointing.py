"""DCP training checkpoints: exact round trip of named modules and optimizers, completeness by rename,
keep-the-last-N."""

import json
import random

import numpy as np
import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.train.checkpointing import complete_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from lmforge.train.optim import OptimConfig, build_optimizer


def trained_pair(seed):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_name("tiny-moe"))
    opt = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0))
    tokens = torch.randint(0, 512, (2, 8))
    for _ in range(2):
        logits, aux = model(tokens, return_aux=True)
        (logits.logsumexp(-1).mean() + aux.total).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, opt = trained_pair(0)
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    path = save_checkpoint(tmp_path, 2, {"model": model}, {"model": opt}, {"step": 2, "tokens_seen": 32, "loader": {"cursor": 4}})
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))

    fresh, fresh_opt = trained_pair(1)  # different weights and optimizer moments
    fresh_opt.state.clear()  # and, like a new run, no optimizer state at all
    state = load_checkpoint(path, {"model": fresh}, {"model": fresh_opt})
    assert state == {"step": 2, "tokens_seen": 32, "loader": {"cursor": 4}}
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    for p, q in zip(model.parameters(), fresh.parameters()):
        sa, sb = opt.state[p], fresh_opt.state[q]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert opt.state_dict()["param_groups"] == fresh_opt.state_dict()["param_groups"]
    draws = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == expected_draws[:2] and torch.equal(draws[2], expected_draws[2])


def test_only_renamed_checkpoints_count_and_the_last_two_are_kept(tmp_path):
    model, opt = trained_pair(0)
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"model": model}, {"model": opt}, {"step": step}, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000020", "step_000030"]
    # a save killed half-way leaves a .tmp folder (here: a stub with no train_state.json): never resumed from
    (tmp_path / "step_000040.tmp").mkdir()
    (tmp_path / "step_000040.tmp" / ".metadata").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step_000030"
    assert json.loads((latest_checkpoint(tmp_path) / "train_state.json").read_text())["step"] == 30
    save_checkpoint(tmp_path, 50, {"model": model}, {"model": opt}, {"step": 50}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000030", "step_000050"]  # stale .tmp removed


def test_loading_an_incomplete_folder_is_refused(tmp_path):
    model, opt = trained_pair(0)
    with pytest.raises(FileNotFoundError, match="not a complete training checkpoint"):
        load_checkpoint(tmp_path, {"model": model}, {"model": opt})


def test_several_named_modules_with_and_without_optimizers(tmp_path):
    """A PPO-like state: a policy and a critic, each with its own optimizer, and a module saved without one.
    Each comes back into the module of its own name (not into whichever has the same shapes)."""
    policy, policy_opt = trained_pair(0)
    critic, critic_opt = trained_pair(1)
    extra, _ = trained_pair(2)
    names = {"policy": policy, "critic": critic, "extra": extra}
    path = save_checkpoint(tmp_path, 1, names, {"policy": policy_opt, "critic": critic_opt}, {"step": 1})
    fresh = {name: trained_pair(10 + i) for i, name in enumerate(names)}
    load_checkpoint(path, {n: m for n, (m, _) in fresh.items()},
                    {"policy": fresh["policy"][1], "critic": fresh["critic"][1]})
    for name, module in names.items():
        for (n, a), b in zip(module.state_dict().items(), fresh[name][0].state_dict().values()):
            assert torch.equal(a, b), (name, n)
    for opt, (_, fresh_opt) in ((policy_opt, fresh["policy"]), (critic_opt, fresh["critic"])):
        for a, b in zip(opt.state.values(), fresh_opt.state.values()):
            assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(KeyError, match="name no module"):
        save_checkpoint(tmp_path, 2, {"policy": policy}, {"critic": critic_opt}, {"step": 2})
