"""The LoRA SFT benchmark runs end to end in its CPU smoke mode (the GPU figures come from the device machine):
the lmforge side always, TRL's side where trl is installed (`pip install 'lmforge[bench]'`)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_lora_sft_benchmark_quick(tmp_path):
    systems = "lmforge,trl" if importlib.util.find_spec("trl") else "lmforge"
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_sft.py"), "--quick", "--systems", systems],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "lora_sft.json").read_text())["rows"]
    assert [r.get("error") for r in rows] == [None] * len(systems.split(","))
    assert rows[0]["system"] in ("lmforge-standin", "lmforge-sft")  # -sft once the harness has build_sft_step
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in rows)
