"""Writing outputs: nothing half-written, and nothing of the user's replaced.

Atomic writes. An output is built under a temporary name, then renamed. A rename within one file system is
atomic: a reader (or a later run) sees either the old complete output or the new complete output, never a
partial one. Temporary names start with the target's name plus `.tmp-`, so a crashed run's leftovers are
easy to recognise and are removed on the next attempt.

The output rule. Every verb that writes a folder (convert, the model of a training run, a run folder, data
sets) asks `claim_output_dir` first:

    destination                                     overwrite=False    overwrite=True
    missing, or an empty folder                     written            written
    a folder lmforge wrote (it has .lmforge-output) refused            replaced
    any other non-empty folder, or a file           refused            refused

A folder lmforge writes carries the marker file `.lmforge-output` (JSON: what wrote it, and when), so that
a later `--overwrite true` can tell our outputs from the user's own files: a folder of the user's is never
deleted, whatever the flags. `output_dir()` combines the rule, the atomic swap and the marker.

Reading a user's files. `read_json` and `read_yaml` turn a syntax error into one line that names the file,
the line and the column (`runs/data/manifest.json:2:1: not valid JSON (Expecting property name ...)`), so
that a corrupt file is found without a traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MARKER = ".lmforge-output"


class FileFormatError(ValueError):
    """A JSON or YAML file that cannot be parsed; the message names the file, line and column."""


class OutputExistsError(FileExistsError):
    """The destination holds something the output rule does not let this call replace (module docstring).

    NOTE: an OSError, so the CLI ends with this one message (exit status 2), as for every bad input.
    """


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: Path, is_dir: bool = False) -> None:
    """mkdtemp / mkstemp create 0700 / 0600 entries; give a finished output the user's ordinary umask mode."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces `path`, on error it is removed.

        with atomic_dir("out/model") as tmp:
            (tmp / "config.json").write_text(...)
        # out/model now holds exactly what was written, or is untouched if the block raised
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # leftovers of an earlier crashed write: only names this function makes (mkdtemp's 8 characters, or the
    # old copy's pid), never another folder that merely starts with NAME.tmp-
    ours = re.compile(re.escape(path.name) + r"\.tmp-(old-\d+|[a-z0-9_]{8})")
    for stale in path.parent.glob(f"{path.name}.tmp-*"):
        if ours.fullmatch(stale.name) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        publish_mode(tmp, is_dir=True)
        if path.exists():
            old = path.parent / f"{path.name}.tmp-old-{os.getpid()}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator:
    """Open a temporary file beside `path` for writing; on success it is flushed, synced and renamed.

        with atomic_file("out/manifest.json", "w", encoding="utf-8") as f:
            json.dump(manifest, f)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish_mode(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike) -> object:
    """The JSON value in the file `path`; FileFormatError naming the file, line and column if it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None


def read_yaml(path: str | os.PathLike) -> object:
    """The YAML document in the file `path`; FileFormatError naming the file, line and column if it is not YAML."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise FileFormatError(f"{where}: not valid YAML ({e.problem or e.context})") from None
    except yaml.YAMLError as e:
        raise FileFormatError(f"{path}: not valid YAML ({e})") from None
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path}: not valid YAML (not UTF-8 text: {e.reason} at byte {e.start})") from None


def is_lmforge_output(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder that lmforge wrote (it carries the marker file)."""
    return (Path(path) / MARKER).is_file()


def claim_output_dir(path: str | os.PathLike, overwrite: bool = False, flag: str = "--overwrite true") -> bool:
    """Check that `path` may be written under the output rule (module docstring); raise OutputExistsError if not.

    Returns True when `path` already holds an earlier lmforge output that will be replaced. `flag` is how the
    caller's user says "overwrite" (it names the option in the message, e.g. "--run.overwrite true").
    """
    path = Path(path)
    if not path.exists():
        return False
    if not path.is_dir():
        raise OutputExistsError(f"{path} is a file, not a folder: lmforge writes its outputs as folders and "
                                "does not replace files it did not write")
    if not any(path.iterdir()):
        return False
    if not is_lmforge_output(path):
        raise OutputExistsError(f"{path} is not empty and lmforge did not write it (it has no {MARKER} marker): "
                                "refusing to replace it, even with overwrite; choose another destination")
    if not overwrite:
        raise OutputExistsError(f"{path} holds an earlier lmforge output; pass {flag} to replace it, or choose "
                                "another destination")
    return True


def write_marker(folder: str | os.PathLike, written_by: str) -> None:
    """Mark `folder` as an lmforge output (the marker names the verb or function that wrote it)."""
    from lmforge import __version__

    record = {"written_by": written_by, "lmforge": __version__,
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with atomic_file(Path(folder) / MARKER, "w", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, written_by: str, overwrite: bool = False,
               flag: str = "--overwrite true") -> Iterator[Path]:
    """The output rule, then `atomic_dir`, then the marker: the one way a verb writes a whole folder.

        with output_dir(dst, "convert", overwrite) as tmp:
            save_file(state, tmp / "model.safetensors")
        # dst holds exactly what was written plus .lmforge-output; a refused or failed call left dst untouched
    """
    claim_output_dir(path, overwrite, flag)
    with atomic_dir(path) as tmp:
        yield tmp
        write_marker(tmp, written_by)
