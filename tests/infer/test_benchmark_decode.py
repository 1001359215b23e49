"""benchmarks/decode.py --quick runs end to end on the CPU and reports every part."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_decode_benchmark_quick(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--quick", "--repeats", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "decode.json").read_text())
    (ours,) = report["lmforge"]
    assert ours["mode"] == "eager" and ours["tok_s_decode"] > 0 and ours["same_tokens_as_eager"] == 16
    assert report["hf"][0]["tok_s_end_to_end"] > 0
    assert report["copy_bandwidth_bytes_s"] > 0 and report["limit_tok_s_all_weights"] > 0
    rows = report["prefill"]
    assert [r["prompt_tokens"] for r in rows] == [64, 128, 256]
    assert all(r["cache"] == "RollingCache" for r in rows)
    assert len({r["cache_bytes"] for r in rows}) == 1  # the rolling buffer does not grow with the prompt
    assert "lmforge eager" in proc.stdout and "rolling-buffer pre-fill" in proc.stdout


@pytest.mark.slow
def test_decode_benchmark_compares_fused_and_generate_paths(tmp_path):
    """--modes eager,generate:eager --fuse off,on: four rows in one run, all with the eager tokens."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--quick", "--only", "a", "--repeats", "1",
           "--modes", "eager,generate:eager", "--fuse", "off,on"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "decode.json").read_text())["lmforge"]
    assert [(r["mode"], r["fused"]) for r in rows] == [("eager", False), ("generate:eager", False),
                                                        ("eager", True), ("generate:eager", True)]
    assert all(r["same_tokens_as_eager"] == 16 and r["tok_s_end_to_end"] > 0 for r in rows)
    assert "lmforge generate:eager fused" in proc.stdout
