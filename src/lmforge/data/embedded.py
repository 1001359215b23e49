"""The embedded default corpus: English text that every CPython installation carries, about 2.2 MB.

With no data argument, `lmforge tokenizer train` and `lmforge data prepare` use two sources, in this order:

1. `pydoc_data.topics.topics`: the language-reference topics behind `help("if")`, one document per topic,
   sorted by topic name (79 topics, about 0.46 MB on CPython 3.11);
2. the docstrings of the standard library's modules, classes and functions, one document per `.py` file
   (its docstrings in source order, joined by blank lines), files sorted by path (about 1.8 MB on 3.11).

Docstrings are read from source files with `ast.parse` + `ast.get_docstring`, never by importing: importing
`antigravity` opens a web browser, `this` prints the Zen, tkinter and idlelib want a display, and a
`__main__` module runs a program. Files that do not parse (the stdlib ships a few deliberately broken or
Python-2 test inputs) are skipped.

NOTE: the test suites (`test/`, `tests/`, `idle_test/`) are left out. They would add ~0.5 MB of
"Test that ..." docstrings and triple the parse time (ast.parse reads ~1.6 MB/s of source on the 2-core dev
machine: ~7 s for the 12 MB outside the test suites, ~30 s with them).

NOTE: parsing is slow and the result only changes with the Python installation, so the documents are cached
as JSON under `$LMFORGE_CACHE_DIR` (default `~/.cache/lmforge`), keyed by the Python version and the names,
sizes and mtimes of the stdlib files; a cache that cannot be written is not an error. The text differs
between Python versions: tests that pin numbers use a seeded synthetic corpus instead.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
TOPICS = "embedded:pydoc-topics"
STDLIB = "embedded:stdlib-docstrings"


def pydoc_topics() -> list[tuple[str, str]]:
    """(topic, text) pairs of `pydoc_data.topics.topics`, sorted by topic."""
    from pydoc_data.topics import topics

    return sorted((name, text) for name, text in topics.items() if text.strip())


def stdlib_files(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Sorted `.py` files under the stdlib folder `root` (default: this interpreter's), test suites left out."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
        found += [Path(folder) / f for f in files if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def file_docstrings(path: str | os.PathLike[str]) -> str:
    """Docstrings of the module, classes and functions of one source file in source order, joined by blank
    lines; "" when it has none or does not parse."""
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (SyntaxError, ValueError, OSError):  # Python-2 test inputs, NUL bytes, unreadable files
        return ""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        # Only statement bodies can hold a def or class; walking them (not every expression node, as
        # ast.walk would) keeps this pass at ~3% of the parse time.
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and doc.strip():
                found.append(doc)
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            for child in getattr(node, field, None) or ():
                if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                    visit(child)

    visit(tree)
    return "\n\n".join(found)


def stdlib_docstrings(root: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """(module path relative to `root`, docstrings) pairs for every stdlib file that has docstrings."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    docs = []
    for path in stdlib_files(root):
        text = file_docstrings(path)
        if text:
            docs.append((path.relative_to(root).as_posix(), text))
    return docs


def embedded_corpus(
    cache_dir: str | os.PathLike[str] | None = None, stdlib_root: str | os.PathLike[str] | None = None
) -> Iterator[tuple[str, str, str]]:
    """(source, name, text) of every embedded document: the pydoc topics, then the stdlib docstrings."""
    for name, text in pydoc_topics():
        yield TOPICS, name, text
    for name, text in cached_stdlib_docstrings(cache_dir, stdlib_root):
        yield STDLIB, name, text


def cached_stdlib_docstrings(
    cache_dir: str | os.PathLike[str] | None = None, root: str | os.PathLike[str] | None = None
) -> list[tuple[str, str]]:
    """`stdlib_docstrings(root)`, read from the cache when the stdlib files have not changed since."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    key = hashlib.sha256(repr((sys.version, str(root))).encode())
    for path in files:
        st = path.stat()
        key.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    cache_dir = Path(cache_dir or os.environ.get("LMFORGE_CACHE_DIR") or Path.home() / ".cache" / "lmforge")
    cache = cache_dir / f"stdlib-docstrings-{key.hexdigest()[:16]}.json"
    try:
        return [tuple(pair) for pair in json.loads(cache.read_text(encoding="utf-8"))]  # type: ignore[misc]
    except (OSError, ValueError):
        pass
    docs = stdlib_docstrings(root)
    tmp = None
    try:  # atomic: a reader never sees half a cache file
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(docs, f, ensure_ascii=False)
        os.replace(tmp, cache)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return docs
