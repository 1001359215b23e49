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


def test_serving_benchmark_paths_with_flags():
    """Decode paths with +sync (no overlap) and +unfused next to the defaults, in one run; a bad flag is refused."""
    import pytest

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "serving.py"
    spec = importlib.util.spec_from_file_location("serving_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--quick", "--only", "a", "--no-hf", "--decode-paths", "eager/fused,eager/fused+sync+unfused"])
    assert [r.get("decode_path") for r in rows[1:]] == ["eager/fused", "eager/fused+sync+unfused"]
    assert all(r["output_tok_per_s"] > 0 for r in rows[1:])
    with pytest.raises(SystemExit, match="unknown decode path flag"):
        module.main(["--quick", "--only", "a", "--no-hf", "--decode-paths", "eager+fast"])
