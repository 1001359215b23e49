"""Corpus sources: every input kind, deterministic order, clear errors, and the embedded default corpus."""

import json

import pytest

from lmforge.data import embedded
from lmforge.data.sources import DataError, Source, iter_documents, resolve_sources


def test_folders_are_walked_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    files = {"z.txt": "z", "a.md": "a", "b/deep/c.txt": "c", "b/x.jsonl": '{"text": "x1"}\n{"text": "x2"}\n',
             "notes.csv": "not read", ".hidden.txt": "hidden", ".git/config.txt": "hidden"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    sources = resolve_sources([str(tmp_path)])
    assert [(s.kind, s.path) for s in sources] == [
        ("text", str(tmp_path / "a.md")), ("text", str(tmp_path / "b/deep/c.txt")),
        ("jsonl", str(tmp_path / "b/x.jsonl")), ("text", str(tmp_path / "z.txt"))]
    docs = list(iter_documents(sources))
    assert [d.text for d in docs] == ["a", "c", "x1", "x2", "z"]
    assert [d.where for d in docs] == ["", "", "line 1", "line 2", ""]
    assert resolve_sources(str(tmp_path / "notes.csv")) == [Source("text", str(tmp_path / "notes.csv"))]  # named: read


def test_no_data_means_embedded():
    assert resolve_sources(None) == resolve_sources([]) == [Source("embedded", "embedded")]


def test_byte_order_mark_is_dropped(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffhello".encode())
    (tmp_path / "bom.jsonl").write_bytes('\ufeff{"text": "hi"}\n'.encode())
    assert [d.text for d in iter_documents(resolve_sources([str(tmp_path)]))] == ["hi", "hello"]


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"folder .*empty holds no \*.txt"):
        resolve_sources([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="no such file or folder"):
        resolve_sources([str(tmp_path / "missing.jsonl")])


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["one", None, "", "three"], "n": [1, 2, 3, 4]}), tmp_path / "d.parquet")
    docs = list(iter_documents(resolve_sources([str(tmp_path / "d.parquet")]), text_field="body"))
    assert [(d.text, d.where) for d in docs] == [("one", "row 0"), ("three", "row 3")]
    with pytest.raises(DataError, match=r"d\.parquet: no column 'text' \(columns: body, n\)"):
        list(iter_documents(resolve_sources([str(tmp_path / "d.parquet")])))
    with pytest.raises(DataError, match=r"column 'n' has type int64, expected string"):
        list(iter_documents(resolve_sources([str(tmp_path / "d.parquet")]), text_field="n"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable parquet file"):
        list(iter_documents(resolve_sources([str(tmp_path / "bad.parquet")])))


def test_saved_hugging_face_dataset_needs_datasets(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text(json.dumps({}))
    sources = resolve_sources([str(tmp_path / "ds")])
    assert sources == [Source("hf_dataset", str(tmp_path / "ds"))]
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="needs the `datasets` package: pip install datasets"):
            list(iter_documents(sources))


# --- the embedded corpus ----------------------------------------------------------------------------------

FAKE_STDLIB = {
    "antigravity.py": '"""Opens a browser when imported."""\nraise SystemExit("imported, not parsed!")\n',
    "this.py": 's = "Gur Mra"\nprint(s)\n',  # no docstring at all
    "py2.py": '"""Python 2."""\nprint "hello"\n',  # does not parse: skipped
    "pkg/__init__.py": '"""Package doc."""\n',
    "pkg/__main__.py": '"""Main doc."""\nimport sys\nsys.exit(3)\n',
    "pkg/mod.py": ('"""Module doc."""\nclass A:\n    """Class doc."""\n    def f(self):\n        """Method doc."""\n'
                   'if True:\n    def g():\n        """Nested in if."""\n'
                   'try:\n    pass\nexcept ImportError:\n    def h():\n        """In handler."""\n'
                   'async def k():\n    """Async doc."""\n'),
    "test/test_x.py": '"""Test suites are skipped."""\n',
    "site-packages/third.py": '"""Not the stdlib."""\n',
}


@pytest.fixture
def fake_stdlib(tmp_path):
    root = tmp_path / "stdlib"
    for name, text in FAKE_STDLIB.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_stdlib_docstrings_are_parsed_never_imported(fake_stdlib):
    docs = embedded.stdlib_docstrings(fake_stdlib)
    assert docs == [
        ("antigravity.py", "Opens a browser when imported."),
        ("pkg/__init__.py", "Package doc."),
        ("pkg/__main__.py", "Main doc."),
        ("pkg/mod.py", "Module doc.\n\nClass doc.\n\nMethod doc.\n\nNested in if.\n\nIn handler.\n\nAsync doc."),
    ]


def test_stdlib_docstrings_are_cached(fake_stdlib, tmp_path, monkeypatch):
    first = embedded.cached_stdlib_docstrings(tmp_path / "cache", fake_stdlib)
    assert len(list((tmp_path / "cache").glob("stdlib-docstrings-*.json"))) == 1

    def no_parse(root):
        raise AssertionError("parsed again although the cache is valid")

    monkeypatch.setattr(embedded, "stdlib_docstrings", no_parse)
    assert embedded.cached_stdlib_docstrings(tmp_path / "cache", fake_stdlib) == first
    monkeypatch.undo()
    (fake_stdlib / "pkg" / "new.py").write_text('"""A new module."""\n')  # the stdlib changed: parse again
    assert embedded.cached_stdlib_docstrings(tmp_path / "cache", fake_stdlib)[-1] == ("pkg/new.py", "A new module.")


def test_pydoc_topics_are_sorted_english_text():
    topics = embedded.pydoc_topics()
    names = [name for name, _ in topics]
    assert names == sorted(names) and len(names) > 50 and "if" in names
    assert sum(len(text) for _, text in topics) > 100_000


def test_embedded_documents_in_order(fake_stdlib, tmp_path):
    docs = list(embedded.embedded_corpus(tmp_path / "cache", fake_stdlib))
    topics = [d for d in docs if d[0] == embedded.TOPICS]
    assert docs[: len(topics)] == topics and [d[1] for d in docs[len(topics):]][0] == "antigravity.py"


@pytest.mark.slow
def test_real_embedded_corpus_prepares(tok_path, tmp_path, monkeypatch):
    """The default corpus of this Python: parsed (cold cache, ~8 s on 2 cores), then tokenized into shards."""
    from lmforge.data.prepare import prepare_data

    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    docs = list(iter_documents(resolve_sources(None)))
    stdlib = [d.where for d in docs if d.source == embedded.STDLIB]
    assert stdlib == sorted(stdlib, key=lambda name: name.split("/")) and "ast.py" in stdlib
    assert not any(name.startswith(("test/", "idlelib/idle_test/")) for name in stdlib)
    assert sum(len(d.text.encode()) for d in docs) > 1_500_000
    m = prepare_data(None, tokenizer=tok_path, out_dir=str(tmp_path / "out"), workers=2)
    assert [s["path"] for s in m["sources"]] == [embedded.TOPICS, embedded.STDLIB]
    assert m["documents"] == len(docs) and m["bytes"] == sum(len(d.text.encode()) for d in docs)
