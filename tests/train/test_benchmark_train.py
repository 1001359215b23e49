"""The training benchmark runs end to end in its CPU smoke mode (the GPU figures come from the device machine)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_train_throughput_quick(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--quick", "--only", "a"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "train_throughput.json").read_text())["rows"]
    assert {r["system"] for r in rows} == {"lmforge-eager", "hf-eager"}
    assert all(r["tokens_per_s"] > 0 for r in rows)
