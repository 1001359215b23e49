"""The reward-model benchmark runs end to end in its CPU smoke mode, all three systems (the GPU figures come from
the device machine). Needs TRL (`pip install -e '.[bench]'`), so CI, which installs the test extra only, skips it."""

import pytest

from helpers import run_benchmark_quick

pytest.importorskip("trl")


@pytest.mark.slow
def test_rm_train_benchmark_quick(tmp_path):
    rows = run_benchmark_quick("rm_train.py", tmp_path, "rm_train.json")
    assert [r.get("error") for r in rows] == [None, None, None], rows
    assert [r["system"] for r in rows][:2] == ["lmforge-rm", "lmforge-pretrain"] and rows[2]["system"].startswith("trl-")
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in rows)
