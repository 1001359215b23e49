"""LoRA under FSDP2 with activation checkpointing, applied before `parallelize`: 2 gloo ranks under torchrun
give the one-process losses and adapters, the base stays bit for bit what it was, and the DCP state a
training checkpoint would write holds the adapters only.

Tolerance: rtol 1e-5 on losses, 1e-5 / 1e-6 on adapters. The runs differ in where sums happen (per-rank
partial sums, reduced over 2 ranks), which moves fp32 results by ~1e-7 relative per step; a gradient that is
not averaged, or an adapter that is not sharded and updated like the others, moves them by far more.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from lora_fsdp_worker import PRESETS, lora_model, train  # noqa: E402

from lmforge.lora import base_state_dict, lora_state_dict  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_fsdp_two_ranks_train_the_adapters_of_one_process(tmp_path):
    path = os.pathsep.join([str(HERE.parents[1] / "src"), str(HERE)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "lora_fsdp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from safetensors.torch import load_file

    for preset in PRESETS:
        model = lora_model(preset)
        base = {k: v.clone() for k, v in base_state_dict(model.state_dict()).items()}
        losses = train(model, model, rank=0, world=1)
        assert json.loads((tmp_path / f"{preset}-losses.json").read_text()) == pytest.approx(losses, rel=1e-5)
        assert losses[-1] < losses[0] - 0.01  # the adapters learned something
        theirs = load_file(tmp_path / f"{preset}-adapters.safetensors")
        for name, value in lora_state_dict(model).items():
            torch.testing.assert_close(theirs[name], value, rtol=1e-5, atol=1e-6, msg=name)
        sharded_base = load_file(tmp_path / f"{preset}-base.safetensors")
        assert sharded_base.keys() == base.keys()
        for name, value in base.items():
            assert torch.equal(sharded_base[name], value), name


def test_a_training_checkpoint_of_a_lora_model_holds_only_the_adapters(tmp_path):
    """How the training harness checkpoints a LoRA model: DCP with `ignore_frozen_params`, so that the frozen
    base stays out; loading back into a fresh LoRA model of the same base restores adapters and AdamW exactly."""
    import torch.distributed.checkpoint as dcp

    from lmforge.train.checkpointing import _dcp  # one process, no process group: its warning silenced
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    def trained(steps):
        model = lora_model("tiny")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        x = torch.randint(0, 512, (2, 9))
        for _ in range(steps):
            model(x).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    model, opt = trained(2)
    save = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, opt, options=save)
    assert sorted(model_sd) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(".lora_A." in n or ".lora_B." in n for n in model_sd)
    _dcp(dcp.save, {"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path)  # as the harness calls it

    fresh, fresh_opt = trained(0)
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt, options=save)
    state = {"model": model_sd, "optim": optim_sd}
    _dcp(dcp.load, state, checkpoint_id=tmp_path)
    # strict=False: the frozen base is absent on purpose (dcp.load has already checked every adapter was there)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    for name, value in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(fresh)[name], value), name
    for p, q in zip(opt.param_groups[0]["params"], fresh_opt.param_groups[0]["params"]):
        assert torch.equal(opt.state[p]["exp_avg_sq"], fresh_opt.state[q]["exp_avg_sq"])


def test_tensor_parallelism_refuses_a_lora_model():
    from lmforge.parallel import apply_tensor_parallel

    with pytest.raises(ValueError, match="tensor parallelism does not split LoRA adapters"):
        apply_tensor_parallel(lora_model("tiny"), tp_mesh=None)  # refused before the mesh is used
