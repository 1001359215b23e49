"""Helpers of the usage tests: folder snapshots, the umask, and running a verb the way a shell would."""

import os
import stat
from pathlib import Path

from lmforge.cli import main


def snapshot(folder: Path) -> dict:
    """Every entry below `folder`: its bytes (files) and permission bits, to compare before / after a call."""
    entries = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            mode = stat.S_IMODE(path.stat().st_mode)
            entries[str(path.relative_to(folder))] = (mode, path.read_bytes() if path.is_file() else None)
    return entries


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """`lmforge ARGS` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str, *fragments: str) -> str:
    """Assert that a call ended as bad input: exit 2 and a last stderr line `lmforge: error: ...` holding
    every fragment; returns that line."""
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("lmforge: error: "), err
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert "Traceback" not in err
    return line
