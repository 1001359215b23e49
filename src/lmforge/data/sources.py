"""Read text corpora as a deterministic stream of documents, with errors that name the file and line.

A data argument is a list of paths; each path is one of

    path                          kind          documents
    ----------------------------  ------------  ------------------------------------------------------
    notes.txt, README.md, any     text          the whole file is one document (UTF-8)
    data.jsonl                    jsonl         one per line: the string field `text_field` ("text")
    data.parquet                  parquet       one per row: the string column `text_field`
    folder with dataset_info.json hf_dataset    one per row of `datasets.load_from_disk(folder)`
      or dataset_dict.json                        (all splits, sorted by split name)
    any other folder              (walked)      every *.txt *.md *.rst *.jsonl *.parquet below it
    no paths at all               embedded      `lmforge.data.embedded`: pydoc topics + stdlib docstrings

Folders are walked recursively in sorted order, hidden files and folders skipped, so the same arguments
always give the same document order: token shards, train/validation splits and tokenizers trained on them
are reproducible.

Bad input raises `DataError` (a ValueError) naming the path, and the line or row where one applies: a
missing path, an empty file, a binary file (NUL bytes) or invalid UTF-8, a jsonl line that is not a JSON
object or lacks the field, a column that is missing or not text. Empty documents (a jsonl line whose text
is "") are skipped, but a file with no documents at all is an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.embedded import embedded_corpus

TEXT_SUFFIXES = (".txt", ".md", ".rst")
FOLDER_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")


class DataError(ValueError):
    """Input data that cannot be used, with the file (and line or row) where the problem is."""


@dataclass(frozen=True)
class Source:
    """One input: `kind` is "text", "jsonl", "parquet", "hf_dataset" or "embedded"."""

    kind: str
    path: str


@dataclass(frozen=True)
class Document:
    """A document's text, the `source` (path) it came from and `where` in it ("line 3", "row 7", a name)."""

    text: str
    source: str
    where: str = ""


def resolve_sources(data: Sequence[str | os.PathLike[str]] | str | None) -> list[Source]:
    """The sources named by `data` (files and folders, see the module docstring); None or [] means embedded."""
    if data is None or (not isinstance(data, (str, os.PathLike)) and len(data) == 0):
        return [Source("embedded", "embedded")]
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    sources: list[Source] = []
    for item in data:
        path = Path(item)
        if not path.exists():
            raise DataError(f"no such file or folder: {path}")
        if path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                sources.append(Source("hf_dataset", str(path)))
                continue
            found = [
                Source(_kind(p), str(p))
                for p in _walk(path)
                if p.suffix.lower() in FOLDER_SUFFIXES
            ]
            if not found:
                raise DataError(f"folder {path} holds no {' '.join('*' + s for s in FOLDER_SUFFIXES)} files")
            sources += found
        else:
            sources.append(Source(_kind(path), str(path)))
    return sources


def iter_documents(sources: Sequence[Source], text_field: str = "text") -> Iterator[Document]:
    """Every non-empty document of `sources`, in order."""
    for source in sources:
        if source.kind == "embedded":
            for embedded_source, where, text in embedded_corpus():
                yield Document(text, embedded_source, where)
            continue
        reader = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet, "hf_dataset": _read_hf}
        count = 0
        for doc in reader[source.kind](Path(source.path), text_field):
            if doc.text:
                count += 1
                yield doc
        if count == 0:
            raise DataError(f"{source.path} is empty: it holds no non-empty documents")


def _walk(folder: Path) -> list[Path]:
    """Non-hidden files below `folder`, sorted by their path components ("a.md" < "b/c.txt" < "b/x.jsonl")."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / name for name in files if not name.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def _kind(path: Path) -> str:
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix.lower(), "text")


def _decode(data: bytes, path: Path, line: int | None = None) -> str:
    """`data` as UTF-8 text, or a DataError saying where it is not (line numbers are 1-based)."""
    nul = data.find(b"\0")
    if nul >= 0:
        line = line if line is not None else data.count(b"\n", 0, nul) + 1
        raise DataError(f"{path}:{line}: looks binary (NUL byte), expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line if line is not None else data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _read_text(path: Path, text_field: str) -> Iterator[Document]:
    data = path.read_bytes()
    text = _decode(data, path).removeprefix("\ufeff")  # a byte-order mark is an encoding artefact, not text
    if not text.strip():
        raise DataError(f"{path} is empty")
    yield Document(text, str(path))


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            line = _decode(raw, path, n)
            if n == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            if text_field not in record:
                raise DataError(f"{path}:{n}: no field {text_field!r} (fields: {', '.join(sorted(record)) or 'none'})")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{n}: field {text_field!r} is {type(text).__name__}, expected a string")
            yield Document(text, str(path), f"line {n}")


def _read_parquet(path: Path, text_field: str) -> Iterator[Document]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    names = file.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})")
    column_type = file.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"{path}: column {text_field!r} has type {column_type}, expected string")
    row = 0
    for batch in file.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield Document(text, str(path), f"row {row}")
            row += 1


def _read_hf(path: Path, text_field: str) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path} is a Hugging Face dataset saved with save_to_disk; reading it needs the `datasets` "
            "package: pip install datasets"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    is_dict = isinstance(loaded, datasets.DatasetDict)
    splits = [(name, loaded[name]) for name in sorted(loaded)] if is_dict else [("", loaded)]
    for split, table in splits:
        if text_field not in table.column_names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(table.column_names)})")
        for start in range(0, len(table), 4096):
            for i, text in enumerate(table[start : start + 4096][text_field]):
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise DataError(f"{path}: column {text_field!r} holds {type(text).__name__}, expected string")
                yield Document(text, str(path), f"{split + ' ' if split else ''}row {start + i}")
