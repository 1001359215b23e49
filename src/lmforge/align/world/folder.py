"""The world behind a folder that `lmforge world build` wrote, rebuilt in memory from its manifest.

The stages after SFT draw more of the same world than its files hold: Ghost Attention's multi-turn
instruction dialogues of the train split, `eval gatt`'s held-out dialogues of up to 20 turns, red teaming's
attacks per risk category and style. The world is deterministic from its seed and sizes, so `open_world`
rebuilds it from manifest.json; the draws of those stages come from random streams of their own names
(`common.stream`), and the train / held-out split is a property of each item, so they keep the split and no
v1 file or record changes.

NOTE: an addition beside world v1 (it reads a v1 folder and writes nothing).
"""

from __future__ import annotations

from pathlib import Path

from lmforge.align.world.common import VERSION
from lmforge.align.world.records import World, WorldSizes


class WorldFolderError(ValueError):
    """A folder that is not a world `lmforge world build` wrote (the message names it)."""


def open_world(folder: str | Path) -> World:
    """The `World` of a built world folder: its seed and sizes from manifest.json."""
    from lmforge.io import read_json

    manifest_path = Path(folder) / "manifest.json"
    if not manifest_path.is_file():
        raise WorldFolderError(f"{folder} holds no manifest.json: not a world folder (write one with "
                               "`lmforge world build --out_dir FOLDER`)")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("world") != VERSION:
        world = manifest.get("world") if isinstance(manifest, dict) else None
        raise WorldFolderError(f"{manifest_path}: a world of version {world!r}; this lmforge reads world {VERSION}")
    try:
        return World(int(manifest["seed"]), WorldSizes(**manifest["sizes"]))
    except (KeyError, TypeError) as e:
        raise WorldFolderError(f"{manifest_path}: no valid seed and sizes ({e})") from None


__all__ = ["WorldFolderError", "open_world"]
