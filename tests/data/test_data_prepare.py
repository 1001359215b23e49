"""`prepare_data` / `write_token_documents`: contents, split, shard boundaries, worker independence, resume."""

import json

import numpy as np
import pytest
from data_helpers import write_jsonl

from lmforge.cli import main
from lmforge.data.prepare import prepare_data, write_token_documents
from lmforge.data.shards import ShardWriter, is_validation, token_dtype
from lmforge.data.sources import DataError
from lmforge.io import MARKER
from lmforge.tokenizer import encode_chat

SHARD = 3000  # tokens: the 300-document corpus makes ~10 shards


class Interrupted(BaseException):
    """Stands for Ctrl-C or a kill (pytest itself reacts to a real Interrupted)."""


def read_split(out, manifest, split):
    """(ids, mask or None) of every document of a split, in order, from the shard files."""
    docs = []
    for entry in manifest["splits"][split]["shards"]:
        ids = np.fromfile(out / entry["bin"], dtype=manifest["dtype"])
        mask = np.fromfile(out / entry["mask"], dtype=np.uint8) if "mask" in entry else None
        ends = np.fromfile(out / entry["idx"], dtype=np.int64)
        for a, b in zip(np.concatenate([[0], ends[:-1]]), ends):
            docs.append((ids[a:b].tolist(), None if mask is None else mask[a:b].tolist()))
    return docs


