"""What the stages after SFT share: their shipped configs parse through the real CLI with every value arriving;
the data folder sits beside the run folder; open_world rebuilds the world of a folder and refuses others."""

import json
from pathlib import Path

import pytest
import yaml

from lmforge.align.stages import stage_folders
from lmforge.align.world.folder import WorldFolderError, open_world
from lmforge.cli import main
from lmforge.train.config import RunConfig

CONFIGS = Path(__file__).parents[2] / "configs" / "world"
STAGES = {"gatt.yaml": ["gatt", "MODEL"], "distill.yaml": ["distill-safety", "MODEL"],
          "eval_gatt.yaml": ["eval", "gatt", "[A,B]"], "ppo.yaml": ["ppo", "MODEL"], "grpo.yaml": ["grpo", "MODEL"],
          "rs.yaml": ["rs", "MODEL"]}


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("name", sorted(STAGES))
def test_shipped_stage_config_parses(name, capsys):
    path = CONFIGS / name
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# lmforge {' '.join(STAGES[name][:-1])} ") and f"--config configs/world/{name}" in first
    with pytest.raises(SystemExit) as exit_:
        main([*STAGES[name], "--config", str(path), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in _leaves(yaml.safe_load(path.read_text())):  # every value of the file arrived
        node = printed
        for part in key.split("."):
            node = node[part]
        assert node == value, key


def test_the_data_folder_sits_beside_the_run_folder(tmp_path):
    folders = stage_folders("gatt", RunConfig(dir=str(tmp_path / "g")), None)
    assert folders.data_dir == tmp_path / "g-data" and folders.run.dir == str(tmp_path / "g") and not folders.reuse
    assert stage_folders("gatt", RunConfig(), tmp_path / "d").run.dir == "runs/gatt"
    with pytest.raises(ValueError, match="same folder"):
        stage_folders("gatt", RunConfig(dir=str(tmp_path / "x")), tmp_path / "x")


def test_open_world_rebuilds_the_folders_world(stage_world, tmp_path):
    world = open_world(stage_world.world)
    written = [line for line in (stage_world.world / "eval_unsafe.jsonl").read_text().splitlines()]
    assert world.seed == 0 and world.sizes.eval_unsafe == 10 and len(written) == 50
    assert world.eval_sets("heldout")["eval_unsafe"][0]["messages"] == json.loads(written[0])["messages"]
    with pytest.raises(WorldFolderError, match="no manifest.json"):
        open_world(tmp_path)
    (tmp_path / "manifest.json").write_text('{"world": "v0", "seed": 1}')
    with pytest.raises(WorldFolderError, match="version 'v0'"):
        open_world(tmp_path)
