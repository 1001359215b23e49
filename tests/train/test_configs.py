"""Every shipped config parses through the real CLI; bad keys, types and batch shapes fail clearly."""

from pathlib import Path

import pytest
import yaml

from lmforge.cli import main
from lmforge.models.config import PRESETS
from lmforge.train.config import TrainConfig, TrainConfigError

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
PRETRAIN_CONFIGS = [p for p in CONFIGS if p.read_text().startswith("# lmforge pretrain")]


def test_there_are_pretrain_configs():
    assert {p.name for p in PRETRAIN_CONFIGS} >= {"tiny.yaml", "tiny-moe.yaml", "llama2-7b.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_starts_with_the_command_that_runs_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# lmforge ") and f"--config configs/{path.name}" in first


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=lambda p: p.name)
def test_shipped_pretrain_config_parses(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--config", str(path), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    given = yaml.safe_load(path.read_text())
    for group in ("train", "optim", "run"):  # every value of the file arrived
        for key, value in given.get(group, {}).items():
            assert printed[group][key] == value, f"{group}.{key}"


def test_tiny_configs_use_the_tiny_presets_shapes():
    for name in ("tiny", "tiny-moe"):
        model = yaml.safe_load((Path(__file__).parents[2] / "configs" / f"{name}.yaml").read_text())["model"]
        preset = PRESETS[name]
        for key, value in model.items():
            if key not in ("vocab_size", "moe"):
                assert getattr(preset, key) == value, f"{name}: {key}"


def run_cli(capsys, *args) -> tuple[int, str]:
    """(exit status, stderr) of `lmforge pretrain ARGS`, in this process."""
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", *args])
    return exit_.value.code, capsys.readouterr().err


def test_unknown_key_fails_and_names_it(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  stepz: 3\n")
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 2 and "train.stepz" in err


def test_bad_type_fails_and_names_the_key(capsys):
    code, err = run_cli(capsys, "--train.steps", "many")
    assert code == 2 and 'Parser key "train.steps"' in err and "many" in err


def test_a_bad_model_fails_with_the_reason(tmp_path, capsys):
    code, err = run_cli(capsys, "--model.n_heads", "6", "--model.n_kv_heads", "4", "--data.dir", str(tmp_path))
    assert code == 2 and "n_heads (6) must be a multiple of n_kv_heads (4)" in err


def test_global_batch_must_divide_into_micro_batches(capsys):
    assert TrainConfig(global_batch_tokens=4_194_304, micro_batch_size=2, seq_len=4096).grad_accum_steps(64) == 8
    expected = r"multiple of .* = 2 \* 4096 \* 3 = 24576 tokens; nearest valid values: 4177920 or 4202496"
    with pytest.raises(TrainConfigError, match=expected):
        TrainConfig(global_batch_tokens=4_194_304, micro_batch_size=2, seq_len=4096).grad_accum_steps(3)
    code, err = run_cli(capsys, "--preset", "tiny", "--train.global_batch_tokens", "1000", "--train.seq_len", "64")
    assert code == 2 and err.startswith("lmforge: error: train.global_batch_tokens (1000) must be a multiple")
