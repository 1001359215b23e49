"""Tensor parallelism (DTensor column / row-wise plans) on 2 gloo ranks gives the single-process logits:
full forward, chunked pre-fill into a per-rank KV cache, and decode steps (tolerance 1e-5 on unit-scale
logits: the ranks' partial products are summed in another order)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import unit_scale_

from lmforge import ModelConfig, Transformer
from lmforge.parallel import apply_tensor_parallel

WORKER = Path(__file__).with_name("tp_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny-swa", "tiny-moe"])
def test_tensor_parallel_logits_equal_single_process(preset):
    # the worker imports `helpers` from tests/, which pytest (not torchrun) puts on sys.path
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), preset],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_degree_must_divide_the_heads():
    class FakeMesh:
        def size(self):
            return 3

    with pytest.raises(ValueError, match="tensor-parallel degree 3 must divide n_heads \\(4\\)"):
        apply_tensor_parallel(Transformer(ModelConfig.from_name("tiny")), FakeMesh())


def test_training_layouts_that_cannot_work_are_refused():
    import torch

    from lmforge.parallel import ParallelConfig, parallelize, training_mesh

    with pytest.raises(ValueError, match="tensor_parallel \\(2\\) must divide the number of processes \\(1\\)"):
        training_mesh(torch.device("cpu"), 2)

    class FakeMesh:  # a (dp 1, tp 2) mesh as far as parallelize looks before applying anything
        def __getitem__(self, name):
            return self

        def size(self):
            return 1

    model = Transformer(ModelConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="not ddp"):
        parallelize(model, ParallelConfig(mode="ddp", tensor_parallel=2), torch.device("cpu"), FakeMesh())


@pytest.mark.slow
def test_generate_with_tensor_parallel_equals_one_process(tokenizer_512, tmp_path):
    """`lmforge generate --tensor_parallel 2` under torchrun writes the single-process tokens and log-probs."""
    import json

    import torch

    from lmforge.cli import main
    from lmforge.models.checkpoint import save_model

    torch.manual_seed(0)
    model = unit_scale_(Transformer(ModelConfig.from_name("tiny-swa")), norms=False)
    save_model(model, tmp_path / "model", tokenizer_path=tokenizer_512)
    (tmp_path / "prompts.txt").write_text("abc def ghi\nthe quick brown fox jumps over\nxy\n")
    args = ["generate", str(tmp_path / "model"), "--prompt_file", str(tmp_path / "prompts.txt"), "--format", "jsonl",
            "--sampling.temperature", "0", "--sampling.max_new_tokens", "12", "--sampling.logprobs", "true",
            "--device", "cpu"]
    main([*args, "--output", str(tmp_path / "one.jsonl")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "lmforge.cli", *args, "--output", str(tmp_path / "two.jsonl"), "--tensor_parallel", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = ([json.loads(line) for line in (tmp_path / f).read_text().splitlines()] for f in ("one.jsonl", "two.jsonl"))
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 12
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)


def test_tensor_parallel_without_torchrun_is_a_clear_error(tmp_path, capsys):
    from lmforge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(tmp_path), "--prompts", "hi", "--tensor_parallel", "2", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--tensor_parallel 2 needs 2 processes (torchrun --nproc_per_node 2)" in capsys.readouterr().err
