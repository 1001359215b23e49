"""The LoRA SFT benchmark runs end to end in its CPU smoke mode, both sides (the GPU figures come from the
device machine). Needs TRL (`pip install -e '.[bench]'`), so CI, which installs the test extra only, skips it:
the benchmark is a device-machine tool and its TRL side is the part worth smoke-testing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_lora_sft_benchmark_quick(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_sft.py"), "--quick"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "lora_sft.json").read_text())["rows"]
    assert [r.get("error") for r in rows] == [None, None], rows
    assert rows[0]["system"] in ("lmforge-standin", "lmforge-sft")  # -sft once the harness has build_sft_step
    assert rows[1]["system"].startswith("trl-")
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in rows)
