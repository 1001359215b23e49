"""benchmarks/serving.py --quick runs end to end on the CPU, baselines included."""

import importlib.util
from pathlib import Path


def test_serving_benchmark_quick():
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "serving.py"
    spec = importlib.util.spec_from_file_location("serving_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--quick", "--decode-paths", "packed,eager,eager/fused", "--profile"])
    cases = [r["case"] for r in rows]
    assert cases == ["copy_bandwidth", "a", "a", "a", "a-transformers", "b-first-pass", "b", "b", "b-transformers"]
    assert [r.get("decode_path") for r in rows[1:4]] == ["packed", "eager", "eager/fused"]
    for r in rows[1:]:
        assert r["requests_per_s"] > 0 and r["output_tok_per_s"] > 0
    a = rows[1]
    assert 0 < a["fraction_of_limit"] < 1 and a["ttft_ms_median"] > 0
