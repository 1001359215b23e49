"""benchmarks/two_gpus.py runs end to end in its CPU smoke mode: 2 gloo processes stand for the 2 GPUs, with
tiny shapes (the figures come from the device machine)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_two_gpus_quick(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "two_gpus.py"), "--quick", "--profile-7b",
                           "--tp-profile", "--work", str(tmp_path / "work")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "two_gpus.json").read_text())["rows"]
    assert not [r for r in rows if "error" in r], rows
    scaling = [r for r in rows if r["part"] == "scaling"]
    assert [r.get("gpus") for r in scaling] == [1, 2, None] and scaling[2]["efficiency"] > 0
    (seven_b,) = [r for r in rows if r["part"] == "7b"]
    assert len(seven_b["losses"]) == 4 and seven_b["resume_max_rel_diff"] < 1e-5
    assert "__1_0.distcp" in seven_b["checkpoint_files"]  # sharded: one file per rank
    assert seven_b["tokens_per_step"] == 2 * 128 * 2 and len(seven_b["step_time_s"]) == 4
    assert "aten::mm" in (tmp_path / "7b_top_ops.txt").read_text()  # rank 0's profile of step 2
    tp = [r for r in rows if r["part"] == "tp"]
    assert [r.get("tensor_parallel") for r in tp] == [1, 2, None]
    assert tp[0]["tokens"] == tp[1]["tokens"]  # the same greedy tokens, split over 2 ranks or not
    # fp32 logits of the prompt's next token (the quick model is fp32): equal up to summation order
    errors = tp[2]["logits_max_abs_err_over_std"]
    assert errors["1gpu_model_dtype"] == 0 and 0 < errors["tp2_model_dtype"] < 1e-5 and errors["tp2_float32"] < 1e-5
    assert (tmp_path / "tp2_profile.txt").exists()