def folder_bytes(out):
    """Every file's bytes, except the two that record when they were written (the metrics log, the marker)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name not in ("prepare_metrics.jsonl", MARKER)}


def test_shards_hold_every_document_once_with_eos(corpus, docs, tok, tok_path, tmp_path):
    out = tmp_path / "out"
    m = prepare_data([str(corpus)], tokenizer=tok_path, out_dir=str(out), val_fraction=0.2, seed=3,
                     shard_tokens=SHARD, workers=1)
    assert m["dtype"] == "uint16" and m["settings"]["tokenizer_sha256"] == tok.sha256
    assert m["documents"] == len(docs) and m["sources"] == [{"path": str(corpus), "documents": len(docs),
                                                            "bytes": sum(len(d.encode()) for d in docs)}]
    expected = {"train": [], "validation": []}
    for d in docs:
        split = "validation" if is_validation(d.encode(), 3, 0.2) else "train"
        expected[split].append(tok.encode(d, eos=True))
    assert 0.1 < len(expected["validation"]) / len(docs) < 0.3
    for split in ("train", "validation"):
        got = read_split(out, m, split)
        assert [ids for ids, _ in got] == expected[split]
        assert all(mask is None for _, mask in got)  # plain text: no mask files
        assert m["splits"][split]["tokens"] == sum(map(len, expected[split]))
    assert m["tokens"] == sum(m["splits"][s]["tokens"] for s in ("train", "validation"))
    assert not (out / "progress.json").exists() and not list(out.glob("*.tmp"))
    metrics = json.loads((out / "prepare_metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["tokens"] == m["tokens"] and metrics["mb_per_s"] > 0


def test_shards_close_at_the_first_document_boundary_past_shard_tokens(corpus, tok_path, tmp_path):
    m = prepare_data([str(corpus)], tokenizer=tok_path, out_dir=str(tmp_path), shard_tokens=SHARD, workers=1)
    shards = m["shards"]
    assert len(shards) > 5 and shards[0]["doc_start"] == 0 and shards[-1]["doc_end"] == m["documents"]
    assert all(a["doc_end"] == b["doc_start"] for a, b in zip(shards, shards[1:]))
    for entry in m["splits"]["train"]["shards"][:-1]:  # val_fraction 0.01: check the train side alone
        ends = np.fromfile(tmp_path / entry["idx"], dtype=np.int64)
        index = entry["index"]
        val = m["splits"]["validation"]["shards"]
        val_tokens = sum(v["tokens"] for v in val if v["index"] == index)
        assert ends[-1] + val_tokens >= SHARD
        assert ends[-2] < SHARD  # one document less would not have reached it


def test_output_does_not_depend_on_worker_count(corpus, tok_path, tmp_path):
    for workers in (1, 2):
        prepare_data([str(corpus)], tokenizer=tok_path, out_dir=str(tmp_path / f"w{workers}"), shard_tokens=SHARD,
                     val_fraction=0.1, workers=workers)
    assert folder_bytes(tmp_path / "w1") == folder_bytes(tmp_path / "w2")


def test_interrupted_run_resumes_without_redoing_finished_shards(corpus, tok_path, tmp_path, monkeypatch):
    args = dict(data=[str(corpus)], tokenizer=tok_path, shard_tokens=SHARD, val_fraction=0.1, workers=2)
    clean = prepare_data(out_dir=str(tmp_path / "clean"), **args)
    out = tmp_path / "out"
    original = ShardWriter.finish
    written, interrupt = [], [True]

    def finish_then_interrupt(self):
        if self.doc_end > self.doc_start:
            written.append(self.index)
        original(self)
        if len(written) == 3 and interrupt[0]:
            interrupt[0] = False
            raise Interrupted

    monkeypatch.setattr(ShardWriter, "finish", finish_then_interrupt)
    with pytest.raises(Interrupted):
        prepare_data(out_dir=str(out), **args)
    assert written == [0, 1, 2]
    progress = json.loads((out / "progress.json").read_text())
    assert [r["index"] for r in progress["shards"]] == [0, 1, 2]
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.tmp"))
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*-0000[012].*")}
    assert len(kept) >= 6

    (out / "train-00002.bin").write_bytes(b"\0" * 10)  # a damaged shard is redone, not trusted
    (out / ".train-00003.bin.junk.tmp").write_bytes(b"left by a killed run")
    written.clear()
    resumed = prepare_data(out_dir=str(out), **args)
    assert written == list(range(2, len(clean["shards"])))  # shards 0 and 1 were not written again
    assert all((out / name).stat().st_mtime_ns == t for name, t in kept.items() if "-00002." not in name)
    assert resumed == clean | {"sources": resumed["sources"]} and resumed["sources"] == clean["sources"]
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")


def test_rerun_and_changed_settings(corpus, tok_path, tmp_path, capsys):
    args = dict(data=[str(corpus)], tokenizer=tok_path, out_dir=str(tmp_path), shard_tokens=SHARD, workers=1)
    first = prepare_data(**args)
    stamp = (tmp_path / "manifest.json").stat().st_mtime_ns
    assert prepare_data(**args) == first and (tmp_path / "manifest.json").stat().st_mtime_ns == stamp
    assert "already prepared" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="other settings"):
        prepare_data(**{**args, "seed": 1})
    (tmp_path / "train-notes.bin").write_bytes(b"a user's file")  # not ours: overwrite keeps it
    second = prepare_data(**{**args, "seed": 1, "shard_tokens": 10**9, "overwrite": True})
    assert (tmp_path / "train-notes.bin").read_bytes() == b"a user's file"
    assert second["documents"] == first["documents"] and len(second["shards"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".bin", ".idx")) == [
        "train-00000.bin", "train-00000.idx", "train-notes.bin", "validation-00000.bin", "validation-00000.idx"]


def test_resume_refuses_changed_inputs(docs, tok_path, tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "docs.jsonl", docs)
    args = dict(data=[str(corpus)], tokenizer=tok_path, out_dir=str(tmp_path / "out"), shard_tokens=SHARD, workers=1)
    original = ShardWriter.finish

    def interrupt(self):
        original(self)
        raise Interrupted

    monkeypatch.setattr(ShardWriter, "finish", interrupt)
    with pytest.raises(Interrupted):
        prepare_data(**args)
    monkeypatch.undo()
    write_jsonl(corpus, docs[::-1])
    with pytest.raises(FileExistsError, match="unfinished run with other settings"):
        prepare_data(**args)
    assert prepare_data(**args, overwrite=True)["documents"] == len(docs)


@pytest.mark.parametrize("existing", [False, True])
def test_bad_input_leaves_nothing_behind(docs, tok_path, tmp_path, existing):
    good = write_jsonl(tmp_path / "a.jsonl", docs[:50])
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine"}\n{"txt": "oops"}\n')
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    with pytest.raises(DataError, match=r"b\.jsonl:3: no field 'text'"):
        prepare_data([str(good), str(bad)], tokenizer=tok_path, out_dir=str(out), shard_tokens=10**6, workers=2)
    assert (list(out.iterdir()) == []) if existing else not out.exists()


def test_dtype_follows_vocabulary_size():
    assert token_dtype(32000) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32


def test_split_is_by_content_and_seed():
    keys = [f"document {i}".encode() for i in range(2000)]
    a = [is_validation(k, 0, 0.1) for k in keys]
    assert 150 < sum(a) < 250
    assert a == [is_validation(k, 0, 0.1) for k in keys]  # deterministic
    assert a != [is_validation(k, 1, 0.1) for k in keys]  # the seed matters
    assert not any(is_validation(k, 0, 0.0) for k in keys) and all(is_validation(k, 0, 1.0) for k in keys)


def test_token_documents_with_loss_masks(tok, tok_path, tmp_path):
    dialogues = [[{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}"}]
                 for i in range(40)]
    encoded = [encode_chat(tok, d) for d in dialogues]
    documents = [(e.ids, e.loss_mask) for e in encoded[:20]] + [(tok.encode("plain", eos=True), None)]
    documents += [(e.ids, e.loss_mask) for e in encoded[20:]]
    m = write_token_documents(documents, tmp_path, tok_path, shard_tokens=400)
    got = read_split(tmp_path, m, "train")
    assert [ids for ids, _ in got] == [list(ids) for ids, _ in documents]
    assert all("mask" in e for e in m["splits"]["train"]["shards"])
    masks = [mask if mask is not None else [1] * len(ids) for ids, mask in documents]
    assert [mask for _, mask in got] == [[int(x) for x in mask] for mask in masks]
    assert m["settings"]["tokenizer_sha256"] == tok.sha256
    with pytest.raises(DataError, match="document 1 has ids outside"):
        write_token_documents([([1, 2], None), ([1, 600], None)], tmp_path / "bad", tok_path)
    with pytest.raises(ValueError, match="loss mask has 1 entries for 2 tokens"):
        write_token_documents([([1, 2], [1])], tmp_path / "bad2", tok_path)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()


def test_cli(corpus, tok_path, tmp_path):
    main(["data", "prepare", "--data", str(corpus), "--tokenizer", tok_path, "--out_dir", str(tmp_path),
          "--workers", "1", "--val_fraction", "0"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["splits"]["validation"]["documents"] == 0 and manifest["documents"] == 300
