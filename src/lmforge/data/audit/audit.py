"""`lmforge data audit`: what a pre-training corpus says about people, how toxic it is, and in which languages.

    lmforge data audit --data runs/world/corpus --out_dir runs/audit          # any input `data prepare` reads
    lmforge data audit --data runs/data --split train                         # token shards, decoded
    lmforge data audit --data corpus.jsonl --toxicity_scorer my_toxicity:score  # a real classifier

The analysis of Llama 2's pre-training data (its section 4.1), for any corpus:

    pronouns    documents with the pronouns of each family (she, he, they) and their counts    terms.py
    identity    mentions of identity terms on five axes (religion, gender and sex, nationality,   terms.py
                race and ethnicity, sexual orientation) and the documents that make them
    toxicity    the distribution of a score per document: a plain word-list scorer, or the       toxicity.py
                user's classifier
    languages   the language of each document (langid.py, "unknown" below probability 0.5)        language.py

Pipeline (P = `workers` processes; data/pool.py): the main process reads documents in order (text sources as
`data prepare` reads them, or token shards as id arrays) and cuts them into batches of about 256 KiB; each
worker decodes shards with their tokenizer, splits words, matches terms, scores and identifies each document,
and returns its batch's `Tally` (sums only, tally.py); the main process adds them in batch order. The batches
do not depend on P, so the report is the same for any number of workers.

The output folder follows lmforge's output rule (lmforge.io.output_dir): report.json (every figure, plus the
inputs and settings), report.md (the tables, also printed) and the plots of report.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmforge.data.audit.language import LanguageIdentifier
from lmforge.data.audit.report import format_report, write_plots
from lmforge.data.audit.tally import Tally
from lmforge.data.audit.terms import TermList, load_terms, match_terms, words
from lmforge.data.audit.toxicity import LexiconScorer, Scorer, ToxicityScorerError, checked_score, load_scorer
from lmforge.data.pool import batches, ordered_map
from lmforge.data.shards import MANIFEST, SPLITS, read_manifest
from lmforge.data.sources import DataError, iter_documents, resolve_sources

Split = Literal["train", "validation", "all"]


@dataclass
class AuditSetup:
    """What every worker needs: the term list, the scorer, the language identifier, the shards' tokenizers."""

    terms: TermList
    scorer: Scorer
    toxicity_threshold: float
    identify: LanguageIdentifier
    tokenizers: list[str]  # tokenizer.model paths; a shard document carries the index of its own


