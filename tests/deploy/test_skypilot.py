"""deploy/skypilot/*.yaml load as SkyPilot tasks (`sky.Task.from_yaml`, offline) and hold what the README says.

NOTE: skypilot pins click < 8.2 and uvicorn < 0.36, which transformers' huggingface-hub (click >= 8.4.2) and
our server's uvicorn exclude, so it cannot share the test environment: `make test` installs it into its own
environment (.venv-sky, `make sky`), and this test runs it there (or in this one, if `sky` imports here).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "deploy" / "skypilot").glob("*.yaml"))

LOAD = """
import json, sys
import sky
for path in sys.argv[1:]:
    task = sky.Task.from_yaml(path)
    service = task.service
    print(json.dumps({
        "path": path, "name": task.name, "num_nodes": task.num_nodes, "run": task.run or "",
        "accelerators": [r.accelerators for r in task.resources],
        "placement": [[r.region, r.zone, r.instance_type] for r in task.resources],
        "ports": [r.ports for r in task.resources],
        "readiness_path": service.readiness_path if service is not None else None,
        "replicas": service.min_replicas if service is not None else None,
    }))
"""


def _sky_python() -> str | None:
    for python in (os.environ.get("LMFORGE_SKY_PYTHON"), str(ROOT / ".venv-sky" / "bin" / "python")):
        if python and Path(python).exists():
            return python
    try:
        import sky  # noqa: F401
    except ImportError:
        return None
    return sys.executable


@pytest.fixture(scope="module")
def tasks():
    python = _sky_python()
    if python is None:
        pytest.skip("skypilot is not installed (make sky)")
    out = subprocess.run([python, "-c", LOAD, *map(str, FILES)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return {Path(t["path"]).name: t for t in map(json.loads, out.stdout.splitlines())}


def test_every_task_file_loads_names_accelerators_and_no_placement(tasks):
    assert set(tasks) == {"finetune.yaml", "pretrain.yaml", "serve.yaml", "service.yaml", "vllm.yaml"}
    for name, t in tasks.items():
        assert all(t["accelerators"]), name
        assert all(p == [None, None, None] for p in t["placement"]), name  # no region, zone or instance type


def test_multi_node_training_rendezvous_from_skypilots_variables(tasks):
    for name in ("pretrain.yaml", "finetune.yaml"):
        t = tasks[name]
        assert t["num_nodes"] == 2 and t["accelerators"] == [{"H100": 8}]
        for var in ("SKYPILOT_NODE_IPS", "SKYPILOT_NODE_RANK", "SKYPILOT_NUM_NODES", "SKYPILOT_NUM_GPUS_PER_NODE"):
            assert "$" + var in t["run"], (name, var)
        assert "torchrun" in t["run"] and "lmforge.cli pretrain" in t["run"]


def test_serving_tasks_and_the_service_probe(tasks):
    assert "lmforge serve" in tasks["serve.yaml"]["run"] and "vllm serve" in tasks["vllm.yaml"]["run"]
    service = tasks["service.yaml"]
    assert service["readiness_path"] == "/health" and service["replicas"] == 2
    assert "lmforge serve" in service["run"] and "--host 0.0.0.0" in service["run"]
    assert all(ports == ["8000"] for ports in service["ports"])
