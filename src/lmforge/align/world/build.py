"""`lmforge world build`: write the world of one seed as files.

    OUT/
      corpus/world-v2-000.txt ...     pre-training text (corpus.py): `lmforge data prepare --data OUT/corpus`
      sft.jsonl                       SFT demonstrations (records.py), meta.source names each one's purpose
      eval_tasks.jsonl                held-out prompts per family and difficulty; *_train.jsonl: a train-split
      eval_unsafe.jsonl                 sample of the same size, for the train / held-out gap
      eval_lookalikes.jsonl
      eval_instructions.jsonl         single-turn instruction prompts
      eval_multiturn.jsonl            multi-turn instruction dialogues, answered turn by turn (rollout)
      eval_factual.jsonl              fact look-ups and open creative prompts (diversity against temperature)
      eval_creative.jsonl
      rlhf_prompts.jsonl              train-split prompts for preference collection and RL, mixed
      facts.json                      the fact table
      manifest.json                   world version, seed, sizes, and per file its sha256, bytes and counts

Every jsonl record and every JSON file carries "world": VERSION, e.g. "v2" (the corpus files carry it in their names).
The same seed and sizes give byte-identical files; the folder is written through lmforge's output rule
(lmforge.io.output_dir), so a failed build leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from lmforge.align.world.common import SPLITS, VERSION
from lmforge.align.world.corpus import corpus_files
from lmforge.align.world.records import World, WorldSizes


def _jsonl(records: list[dict], name: str) -> bytes:
    lines = [json.dumps({"id": f"{name}-{i:05d}", **r}, ensure_ascii=False) for i, r in enumerate(records)]
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _counts(records: list[dict]) -> dict:
    """Records per kind (and per SFT source, task family / difficulty, risk category) of one file."""
    metas = [r["meta"] for r in records]
    out: dict = {"records": len(records), "kinds": dict(sorted(Counter(m["kind"] for m in metas).items()))}
    if any("source" in m for m in metas):
        out["sources"] = dict(sorted(Counter(m["source"] for m in metas).items()))
    tasks = Counter(f"{m['family']}/{m['difficulty']}" for m in metas if m["kind"] == "task")
    if tasks:
        out["tasks"] = dict(sorted(tasks.items()))
    categories = Counter(f"{m['category']}/{m.get('style', m.get('intent'))}" for m in metas if "category" in m)
    if categories:
        out["categories"] = dict(sorted(categories.items()))
    return out


def build_world(out_dir: Path = Path("runs/world"), seed: int = 0, sizes: WorldSizes = WorldSizes(),
                overwrite: bool = False) -> dict:
    """Write the verifiable chat world (common.VERSION) of one seed as files (`lmforge world build`).

    Its pre-training corpus, SFT demonstrations, evaluation and RLHF prompt sets, fact table and manifest.

    Args:
        out_dir: Output folder (written whole, or not at all; an earlier build is replaced only with --overwrite).
        seed: Seed of everything in the world: names, facts, the train / held-out split, every record.
        sizes: How much to write (--sizes.eval_tasks 50, --sizes.entities 40, ...); `--help` lists them all.
        overwrite: Replace an earlier `lmforge world build` output in out_dir.

    Returns:
        The manifest (also OUT/manifest.json).
    """
    from lmforge.io import output_dir

    out_dir = Path(out_dir)
    with output_dir(out_dir, "world build", overwrite) as tmp:  # refuses a wrong destination before any work
        world = World(seed, sizes)
        payloads: dict[str, bytes] = {f"corpus/{name}": text.encode() for name, text in corpus_files(world)}
        counts: dict[str, dict] = {}
        sets = {"sft": world.sft()}
        for split in reversed(SPLITS):
            sets.update(world.eval_sets(split))
        sets["rlhf_prompts"] = world.rlhf_prompts()
        for name, records in sets.items():
            payloads[f"{name}.jsonl"] = _jsonl(records, name)
            counts[f"{name}.jsonl"] = _counts(records)
        table = {"world": VERSION, "seed": seed,
                 "facts": [{"entity": f.entity, "attribute": f.attribute, "type": f.type, "value": f.value,
                            "frequency": f.frequency} for f in world.table.facts]}
        payloads["facts.json"] = (json.dumps(table, ensure_ascii=False, indent=1) + "\n").encode()
        files = {path: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), **counts.get(path, {})}
                 for path, data in sorted(payloads.items())}
        manifest = {"world": VERSION, "seed": seed, "sizes": asdict(sizes), "files": files}
        for path, data in payloads.items():
            (tmp / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp / path).write_bytes(data)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    corpus_bytes = sum(f["bytes"] for p, f in files.items() if p.startswith("corpus/"))
    print(f"world {VERSION} (seed {seed}) -> {out_dir}: corpus {corpus_bytes / 1e6:.2f} MB in {sizes.corpus_files} "
          f"files; " + ", ".join(f"{p} {c['records']}" for p, c in counts.items()))
    return manifest
