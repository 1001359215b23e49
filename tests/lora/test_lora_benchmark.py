"""The LoRA SFT benchmark runs end to end in its CPU smoke mode, both sides (the GPU figures come from the
device machine). Needs TRL (`pip install -e '.[bench]'`), so CI, which installs the test extra only, skips it:
the benchmark is a device-machine tool and its TRL side is the part worth smoke-testing."""

import pytest

from helpers import run_benchmark_quick

pytest.importorskip("peft")
pytest.importorskip("trl")


@pytest.mark.slow
def test_lora_sft_benchmark_quick(tmp_path):
    rows = run_benchmark_quick("lora_sft.py", tmp_path, "lora_sft.json")
    assert [r.get("error") for r in rows] == [None, None], rows
    assert rows[0]["system"] == "lmforge-sft"
    assert rows[1]["system"].startswith("trl-")
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in rows)
