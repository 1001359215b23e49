"""The SFT throughput benchmark runs end to end in its CPU smoke mode, all four systems (the GPU figures come from
the device machine). Needs TRL (`pip install -e '.[bench]'`), so CI, which installs the test extra only, skips it."""

import pytest

from helpers import run_benchmark_quick

pytest.importorskip("trl")


@pytest.mark.slow
def test_sft_train_benchmark_quick(tmp_path):
    rows = run_benchmark_quick("sft_train.py", tmp_path, "sft_train.json")
    assert [r.get("error") for r in rows] == [None] * 4, rows
    assert [r["system"] for r in rows][:3] == ["lmforge-sft", "lmforge-sft-padded", "lmforge-pretrain"]
    assert rows[3]["system"].startswith("trl-")
    assert 0.5 < rows[0]["packing_efficiency"] <= 1 and all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in rows)
