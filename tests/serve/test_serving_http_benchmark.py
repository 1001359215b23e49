"""benchmarks/serving.py --http runs (b) through the server on the CPU and reports it beside the engine's."""

import importlib.util
import sys
from pathlib import Path


def test_serving_benchmark_http_quick(monkeypatch):
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))  # serving_http imports serving, as when the script runs
    spec = importlib.util.spec_from_file_location("serving", folder / "serving.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "serving", module)
    spec.loader.exec_module(module)
    rows = module.main(["--quick", "--only", "b", "--no-hf", "--http"])
    cases = [r["case"] for r in rows]
    assert cases == ["copy_bandwidth", "b-first-pass", "b", "b", "b-http", "b-http"]
    for direct, http in zip(rows[2:4], rows[4:6]):
        assert http["rate"] == direct["rate"] and http["requests"] == direct["requests"]
        assert http["requests_per_s"] > 0 and http["ttft_ms_median"] > 0 and http["requests_per_s_vs_engine"] > 0
