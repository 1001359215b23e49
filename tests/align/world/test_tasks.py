"""Task families: every checker accepts its reference answers (in any surface form) and rejects mutated ones; the
partial credit is 1 exactly when the checker passes and grows as an answer gets closer."""

import doctest
import random

import pytest

from lmforge.align.world import common, creative, facts, instructions, oracle, safety, tasks
from lmforge.align.world.common import LIST_WORDS, split_of, stream
from lmforge.align.world.records import World
from lmforge.align.world.tasks import DIFFICULTIES, FAMILY_NAMES, check_task, credit_task


@pytest.fixture(scope="module")
def world():
    return World(0)


def _tasks(world, family, n=40):
    return [t for d in DIFFICULTIES for t in world.tasks(family, d, "train", n, stream(0, f"test|{family}|{d}"))]


@pytest.mark.parametrize("module", [common, tasks, facts, safety, instructions, oracle, creative])
def test_docstring_examples_hold(module):
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert attempted > 0 or module is creative
    assert failed == 0


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_references_pass_in_any_surface_form(world, family):
    for t in _tasks(world, family):
        ref = t.reference
        for answer in (ref, ref.upper(), ref.lower(), ref.rstrip("."), f"The answer is {ref}", f"Sure! {ref}"):
            assert check_task(t.meta, answer), (t.prompt, answer)
        assert credit_task(t.meta, ref) == 1.0


def test_arithmetic_reads_the_last_integer(world):
    for t in _tasks(world, "arithmetic"):
        m = t.meta
        a, op, b, c = m["a"], m["op"], m["b"], m["target"]
        assert c == (a + b if op == "+" else a - b) and c >= 0
        assert check_task(m, f"{a} {op} {b} is {c}")  # restating the question is fine
        assert not check_task(m, f"{a} {op} {b} = {c + 1}.")  # a wrong result is not
        assert not check_task(m, f"{c} is wrong, it is {c + 2}")
        assert not check_task(m, "I do not know.")


def test_arithmetic_difficulty_is_operand_size_and_carry(world):
    """2-digit +/- 1, then +/- 1 digit, then +/- 2 digits; a carry or borrow in the units exactly at difficulty 3."""
    digits = {1: (2, 1), 2: (2, 1), 3: (2, 2)}
    for d in DIFFICULTIES:
        tasks = world.tasks("arithmetic", d, "train", 60, stream(0, f"digits|{d}"))
        for t in tasks:
            a, op, b = t.meta["a"], t.meta["op"], t.meta["b"]
            assert (len(str(a)), len(str(b))) == digits[d], t.prompt
            carry = a % 10 + b % 10 > 9 if op == "+" else a % 10 < b % 10
            assert carry == (d == 3) and 0 <= t.meta["target"] < 100 and (b == 1) == (d == 1), t.prompt
        assert 0.3 < sum(t.meta["op"] == "+" for t in tasks) / len(tasks) < 0.7  # sums and differences alike


def test_lists_reject_swaps_and_extra_words(world):
    for t in _tasks(world, "lists"):
        m, target = t.meta, t.meta["target"]
        expected = {"last": m["words"][-1:], "reverse": list(reversed(m["words"])), "sort": sorted(m["words"])}
        assert target == expected[m["transform"]]
        assert m["transform"] == {1: "last", 2: "reverse", 3: "sort"}[m["difficulty"]]
        if len(target) > 1:
            swapped = [target[1], target[0], *target[2:]]
            assert not check_task(m, ", ".join(swapped))
            assert credit_task(m, ", ".join(swapped)) < 1.0
        assert not check_task(m, ", ".join(target + [target[0]]))
        wrong = next(w for w in LIST_WORDS if w not in target)
        assert not check_task(m, ", ".join(target[:-1] + [wrong]))
        assert check_task(m, f"The answer for {', '.join(m['words'])} is {', '.join(target)}.")


def test_list_credit_grows_with_positions_in_place():
    m = {"family": "lists", "words": ["owl", "cup"], "target": ["fox", "cup", "red", "owl", "hat"]}
    wrongs = ["bell", "drum", "ring", "kite", "jar"]
    credits = []
    for right in range(6):
        answer = m["target"][:right] + wrongs[right:]
        credits.append(credit_task(m, ", ".join(answer)))
    assert credits == sorted(credits) and len(set(credits)) == 6 and credits[-1] == 1.0 and credits[0] == 0.0
    assert credit_task(m, "fox, cup, red, owl") == pytest.approx(0.8 * 4 / 5)


