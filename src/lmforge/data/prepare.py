"""`lmforge data prepare`: tokenize corpora into memory-mapped token shards (format in shards.py).

Pipeline (P = `workers` processes, each loading the tokenizer once):

    main process: read documents in order ──► batches of ~256 KiB of text ──► pool (P workers, ≤ 2P batches
    in flight): encode + eos, hash for the split ──► results in submission order ──► ShardWriter

Results are consumed in document order, so the shards are byte-identical for any number of workers. A
document goes to the validation split when a seeded hash of its text falls below `val_fraction`
(shards.is_validation). `write_token_documents` is the same writer for documents that are already ids,
with an optional loss mask per token: SFT chat data (tokenizer/chat.py) takes that path.

Resuming: progress.json records the settings (tokenizer sha256, inputs with their sizes and mtimes, split
and shard options) and each finished shard. A run started again with the same settings keeps the finished
shards that still verify (sizes and sha256), deletes leftovers, skips their documents without tokenizing
them, and goes on; with different settings it stops and asks for `overwrite`.

The output folder follows lmforge's output rule (`lmforge.io`): a missing or empty folder is claimed and
marked (`.lmforge-output`) before the first shard is written, so that a later run recognises it as ours and
resumes or (with `overwrite`) replaces what it holds; a non-empty folder without the marker is never
written into, whatever the flags.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmforge.data.shards import (
    FORMAT, MANIFEST, PROGRESS, SPLITS, ShardWriter, is_validation, read_manifest, shard_files, token_dtype,
    verify_shard, write_json_atomic,
)
from lmforge.data.pool import batches, ordered_map
from lmforge.data.sources import DataError, Source, iter_documents, resolve_sources
from lmforge.io import MARKER, claim_output_dir, is_lmforge_output, read_json, write_marker
from lmforge.tokenizer.tokenizer import Tokenizer, TokenizerError

DATA_WRITERS = ("data prepare", "write_token_documents")  # the `written_by` of folders this module fills


def prepare_data(
    data: list[str] | str | None = None,
    tokenizer: str = "runs/tokenizer/tokenizer.model",
    out_dir: str = "runs/data",
    text_field: str = "text",
    val_fraction: float = 0.01,
    seed: int = 0,
    shard_tokens: int = 100_000_000,
    workers: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Tokenize corpora into memory-mapped token shards with a train/validation split and a manifest.

    Each document is encoded without <s> and followed by </s>; shards are uint16 (vocabularies up to 65536)
    or uint32 files, written under temporary names and renamed when complete. An interrupted run started
    again with the same arguments skips the shards it already finished.

    Args:
        data: a path or a list of paths ("--data a.txt", "--data [a.txt,b.jsonl]" or "--data+ a --data+ b"):
            text files (.txt, .md, any name), .jsonl, .parquet, folders (walked recursively) or Hugging Face
            datasets saved with save_to_disk. None: the embedded corpus (pydoc topics + stdlib docstrings).
        tokenizer: a SentencePiece tokenizer.model (or the folder holding it).
        out_dir: output folder for the shards, manifest.json and prepare_metrics.jsonl.
        text_field: the jsonl field, parquet column or dataset column holding the text.
        val_fraction: share of documents (chosen by a seeded hash of their text) in the validation split.
        seed: seed of the train/validation split.
        shard_tokens: close a shard at the first document boundary past this many tokens.
        workers: tokenizer processes (default: all cores; 1 tokenizes in this process).
        overwrite: delete a previous or unfinished run in OUT_DIR with other settings and start again (only
            in a folder lmforge wrote; any other non-empty folder is refused).

    Returns:
        The manifest (also written to OUT_DIR/manifest.json).
    """
    tok = Tokenizer(tokenizer)
    if tok.eos_id < 0:
        raise TokenizerError(f"{tok.path} has no </s> piece to end documents with")
    _check_split_and_shards(val_fraction, shard_tokens)
    sources = resolve_sources(data)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    settings = {
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": token_dtype(tok.vocab_size).name,
        "inputs": _fingerprint(sources),
        "text_field": text_field,
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
    }
    stats: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()

    def documents(skip: int) -> Iterator[tuple[bool, np.ndarray, None]]:
        texts = _read(sources, text_field, stats)
        for _ in range(skip):
            next(texts, None)  # already in finished shards: read (for the stats), don't tokenize
        for is_val, ids in _tokenize(texts, str(tok.path), seed, val_fraction, workers):
            yield is_val, ids, None

    def describe() -> dict:  # called once every document has been read
        return {"tokenizer": str(tok.path.resolve()),
                "sources": [{"path": path, **counts} for path, counts in stats.items()],
                "bytes": sum(s["bytes"] for s in stats.values())}

    manifest, fresh = _write(Path(out_dir), settings, documents, describe, overwrite, "data prepare")
    if fresh:
        seconds = time.perf_counter() - start
        metrics = {"event": "prepare", "seconds": round(seconds, 3), "workers": workers,
                   "documents": manifest["documents"], "tokens": manifest["tokens"], "bytes": manifest["bytes"],
                   "mb_per_s": round(manifest["bytes"] / 1e6 / seconds, 3),
                   "tokens_per_s": round(manifest["tokens"] / seconds, 1)}
        with open(Path(out_dir) / "prepare_metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        print(f"prepared {metrics['documents']} documents, {metrics['tokens']} tokens, "
              f"{metrics['bytes'] / 1e6:.2f} MB in {seconds:.1f} s ({metrics['mb_per_s']:.2f} MB/s, "
              f"{metrics['tokens_per_s']:.0f} tokens/s) -> {out_dir}", file=sys.stderr)
    return manifest