def audit_data(
    data: list[str] | str | None = None,
    out_dir: str = "runs/audit",
    text_field: str = "text",
    split: Split = "all",
    tokenizer: str | None = None,
    terms: str | None = None,
    toxicity_scorer: str | None = None,
    toxicity_words: str | None = None,
    toxicity_threshold: float = 0.5,
    language_threshold: float = 0.5,
    language_chars: int = 2000,
    workers: int | None = None,
    plots: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Audit a pre-training corpus: pronouns, identity terms, toxicity and languages (Llama 2, section 4.1).

    Writes OUT_DIR/report.json, report.md (printed too) and plots (pronouns, identity, toxicity, languages).
    Identity terms and pronouns come from a documented list shipped with lmforge (terms.yaml in
    lmforge/data/audit); toxicity from a placeholder word list (hits per word) unless a classifier is given.

    Args:
        data: a path or a list of paths, as for `data prepare` (text files, .jsonl, .parquet, folders, Hugging
            Face datasets saved with save_to_disk), or token shard folders written by `data prepare` (decoded
            with the tokenizer their manifest records). None: the embedded corpus.
        out_dir: output folder for the report and plots.
        text_field: the jsonl field, parquet column or dataset column holding the text.
        split: for token shards, the split to audit: train, validation or all.
        tokenizer: for token shards, the tokenizer.model that made them (default: the one their manifest
            records); it is checked against the manifest's sha256.
        terms: a term list in the format of the shipped terms.yaml (sections pronouns and identity).
        toxicity_scorer: "module:name" of a callable text -> score in [0, 1] (a real classifier), imported
            here and called in every worker process (so a model it loads on first use loads once per worker).
        toxicity_words: a word list (one word per line) for the lexicon scorer instead of the shipped placeholder.
        toxicity_threshold: report the share of documents scoring at least this (Llama 2: 0.5).
        language_threshold: below this probability a document's language is "unknown" (Llama 2: 0.5).
        language_chars: identify the language from the first this many characters of each document.
        workers: worker processes (default: all cores; 1 works in this process).
        plots: write the plots (PNG, matplotlib); false: only report.json and report.md.
        progress: show a progress bar.
        overwrite: replace an earlier `data audit` output in OUT_DIR.

    Returns:
        The report (also OUT_DIR/report.json).
    """
    from tqdm import tqdm

    from lmforge.io import output_dir

    if not 0.0 <= toxicity_threshold <= 1.0:
        raise ValueError(f"toxicity_threshold must be in [0, 1], got {toxicity_threshold}")
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data or [])
    scorer, scorer_description = load_scorer(toxicity_scorer, toxicity_words)
    identify = LanguageIdentifier(language_threshold, language_chars)
    setup = AuditSetup(load_terms(terms), scorer, toxicity_threshold, identify, tokenizers=[])
    items = _documents(paths, text_field, SPLITS if split == "all" else (split,), tokenizer, setup.tokenizers)
    start = time.perf_counter()
    with output_dir(out_dir, "data audit", overwrite) as tmp:  # refuses a wrong destination before any work
        identify.load()  # in this process, before the pool forks: the workers share the loaded model
        tally = Tally()
        shown = tqdm(items, desc="auditing", unit=" docs", mininterval=1.0, disable=None if progress else True)
        for part in ordered_map(_audit_batch, batches(shown, size=_size), workers, _init_worker, (setup,)):
            tally.merge(part)
        if tally.documents == 0:
            raise DataError(f"no documents to audit in {', '.join(map(str, paths)) or 'the embedded corpus'}")
        report = {"inputs": [str(p) for p in paths] or ["embedded"],
                  "settings": {"terms": setup.terms.path, "toxicity_scorer": scorer_description,
                               "language_identifier": identify.describe(), "split": split},
                  **tally.report(setup.terms, toxicity_threshold)}
        (tmp / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        table = format_report(report)
        (tmp / "report.md").write_text(table, encoding="utf-8")
        if plots:
            write_plots(report, tmp)
    print(table)
    seconds = time.perf_counter() - start
    print(f"audited {tally.documents} documents ({tally.characters / 1e6:.2f} M characters) in {seconds:.1f} s "
          f"with {workers} workers -> {out_dir}", file=sys.stderr)
    return report


def _documents(paths: list, text_field: str, splits: tuple[str, ...], tokenizer: str | None,
               tokenizers: list[str]) -> Iterator[tuple[str, Any]]:
    """(where, text) for each document of text sources, (where, (tokenizer index, ids)) for token shards, in
    input order. Fills `tokenizers` with the shards' tokenizer paths (checked) before the first document."""
    groups: list[tuple[str, Any]] = []  # ("shards", folder) or ("sources", [Source])
    for p in paths:
        if Path(p).is_dir() and (Path(p) / MANIFEST).exists():
            tokenizers.append(_shard_tokenizer(Path(p), tokenizer))
            groups.append(("shards", Path(p)))
        else:
            groups.append(("sources", resolve_sources([p])))
    if not paths:
        groups.append(("sources", resolve_sources(None)))
    return _iterate(groups, text_field, splits)


def _iterate(groups: list, text_field: str, splits: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    shard_index = 0
    for kind, value in groups:
        if kind == "sources":
            for doc in iter_documents(value, text_field):
                yield (f"{doc.source} {doc.where}" if doc.where else doc.source), doc.text
            continue
        from lmforge.data.loader import TokenStream  # imports torch: only for shards

        for split in splits:
            stream, begin = TokenStream(value, split), 0
            for i, end in enumerate(stream.doc_ends.tolist()):
                yield f"{value} {split} document {i}", (shard_index, stream.read(begin, end)[0])
                begin = end
        shard_index += 1


def _size(item: tuple[str, Any]) -> int:
    """About how many characters a document holds (a token of a shard: about 4), for batching."""
    payload = item[1]
    return len(payload) if isinstance(payload, str) else 4 * len(payload[1])


def _shard_tokenizer(folder: Path, tokenizer: str | None) -> str:
    """The tokenizer that made the shards in `folder`: `tokenizer` or the manifest's, checked by sha256."""
    from lmforge.tokenizer.tokenizer import Tokenizer

    manifest = read_manifest(folder)
    path = tokenizer or manifest.get("tokenizer")
    if tokenizer is None and (not path or not Path(path).exists()):
        raise DataError(f"{folder} was tokenized with {path or 'a tokenizer its manifest does not name'}, which is "
                        "not there: pass --tokenizer (the same tokenizer.model; its sha256 is checked)")
    tok = Tokenizer(path)
    want = manifest["settings"]["tokenizer_sha256"]
    if tok.sha256 != want:
        raise DataError(f"{tok.path} (sha256 {tok.sha256[:12]}...) is not the tokenizer that made {folder} "
                        f"(sha256 {want[:12]}...)")
    return str(tok.path)


# --- the worker side ------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(setup: AuditSetup) -> None:
    from lmforge.tokenizer.tokenizer import Tokenizer

    _WORKER.update(setup=setup, tokenizers=[Tokenizer(p) for p in setup.tokenizers])


def _audit_batch(batch: list[tuple[str, Any]]) -> Tally:
    """The tally of one batch of (where, text or (tokenizer index, ids)) documents."""
    setup: AuditSetup = _WORKER["setup"]
    tally = Tally()
    for where, payload in batch:
        text = payload if isinstance(payload, str) else _WORKER["tokenizers"][payload[0]].decode(payload[1].tolist())
        found = words(text)
        if isinstance(setup.scorer, LexiconScorer):
            score = setup.scorer.score_words(found)  # the words are split already
        else:
            try:
                score = setup.scorer(text)
            except Exception as e:  # a user's classifier: say where it failed, in one line
                raise ToxicityScorerError(f"{where}: the toxicity scorer failed: {type(e).__name__}: {e}") from None
        tally.add(len(text), len(found), match_terms(found, setup.terms), checked_score(score, where),
                  setup.toxicity_threshold, setup.identify(text))
    return tally