def test_number_credit_falls_with_distance():
    m = {"family": "arithmetic", "target": 50}
    credits = [credit_task(m, str(50 + k)) for k in range(0, 60, 5)]
    assert credits[0] == 1.0 and all(a > b for a, b in zip(credits[1:], credits[2:]))
    assert max(credits[1:]) <= 0.5 and credit_task(m, "no number") == 0.0
    assert credit_task(m, "49") == credit_task(m, "51")


def test_counting_counts(world):
    for t in _tasks(world, "counting"):
        m = t.meta
        expected = len(m["words"]) if m["count"] == "words" else m["words"].count(m["word"])
        assert m["target"] == expected >= 1
        assert not check_task(m, f"There are {expected + 1} words.")
        assert check_task(m, f"{common.NUMBER_WORDS[expected]}.")


def test_facts_reject_other_values_of_the_type(world):
    for t in _tasks(world, "facts"):
        m = t.meta
        if m["type"] == "number":
            other = m["target"] + 2
        else:
            other = next(v for v in m["values"] if v != m["target"])
        wrong = m["reference"].replace(str(m["target"]), str(other))
        assert not check_task(m, wrong), (t.prompt, wrong)
        assert credit_task(m, wrong) == 0.3
        assert check_task(m, f"Not {other}, but {m['target']}.")
        assert not check_task(m, f"{m['target']}? No, {other}.")
        assert credit_task(m, "I have no idea.") == 0.0


def test_fact_table_is_graded_and_split_by_hash(world):
    table = world.table
    assert len(table.facts) == 9 * world.sizes.entities
    by_frequency = [len(table.by_frequency(f)) for f in (1, 2, 3)]
    assert all(n > 0.2 * len(table.facts) for n in by_frequency)
    taken = set(LIST_WORDS) | set(common.NUMBER_WORDS) | set(facts.PROFESSIONS)
    names = {f.entity for f in table.facts}
    assert len(names) == 3 * world.sizes.entities  # countries, creatures and people, no name twice
    assert all(len(common.words(str(f.value))) == 1 for f in table.facts)  # every value is one word
    assert not any(set(common.words(name)) & taken for name in names)
    heldout = [f for f in table.facts if split_of(0, f.key, 0.25) == "heldout"]
    assert 0.15 * len(table.facts) < len(heldout) < 0.35 * len(table.facts)
    assert facts.FactTable(0, world.sizes.entities).facts == table.facts  # deterministic
    assert facts.FactTable(1, world.sizes.entities).facts != table.facts


def test_split_is_a_property_of_the_item():
    keys = [f"arithmetic|{a}+{b}" for a in range(30) for b in range(30)]
    splits = [split_of(0, k, 0.25) for k in keys]
    assert splits == [split_of(0, k, 0.25) for k in keys]
    assert 0.2 < splits.count("heldout") / len(keys) < 0.3
    assert splits != [split_of(1, k, 0.25) for k in keys]
    for t in World(0).tasks("arithmetic", 3, "heldout", 30, random.Random(0)):
        assert split_of(0, t.meta["item"], 0.25) == "heldout"


def test_fact_cards_hold_the_answer_and_grow_with_difficulty(world):
    """Difficulty 1: the asked fact in the answer's words; 2: the entity's three; 3: six facts of two entities
    of one kind, re-phrased, so that the card names the asked value and, at 3, another entity of its kind."""
    for d in DIFFICULTIES:
        for t in world.tasks("facts", d, "train", 30, stream(0, f"cards|{d}")):
            m = t.meta
            card = t.prompt.rsplit("\n", 1)[0]
            assert str(m["target"]) in card and m["entity"] in card, t.prompt
            mine = world.table.of_entity(m["entity"])
            assert len(mine) == 3 and {f.attribute for f in mine} == {a for a, v in facts.ATTRIBUTES.items()
                                                                       if v[0] == facts.ATTRIBUTES[m["attribute"]][0]}
            if d == 1:
                assert card.endswith(m["reference"]), t.prompt
            elif d == 2:
                assert all(facts.ATTRIBUTES[f.attribute][4].format(e=f.entity, v=f.value) in card for f in mine)
            else:
                others = [e for e in world.table.entities[facts.ATTRIBUTES[m["attribute"]][0]]
                          if e != m["entity"] and e in card]
                assert others and card.count(". ") + 1 >= 6, t.prompt
