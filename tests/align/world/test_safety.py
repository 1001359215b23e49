"""Risk categories: refusals are recognised as refusals, helpful answers never are, and the items of each style
render the way the red-teaming and distillation stages expect."""

import random

import pytest

from lmforge.align.world import creative, safety
from lmforge.align.world.common import LIST_WORDS, stream
from lmforge.align.world.instructions import PERSONAS
from lmforge.align.world.records import World
from lmforge.align.world.tasks import DIFFICULTIES, FAMILY_NAMES


def test_every_refusal_template_is_a_refusal():
    for c in safety.CATEGORIES:
        assert len(c.refusals) >= 2
        for text in c.refusals:
            assert safety.refused(text) and safety.refused(text.upper()) and safety.refused(text.replace("'", "\u2019"))
        assert safety.refused(safety.preprompt(c.name))  # the pre-prompt carries the category's template


def test_no_helpful_answer_reads_as_a_refusal():
    world = World(0)
    answers = [a for c in safety.CATEGORIES for _, a, _ in c.lookalikes.values()]
    answers += [t.reference for f in FAMILY_NAMES for d in DIFFICULTIES
                for t in world.tasks(f, d, "train", 20, stream(0, f"refusal|{f}|{d}"))]
    rng = random.Random(0)
    answers += [creative.reference(creative.draw(rng)[1], rng) for _ in range(50)]
    answers += [signoff for _, _, signoff in PERSONAS]
    assert not [a for a in answers if safety.refused(a)]


def test_refused_versus_complied_on_mutations():
    refusal = safety.category("potion").refusals[0]
    assert safety.refused(refusal)
    assert not safety.refused(refusal.replace("I can't help", "I can help"))
    assert not safety.refused("First boil the water, then add the roots.")
    assert safety.refused("i'm sorry, but no.") and safety.refused("I will not do that.")


def test_lookalike_answers_hold_their_key_and_share_the_topic():
    for c in safety.CATEGORIES:
        assert set(c.lookalikes) == set(safety.INTENTS)
        for questions, answer, key in c.lookalikes.values():
            assert key in answer.lower() and key not in LIST_WORDS
            meta = {"category": c.name}
            assert any(safety.on_topic(meta, q) for q in questions)  # look-alikes share the category's words
            assert not any(key in r.lower() for r in c.refusals)
        assert all(safety.on_topic({"category": c.name}, a) for a in c.acts)


@pytest.mark.parametrize("style", safety.STYLES)
def test_each_style_renders_a_prompt(style):
    rng = random.Random(0)
    for name in safety.CATEGORY_NAMES:
        item = safety.draw_unsafe(rng, name, style)
        messages, meta = safety.render_unsafe(item, rng)
        assert meta["kind"] == "unsafe" and meta["category"] == name and meta["style"] == style
        assert meta["reference"] in safety.category(name).refusals
        assert messages[-1]["role"] == "user"
        act = safety.category(name).acts[item[3]]
        if style == "escalation":
            assert [m["role"] for m in messages] == ["user", "assistant", "user"]
            assert len(safety.unsafe_keys(item)) == 2 and safety.unsafe_keys(item)[1].startswith("lookalike|")
            assert not safety.refused(messages[1]["content"])
        else:
            assert len(messages) == 1 and len(safety.unsafe_keys(item)) == 1
        if style == "obfuscated":
            assert act not in messages[-1]["content"] and safety.leetspeak(act) in messages[-1]["content"]
        else:
            assert act in messages[-1]["content"]


def test_unsafe_items_render_distinct_prompts():
    world = World(0)
    for split in ("train", "heldout"):
        drawn = world.unsafe(split, 300, stream(0, f"distinct|{split}"))
        texts = [m[-1]["content"] for m, _ in drawn]
        assert len(drawn) == 300 and len(set(texts)) == 300
        assert {meta["style"] for _, meta in drawn} == set(safety.STYLES)
