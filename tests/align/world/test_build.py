"""`lmforge world build`: deterministic files, versioned records, train and held-out disjoint by construction,
the SFT set shaped as the later stages need, and the output rule."""

import hashlib
import json
import re
from collections import Counter

import pytest
import yaml
from helpers import WORLD_SMALL as SMALL

from lmforge.align.world import safety
from lmforge.align.world.build import build_world
from lmforge.align.world.common import VERSION
from lmforge.align.world.facts import ATTRIBUTES
from lmforge.align.world.records import REFUSAL_CATEGORIES, REFUSAL_STYLES, WorldSizes
from lmforge.align.world.tasks import list_key
from lmforge.cli import main
from lmforge.io import OutputExistsError
from lmforge.tokenizer.chat import exchanges

HELDOUT = ("eval_tasks", "eval_unsafe", "eval_lookalikes", "eval_instructions", "eval_multiturn", "eval_factual",
           "eval_creative")
TRAIN = ("sft", "rlhf_prompts", "eval_tasks_train", "eval_unsafe_train", "eval_lookalikes_train",
         "eval_instructions_train", "eval_multiturn_train")


# the corpus sentences that name word lists (tasks.py, `statement`), each list as a group
LIST_SENTENCES = (r"The last word of ([a-z, ]+?) is", r"The list ([a-z, ]+?) reversed is", r"reversed is ([a-z, ]+?)\.",
                  r"The list ([a-z, ]+?) sorted is", r"sorted is ([a-z, ]+?)\.",
                  r"The list ([a-z, ]+?) has \d+ words", r"In the list ([a-z, ]+?), the word")


_CACHE: dict = {}


def _read(folder, name):
    """The records of folder/name.jsonl (read once per session: the default world's files are large)."""
    key = (str(folder), name)
    if key not in _CACHE:
        _CACHE[key] = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
    return _CACHE[key]


def _corpus(folder):
    if (str(folder), "corpus") not in _CACHE:
        _CACHE[str(folder), "corpus"] = "\n".join(p.read_text() for p in sorted((folder / "corpus").glob("*.txt")))
    return _CACHE[str(folder), "corpus"]


def _digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lmforge-output"}


def _items(record):
    meta = record["meta"]
    return [meta["item"]] if "item" in meta else [t["item"] for t in meta["turns"]]


def test_same_seed_same_bytes_other_seed_other_files(tmp_path, small_sizes):
    build_world(tmp_path / "a", seed=5, sizes=small_sizes)
    build_world(tmp_path / "b", seed=5, sizes=small_sizes)
    build_world(tmp_path / "c", seed=6, sizes=small_sizes)
    a, b, c = (_digests(tmp_path / x) for x in "abc")
    assert a == b and len(a) == 14 + 2 + small_sizes.corpus_files  # jsonl, facts, manifest, corpus
    assert a.keys() == c.keys()
    differ = [p for p in a if a[p] != c[p]]
    assert sorted(differ) == sorted(p for p in a), "every file depends on the seed"
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    listed = {p: f["sha256"] for p, f in manifest["files"].items()}
    assert listed == {p: d for p, d in a.items() if p != "manifest.json"}
    assert manifest["world"] == VERSION and manifest["seed"] == 5 and manifest["sizes"] == SMALL | {
        k: v for k, v in WorldSizes().__dict__.items() if k not in SMALL}


def test_every_record_and_file_is_versioned(world_dir):
    manifest = json.loads((world_dir / "manifest.json").read_text())
    for path, entry in manifest["files"].items():
        if path.endswith(".jsonl"):
            records = _read(world_dir, path[: -len(".jsonl")])
            assert len(records) == entry["records"] > 0, path
            assert all(r["world"] == VERSION for r in records), path
            assert len({r["id"] for r in records}) == len(records)
        elif path.endswith(".json"):
            assert json.loads((world_dir / path).read_text())["world"] == VERSION
        else:
            assert path.startswith(f"corpus/world-{VERSION}-") and path.endswith(".txt")
    assert manifest["world"] == VERSION


def test_no_heldout_prompt_or_item_appears_in_train(world_dir):
    def users(names):
        return {m["content"] for n in names for r in _read(world_dir, n) for m in r["messages"] if m["role"] == "user"}

    def items(names):
        return {i for n in names for r in _read(world_dir, n) for i in _items(r)}

    held_users, train_users = users(HELDOUT), users(TRAIN)
    assert len(held_users) > 2000 and len(train_users) > 5000
    assert not held_users & train_users
    held_items, train_items = items(HELDOUT), items(TRAIN)
    assert not held_items & train_items
    for name, n in (("eval_tasks", 600), ("eval_unsafe", 500), ("eval_lookalikes", 500)):
        assert len(_read(world_dir, name)) >= n  # >= 500 held-out prompts per headline figure


def test_corpus_holds_no_heldout_computation(world_dir):
    corpus = _corpus(world_dir)
    corpus_lists = {list_key(found.split(", ")) for pattern in LIST_SENTENCES for found in re.findall(pattern, corpus)}
    assert len(corpus_lists) > 5000
    for r in _read(world_dir, "eval_tasks"):
        m = r["meta"]
        if m["family"] == "facts":
            continue
        if m["family"] == "arithmetic":
            word = "plus" if m["op"] == "+" else "minus"
            assert f"{m['a']} {m['op']} {m['b']} = {m['target']}." not in corpus
            assert f"{m['a']} {word} {m['b']} is {m['target']}." not in corpus
        else:  # lists and counting: no corpus sentence names a held-out list, or its reverse
            assert list_key(m["words"]) not in corpus_lists, m


