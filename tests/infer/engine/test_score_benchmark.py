"""benchmarks/score.py --quick runs on the CPU and reports score() beside a pre-fill of the same tokens."""

import importlib.util
from pathlib import Path


def test_score_benchmark_quick(monkeypatch):
    folder = Path(__file__).resolve().parents[3] / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))  # score.py imports serving.py, as when the script runs
    spec = importlib.util.spec_from_file_location("score_benchmark", folder / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = module.main(["--quick", "--repeats", "1", "--top_k", "3"])
    assert row["tokens"] > row["sequences"] and row["top_k"] == 3
    assert row["prefill_s"] > 0 and row["score_s"] > 0 and row["projection_s"] > 0
