"""Token shards on disk: the format, a resumable writer, and the manifest that ties them together.

A prepared data folder (format "lmforge-tokens/1") holds, for shard k and split s in {train, validation}:

    {s}-{k:05d}.bin    token ids, uint16 when the vocabulary fits (V <= 65536) else uint32, documents
                       back to back, each ending with </s> for text data
    {s}-{k:05d}.idx    int64 end offset of each document inside the shard (cumulative token counts)
    {s}-{k:05d}.mask   uint8 per token, 1 = learn (only when some document came with a loss mask)
    manifest.json      written last: settings, tokenizer sha256, dtype, documents, tokens, sources, shards
    progress.json      while a run is unfinished: settings and the shards finished so far

Shard k holds the documents with global index in [doc_start, doc_end) (train and validation documents of
that range go to the two splits' files), and is closed at the first document boundary where it holds at
least `shard_tokens` tokens. Worked example with shard_tokens=10 and document lengths 4 6 3 9 2 (eos
included), all train:

    shard 0: documents [0, 2)  tokens 4 + 6 = 10      train-00000.idx = [4, 10]
    shard 1: documents [2, 4)  tokens 3 + 9 = 12      train-00001.idx = [3, 12]
    shard 2: documents [4, 5)  tokens 2                train-00002.idx = [2]

Boundaries depend only on the documents, never on how many workers tokenized them, so a run started again
after an interruption keeps the shards listed in progress.json (after checking their sizes and sha256)
and continues from the first document of the next shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.io import atomic_file, publish_mode, read_json

FORMAT = "lmforge-tokens/1"
SPLITS = ("train", "validation")
MANIFEST = "manifest.json"
PROGRESS = "progress.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id < vocab_size fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def is_validation(key: bytes, seed: int, val_fraction: float) -> bool:
    """Whether the document whose content is `key` goes to the validation split.

    A hash of (seed, content) mapped to [0, 1) and compared with `val_fraction`: deterministic, independent
    of document order and worker count, and identical documents always land in the same split.
    """
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(key, digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_file(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class _SplitFiles:
    """The open temporary files of one split of the shard being written."""

    tokens: int = 0
    ends: list[int] = field(default_factory=list)
    handles: dict[str, Any] = field(default_factory=dict)  # "bin" / "mask" -> file object
    temps: dict[str, Path] = field(default_factory=dict)


class ShardWriter:
    """Append documents (ids, optional loss mask) to shards; close a shard every `shard_tokens` tokens.

    `shards` lists the finished shards (records as in progress.json); `on_finish(record)` runs after each
    shard's files are renamed into place (prepare uses it to rewrite progress.json).
    """

    def __init__(self, out_dir: Path, dtype: np.dtype, shard_tokens: int, first_shard: int, first_doc: int,
                 on_finish: Callable[[dict], None]):
        self.out_dir, self.dtype, self.shard_tokens = out_dir, dtype, shard_tokens
        self.index, self.doc_start, self.doc_end = first_shard, first_doc, first_doc
        self.on_finish = on_finish
        self.splits = {s: _SplitFiles() for s in SPLITS}

    def add(self, split: str, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append one document (the next global document index) to `split` of the current shard."""
        files = self.splits[split]
        if "bin" not in files.handles:
            self._open(files, split, "bin")
        files.handles["bin"].write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        if mask is not None and "mask" not in files.handles:
            self._open(files, split, "mask")
            files.handles["mask"].write(np.ones(files.tokens, dtype=np.uint8).tobytes())  # earlier documents
        if "mask" in files.handles:
            m = np.ones(len(ids), dtype=np.uint8) if mask is None else np.asarray(mask, dtype=np.uint8)
            if len(m) != len(ids):
                raise ValueError(f"document {self.doc_end}: loss mask has {len(m)} entries for {len(ids)} tokens")
            files.handles["mask"].write(m.tobytes())
        files.tokens += len(ids)
        files.ends.append(files.tokens)
        self.doc_end += 1
        if sum(f.tokens for f in self.splits.values()) >= self.shard_tokens:
            self.finish()

    def finish(self) -> None:
        """Close the current shard (if it holds any document): fsync, rename into place, report, start the next."""
        if self.doc_end == self.doc_start:
            return
        record: dict[str, Any] = {"index": self.index, "doc_start": self.doc_start, "doc_end": self.doc_end}
        for split, files in self.splits.items():
            entry: dict[str, Any] = {"documents": len(files.ends), "tokens": files.tokens}
            if files.ends:
                self._open(files, split, "idx").write(np.asarray(files.ends, dtype=np.int64).tobytes())
                for kind, f in files.handles.items():
                    f.flush()
                    os.fsync(f.fileno())
                    f.close()
                names = {kind: _name(split, self.index, kind) for kind in files.temps}
                for kind, tmp in files.temps.items():
                    publish_mode(tmp)  # mkstemp made it 0600
                    os.replace(tmp, self.out_dir / names[kind])
                entry.update(names)
                entry["sha256"] = file_sha256(self.out_dir / names["bin"])
            record[split] = entry
        self.splits = {s: _SplitFiles() for s in SPLITS}
        self.index += 1
        self.doc_start = self.doc_end
        self.on_finish(record)

    def abort(self) -> None:
        """Close and delete the temporary files of the unfinished shard."""
        for files in self.splits.values():
            for f in files.handles.values():
                f.close()
            for tmp in files.temps.values():
                tmp.unlink(missing_ok=True)
        self.splits = {s: _SplitFiles() for s in SPLITS}

    def _open(self, files: _SplitFiles, split: str, kind: str) -> Any:
        fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=f".{_name(split, self.index, kind)}.", suffix=".tmp")
        files.temps[kind] = Path(tmp)
        files.handles[kind] = os.fdopen(fd, "wb")
        return files.handles[kind]


def _name(split: str, index: int, kind: str) -> str:
    return f"{split}-{index:05d}.{kind}"


def verify_shard(out_dir: Path, record: dict, dtype: np.dtype, check_hash: bool = True) -> bool:
    """Whether the files of a finished shard exist with the sizes (and sha256) its record promises."""
    for split in SPLITS:
        entry = record.get(split, {})
        if not entry.get("documents"):
            continue
        sizes = {"bin": entry["tokens"] * dtype.itemsize, "idx": entry["documents"] * 8, "mask": entry["tokens"]}
        for kind, size in sizes.items():
            if kind not in entry:
                continue
            path = out_dir / entry[kind]
            if not path.is_file() or path.stat().st_size != size:
                return False
        if check_hash and file_sha256(out_dir / entry["bin"]) != entry["sha256"]:
            return False
    return True


def shard_files(record: dict) -> list[str]:
    return [record[s][k] for s in SPLITS for k in ("bin", "idx", "mask") if k in record.get(s, {})]


def read_manifest(data_dir: str | os.PathLike[str]) -> dict:
    """The manifest of a prepared data folder, with a clear error when the folder is not one."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        unfinished = (Path(data_dir) / PROGRESS).exists()
        hint = " (an unfinished run: start `lmforge data prepare` again to finish it)" if unfinished else ""
        raise FileNotFoundError(f"{path} not found: {data_dir} is not a prepared data folder{hint}")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path}: format {found!r} is not {FORMAT!r}")
    return manifest