def _statements(fact: dict) -> set[str]:
    """Every corpus sentence that states `fact` (a facts.json entry), as the corpus writes it."""
    sentences = {t.format(e=fact["entity"], v=fact["value"]) for t in ATTRIBUTES[fact["attribute"]][2]}
    return {x[0].upper() + x[1:] for x in sentences}


def test_every_fact_is_stated_as_often_as_its_frequency_class(world_dir):
    """Held-out facts included: it is the questions about them that are held out."""
    corpus = _corpus(world_dir)
    facts = json.loads((world_dir / "facts.json").read_text())["facts"]
    sizes = WorldSizes()
    expected = {1: sizes.mentions_frequent, 2: sizes.mentions_medium, 3: sizes.mentions_rare}
    counts = Counter(re.split(r"(?<=\.)\s+", corpus))
    for f in facts:
        found = sum(counts[x] for x in _statements(f))  # whole sentences: "By trade, X is a smith." holds another
        assert found == expected[f["frequency"]], f


def test_an_entitys_statements_share_one_paragraph(world_dir):
    """Its article (corpus.py): a name and a value stated twice in one context, as a card in a prompt states them."""
    paragraphs = [set(re.split(r"(?<=\.)\s+", p.strip())) for p in _corpus(world_dir).split("\n\n")]
    facts = json.loads((world_dir / "facts.json").read_text())["facts"]
    homes: dict[str, set[int]] = {}
    for f in facts:
        homes.setdefault(f["entity"], set()).update(i for i, p in enumerate(paragraphs) if p & _statements(f))
    assert all(len(h) == 1 for h in homes.values()) and len(set().union(*homes.values())) == len(homes)


def test_sft_set_has_the_shape_later_stages_need(world_dir):
    sft = _read(world_dir, "sft")
    sources = {}
    for r in sft:
        sources.setdefault(r["meta"]["source"], []).append(r)
        assert r["messages"][-1]["role"] == "assistant"
        exchanges(r["messages"])  # a valid Llama 2 dialogue
    assert set(sources) == {"tasks", "multiturn", "instructions", "refusals", "refusals_preprompt", "lookalikes",
                            "lookalikes_preprompt", "creative"}
    for r in sources["instructions"]:  # instructions only in single-turn dialogues, as system or user text
        turns = [m for m in r["messages"] if m["role"] != "system"]
        assert len(turns) == 2
        text = " ".join(s["text"] for s in r["meta"]["instructions"])
        assert r["messages"][0]["content"] == text or turns[0]["content"].endswith(" " + text)
    assert {r["meta"]["placement"] for r in sources["instructions"]} == {"system", "user"}
    for r in sources["multiturn"]:
        assert r["messages"][0]["role"] == "user" and 4 <= len(r["messages"]) <= 8
    plain = {(r["meta"]["category"], r["meta"]["style"]) for r in sources["refusals"]}
    assert plain == {(c, s) for c in REFUSAL_CATEGORIES for s in REFUSAL_STYLES}
    pre = sources["refusals_preprompt"]
    assert all(r["messages"][0] == {"role": "system", "content": safety.SAFETY_PREPROMPT} for r in pre)
    assert {r["meta"]["category"] for r in pre} == set(safety.CATEGORY_NAMES)
    assert {r["meta"]["style"] for r in pre} == set(safety.STYLES)
    assert all(safety.refused(r["messages"][-1]["content"]) for r in pre + sources["refusals"])
    assert not any(safety.refused(r["messages"][-1]["content"]) for r in sources["lookalikes"] + sources["tasks"])


def test_multiturn_prompts_are_rollouts(world_dir):
    for r in _read(world_dir, "eval_multiturn"):
        users = [m for m in r["messages"] if m["role"] == "user"]
        assert r["meta"]["rollout"] and len(users) == len(r["meta"]["turns"]) == WorldSizes().multiturn_turns
        assert r["messages"][0]["role"] == "system" and r["messages"][-1]["role"] == "user"


def test_output_rule_and_cli(tmp_path):
    cfg = tmp_path / "world.yaml"
    cfg.write_text(yaml.safe_dump({"seed": 2, "sizes": SMALL}))
    out = tmp_path / "w"
    main(["world", "build", "--config", str(cfg), "--out_dir", str(out)])
    before = _digests(out)
    with pytest.raises(OutputExistsError):
        build_world(out, seed=2, sizes=WorldSizes(**SMALL))
    main(["world", "build", "--config", str(cfg), "--out_dir", str(out), "--overwrite", "true"])
    assert _digests(out) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OutputExistsError):
        build_world(mine, seed=2, sizes=WorldSizes(**SMALL), overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"


def test_bad_size_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["world", "build", "--out_dir", str(tmp_path / "w"), "--sizes.heldout_fraction", "1.5"])
    assert exit.value.code == 2 and not (tmp_path / "w").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lmforge: error: sizes.heldout_fraction must lie in (0, 1), got 1.5")
