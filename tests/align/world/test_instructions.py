"""Instructions: an answer written by `apply` follows every instruction, a mutated one does not, and `strip`
gives the task checkers their answer back."""

import random

import pytest

from lmforge.align.world import instructions as ins
from lmforge.align.world.common import stream
from lmforge.align.world.records import INSTRUCTION_FAMILIES, World
from lmforge.align.world.tasks import check_task

COMBOS = [(k,) for k in ins.IDS] + list(ins.PAIRS)


@pytest.fixture(scope="module")
def tasks():
    return World(0).mixed_tasks("train", 60, stream(0, "instructions-test"), INSTRUCTION_FAMILIES)


def _specs(kinds, seed=0):
    rng = random.Random(seed)
    return [ins.make_spec(k, rng) for k in kinds]


@pytest.mark.parametrize("kinds", COMBOS, ids="+".join)
def test_applied_answers_adhere_and_strip_back(tasks, kinds):
    for seed, t in enumerate(tasks):
        specs = _specs(kinds, seed)
        answer = ins.apply(specs, t.reference)
        assert all(ins.adheres(s, answer) for s in specs), (specs, answer)
        assert check_task(t.meta, ins.strip(specs, answer)), (specs, answer)
        plain_ok = [ins.adheres(s, t.reference) for s in specs]
        assert not all(plain_ok), (specs, t.reference)  # the plain answer does not already follow them


def test_mutations_break_adherence():
    caps, = _specs(["capitals"])
    assert ins.adheres(caps, "3 + 4 = 7. YES") and not ins.adheres(caps, "3 + 4 = 7. YEs")
    assert not ins.adheres(caps, "3 + 4 = 7.")  # no letters: nothing shows capitals
    first = {"id": "first_word", "word": "Behold"}
    assert ins.adheres(first, "Behold: 7.") and not ins.adheres(first, "Well, behold 7.")
    sign = {"id": "signoff", "signoff": "Yours truly, Captain Moss."}
    assert ins.adheres(sign, "7. YOURS TRULY, CAPTAIN MOSS") and not ins.adheres(sign, "7. Yours truly.")
    assert not ins.adheres(sign, "Yours truly, Captain Moss. 7.")
    lang = {"id": "language", "marker": "bzz"}
    assert ins.adheres(lang, "bzz 7, bzz BZZ? ") is False  # a marker in a word's place
    assert ins.adheres(lang, "BZZ seven. bzz yes")
    assert not ins.adheres(lang, "bzz seven yes") and not ins.adheres(lang, "bzz seven bzz")


def test_incompatible_instructions_never_pair():
    assert ("language", "first_word") not in ins.PAIRS and ("language", "signoff") not in ins.PAIRS
    rng = random.Random(0)
    seen = set()
    for _ in range(400):
        specs = ins.draw_specs(rng)
        kinds = tuple(s["id"] for s in specs)
        seen.add(kinds)
        assert len(specs) == 1 or kinds in ins.PAIRS
        assert all(s["text"] for s in specs)
    assert set(COMBOS) == seen


def test_placement_system_or_user():
    specs = _specs(["capitals", "signoff"])
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    system = ins.with_instructions(msgs, specs, "system")
    assert system[0] == {"role": "system", "content": ins.instruction_text(specs)} and system[1] == msgs[0]
    user = ins.with_instructions(msgs, specs, "user")
    assert len(user) == 1 and user[0]["content"] == "What is 2 + 2? " + ins.instruction_text(specs)
    assert msgs == [{"role": "user", "content": "What is 2 + 2?"}]  # not modified in place
    dialogue = [{"role": "system", "content": "Be brief."}, msgs[0], {"role": "assistant", "content": "4."}, msgs[0]]
    every = ins.with_instructions(dialogue, specs, "every_user")
    assert [m["content"] for m in every] == ["Be brief.", user[0]["content"], "4.", user[0]["content"]]
    first = ins.with_instructions(dialogue, specs, "user")
    assert [m["content"] for m in first] == ["Be brief.", user[0]["content"], "4.", "What is 2 + 2?"]
    assert ins.with_instructions(dialogue, specs, "system")[0]["content"] == "Be brief. " + ins.instruction_text(specs)
    with pytest.raises(ValueError):
        ins.with_instructions(msgs, specs, "assistant")