def write_token_documents(
    documents: Iterable[tuple[Any, Any]],
    out_dir: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | Tokenizer,
    val_fraction: float = 0.0,
    seed: int = 0,
    shard_tokens: int = 100_000_000,
    name: str = "documents",
    overwrite: bool = False,
) -> dict:
    """Write documents given as (ids, loss_mask or None) pairs into shards, e.g. SFT dialogues from
    `encode_chat` (ids end with </s> already; nothing is appended). A mask file is written for every shard
    split where some document has a mask (1 = learn); documents without one count as all 1. `tokenizer`
    made the ids (its sha256 goes into the manifest); `name` stands for the inputs in the manifest, and
    resuming an interrupted run needs the same `documents` in the same order."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    _check_split_and_shards(val_fraction, shard_tokens)
    vocab_size = tok.vocab_size
    settings = {"tokenizer_sha256": tok.sha256, "vocab_size": vocab_size, "eos_id": tok.eos_id,
                "dtype": token_dtype(vocab_size).name, "inputs": [name], "val_fraction": val_fraction,
                "seed": seed, "shard_tokens": shard_tokens}
    count = {"documents": 0}

    def stream(skip: int) -> Iterator[tuple[bool, np.ndarray, np.ndarray | None]]:
        for i, (ids, mask) in enumerate(documents):
            count["documents"] += 1
            if i < skip:
                continue
            ids = np.asarray(ids, dtype=np.int64)
            if ids.size == 0:
                raise DataError(f"{name}: document {i} is empty")
            if ids.min() < 0 or ids.max() >= vocab_size:
                raise DataError(f"{name}: document {i} has ids outside [0, {vocab_size})")
            m = None if mask is None else np.asarray(mask, dtype=np.uint8)
            key = ids.tobytes() + (b"" if m is None else m.tobytes())
            yield is_validation(key, seed, val_fraction), ids, m

    def describe() -> dict:
        return {"tokenizer": str(tok.path.resolve()), "sources": [{"path": name, **count}]}

    manifest, _ = _write(Path(out_dir), settings, stream, describe, overwrite, "write_token_documents")
    return manifest


def _write(out: Path, settings: dict, documents: Any, describe: Any, overwrite: bool,
           written_by: str) -> tuple[dict, bool]:
    """Run (or resume) the shard writer over `documents(skip)`, then write the manifest, adding the fields of
    `describe()`. Returns the manifest and whether this call wrote it (False: it was already there)."""
    created = not out.exists()
    claimed = _claim(out, overwrite, written_by)
    if (out / MANIFEST).exists() and not overwrite:
        manifest = read_manifest(out)
        if manifest["settings"] == settings:
            print(f"{out} is already prepared with these settings; nothing to do", file=sys.stderr)
            return manifest, False
        raise FileExistsError(f"{out} holds data prepared with other settings; pass --overwrite true to replace "
                              "it, or choose another --out_dir")
    shards = _resume(out, settings, overwrite)
    dtype = np.dtype(settings["dtype"])

    def on_finish(record: dict) -> None:
        shards.append(record)
        write_json_atomic(out / PROGRESS, {"format": FORMAT, "settings": settings, "shards": shards})

    first_doc = shards[-1]["doc_end"] if shards else 0
    writer = ShardWriter(out, dtype, settings["shard_tokens"], len(shards), first_doc, on_finish)
    try:
        for is_val, ids, mask in documents(first_doc):
            writer.add(SPLITS[1] if is_val else SPLITS[0], ids, mask)
        writer.finish()
    except BaseException:
        writer.abort()
        if claimed and not shards:  # nothing of this run is worth resuming: leave the folder as it was
            _remove_run(out, [])
            (out / MARKER).unlink(missing_ok=True)
            if created and not any(out.iterdir()):
                out.rmdir()
        raise
    splits = {}
    for split in SPLITS:
        entries = [{"index": r["index"], **r[split]} for r in shards if r[split]["documents"]]
        splits[split] = {"documents": sum(e["documents"] for e in entries), "tokens": sum(e["tokens"] for e in entries),
                         "shards": entries}
    manifest = {
        "format": FORMAT,
        "settings": settings,
        "dtype": settings["dtype"],
        "documents": sum(s["documents"] for s in splits.values()),
        "tokens": sum(s["tokens"] for s in splits.values()),
        **describe(),
        "splits": splits,
        "shards": [{"index": r["index"], "doc_start": r["doc_start"], "doc_end": r["doc_end"]} for r in shards],
    }
    write_json_atomic(out / MANIFEST, manifest)
    (out / PROGRESS).unlink(missing_ok=True)
    return manifest, True


def _claim(out: Path, overwrite: bool, written_by: str) -> bool:
    """Apply the output rule to `out` for a writer that fills it incrementally; True if this call claimed it.

    A folder we marked earlier is kept (the caller resumes it or, with overwrite, replaces our files in it);
    a folder that another lmforge verb wrote (a model, say) is replaced only with overwrite; a missing or
    empty folder is created and marked; anything else is refused (OutputExistsError)."""
    if is_lmforge_output(out):
        marker = read_json(out / MARKER)
        if isinstance(marker, dict) and marker.get("written_by") in DATA_WRITERS:
            return False
        claim_output_dir(out, overwrite)  # another verb's output: refused without overwrite
        shutil.rmtree(out)
    else:
        claim_output_dir(out, overwrite)  # refuses a non-empty folder that is not ours
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, written_by)
    return True



def _resume(out: Path, settings: dict, overwrite: bool) -> list[dict]:
    """Finished shards of an interrupted run that can be kept; cleans everything else of ours in `out`."""
    progress_path = out / PROGRESS
    kept: list[dict] = []
    if progress_path.exists():
        progress = read_json(progress_path)
        if progress.get("settings") != settings and not overwrite:
            raise FileExistsError(
                f"{out} holds an unfinished run with other settings (or inputs changed since); "
                "pass --overwrite true to discard it"
            )
        if progress.get("settings") == settings:
            dtype = np.dtype(settings["dtype"])
            for record in progress["shards"]:
                if record["index"] != len(kept) or not verify_shard(out, record, dtype):
                    break
                kept.append(record)
    _remove_run(out, [name for r in kept for name in shard_files(r)])
    if kept:
        write_json_atomic(progress_path, {"format": FORMAT, "settings": settings, "shards": kept})
        print(f"resuming {out}: keeping {len(kept)} finished shards (documents [0, {kept[-1]['doc_end']}))",
              file=sys.stderr)
    return kept


SHARD_FILE = re.compile(r"(train|validation)-\d{5,}\.(bin|idx|mask)")
TEMP_FILE = re.compile(r"\..+\.tmp")


def _remove_run(out: Path, keep: list[str]) -> None:
    """Delete the shard, temporary, manifest and progress files of a run in `out` (nothing else), except `keep`."""
    keep_set = set(keep) | ({PROGRESS} if keep else set())
    for path in out.iterdir():
        name = path.name
        ours = name in (MANIFEST, PROGRESS) or SHARD_FILE.fullmatch(name) or TEMP_FILE.fullmatch(name)
        if ours and name not in keep_set and path.is_file():
            path.unlink()


def _check_split_and_shards(val_fraction: float, shard_tokens: int) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")


def _fingerprint(sources: list[Source]) -> list:
    """Inputs with size and mtime, so resuming after an input changed is refused."""
    out: list = []
    for s in sources:
        if s.kind == "embedded":
            out.append([s.path, sys.version.split()[0]])
        elif Path(s.path).is_file():
            st = Path(s.path).stat()
            out.append([s.path, st.st_size, st.st_mtime_ns])
        else:
            out.append([s.path])
    return out


def _read(sources: list[Source], text_field: str, stats: dict) -> Iterator[str]:
    for doc in tqdm(iter_documents(sources, text_field), desc="tokenizing", unit=" docs", mininterval=1.0,
                    disable=None):
        entry = stats.setdefault(doc.source, {"documents": 0, "bytes": 0})
        entry["documents"] += 1
        entry["bytes"] += len(doc.text.encode("utf-8"))
        yield doc.text


# --- the worker side: each process loads the tokenizer once --------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, seed: int, val_fraction: float) -> None:
    _WORKER.update(tok=Tokenizer(tokenizer_path), seed=seed, val_fraction=val_fraction)


def _encode_batch(texts: list[str]) -> list[tuple[bool, np.ndarray]]:
    tok, dtype = _WORKER["tok"], token_dtype(_WORKER["tok"].vocab_size)
    return [
        (is_validation(t.encode("utf-8"), _WORKER["seed"], _WORKER["val_fraction"]),
         tok.encode_numpy(t, eos=True).astype(dtype))
        for t in texts
    ]


def _tokenize(texts: Iterable[str], tokenizer_path: str, seed: int, val_fraction: float,
              workers: int) -> Iterator[tuple[bool, np.ndarray]]:
    """(is_validation, ids + eos) per text, in input order."""
    tasks = batches(texts, size=len)
    for encoded in ordered_map(_encode_batch, tasks, workers, _init_worker, (tokenizer_path, seed, val_fraction)):
        yield from encoded
