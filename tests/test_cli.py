"""The `lmforge` command: verbs are the functions; bad input ends with one clear line."""

import subprocess
import sys

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.cli import main
from lmforge.models.checkpoint import load_model, save_model


def test_convert_round_trip_through_cli(tmp_path):
    model = Transformer(ModelConfig.from_name("tiny-swa"))
    save_model(model, tmp_path / "ours")
    main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"])
    assert (tmp_path / "hf" / "config.json").exists()
    main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "lmforge", "--dtype", "bfloat16"])
    back = load_model(tmp_path / "back")
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_convert_from_yaml_config(tmp_path):
    save_model(Transformer(ModelConfig.from_name("tiny")), tmp_path / "ours")
    cfg = tmp_path / "convert.yaml"
    cfg.write_text(f"src: {tmp_path / 'ours'}\ndst: {tmp_path / 'hf'}\nto: hf\n")
    main(["convert", "--config", str(cfg)])
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_bad_input_is_one_clear_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "convert", str(tmp_path / "missing"), str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"lmforge: error: {tmp_path / 'missing'} is not a folder: it does not exist"
    assert not (tmp_path / "out").exists()


def test_bad_choice_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path), str(tmp_path / "o"), "--to", "gguf"])
