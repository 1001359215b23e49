"""The world of one seed as records: SFT demonstrations, evaluation sets (held-out and a train-split sample of the
same size) and RLHF prompts.

A record is one JSON object,

    {"id": "eval_tasks-00012", "world": "v2", "messages": [...], "meta": {"kind": ..., ...}}

`messages` is the conversational format of OpenAI / TRL ({"role": "system" | "user" | "assistant",
"content": ...}). A prompt record ends with a user message; an SFT record ends with the assistant's
demonstration. `meta` holds everything its checker and the oracle need, so that scoring needs only the
record and the answer: kind ("task", "unsafe", "lookalike", "creative", "instruction"; SFT adds "dialogue"),
the family and difficulty, the target, the category and style, the instruction specs, and a correct
`reference` answer. A multi-turn instruction record (meta "rollout": true) holds T user turns; its
assistant turns are references, replaced by the model's own answers when it is evaluated turn by turn.

What the SFT set holds (meta "source"), and why:

    tasks                helpful answers to tasks of every family and difficulty
    multiturn            dialogues of 2-4 task turns, no instructions (the model learns the multi-turn format)
    instructions         single-turn only: instructions as a system message or appended to the user message
                         (Ghost Attention then has multi-turn adherence to fix)
    refusals             refusals without a pre-prompt, only for REFUSAL_CATEGORIES in REFUSAL_STYLES
    refusals_preprompt   refusals under the safety pre-prompt, every category and style (safety context
                         distillation then has a gap to capture: the pre-prompt makes the model refuse more)
    lookalikes           helpful answers to the harmless look-alikes (with some under the pre-prompt too, so
    lookalikes_preprompt that the pre-prompt does not simply mean "refuse")
    creative             answers to creative prompts, from a grammar
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from lmforge.align.world import creative, safety
from lmforge.align.world.common import VERSION, draw_split, stream
from lmforge.align.world.facts import Facts, FactTable
from lmforge.align.world.instructions import apply, draw_specs, with_instructions
from lmforge.align.world.tasks import DIFFICULTIES, FAMILY_NAMES, Arithmetic, Counting, Lists, Task

REFUSAL_CATEGORIES = ("potion", "coins", "vault")  # refused without a pre-prompt in SFT; the rest only with it
REFUSAL_STYLES = ("direct", "hypothetical")
SINGLE_TURN_STYLES = tuple(s for s in safety.STYLES if s != "escalation")
# NOTE: instruction dialogues leave arithmetic out: "23 + 45 = 68." has no letters, so an answer in capitals
# could not show that it follows the instruction. They leave the fact look-ups out too: a card of up to six facts
# makes a turn several times longer, and Ghost Attention's dialogues must hold 8 turns in a 1024-token context.
INSTRUCTION_FAMILIES = ("lists", "counting")
RLHF_MIX = (("task", 0.5), ("unsafe", 0.15), ("lookalike", 0.15), ("instruction", 0.1), ("creative", 0.1))


class WorldSizeError(ValueError):
    """A size of the world that cannot be built (the message names the option)."""


@dataclass
class WorldSizes:
    """How much of the world a build writes; the items and the split are fixed by the seed.

    Attributes:
        heldout_fraction: Share of the items (operand pairs, word lists, facts, prompt combinations) held out.
        entities: Countries, creatures and people each in the fact table (three facts each).
        mentions_frequent: Corpus statements of each fact of frequency class 1.
        mentions_medium: Corpus statements of each fact of frequency class 2.
        mentions_rare: Corpus statements of each fact of frequency class 3.
        corpus_files: Text files the corpus is spread over (each is one document for `data prepare`).
        corpus_arithmetic: Corpus sentences of arithmetic results (train-split items only).
        corpus_lists: Corpus sentences of list transforms (train-split items only).
        corpus_counting: Corpus sentences of counts (train-split items only).
        corpus_lore: Corpus statements of each look-alike answer (the harmless facts of the risk categories).
        corpus_stories: Short stories from the creative grammar.
        sft_tasks: SFT dialogues answering one task.
        sft_multiturn: SFT dialogues of 2-4 task turns.
        sft_instructions: Single-turn SFT dialogues that follow instructions.
        sft_refusals: Refusals without the safety pre-prompt.
        sft_refusals_preprompt: Refusals under the safety pre-prompt.
        sft_lookalikes: Helpful answers to harmless look-alikes.
        sft_lookalikes_preprompt: Helpful answers to look-alikes under the safety pre-prompt.
        sft_creative: Answers to creative prompts.
        eval_tasks: Task prompts per family and difficulty.
        eval_unsafe: Unsafe requests per risk category (spread over the styles).
        eval_lookalikes: Look-alike prompts per risk category.
        eval_instructions: Single-turn instruction prompts.
        eval_multiturn: Multi-turn instruction dialogues (answered turn by turn).
        multiturn_turns: User turns in each multi-turn instruction dialogue.
        eval_factual: Factual prompts (fact look-ups), held out.
        eval_creative: Creative prompts, held out.
        rlhf_prompts: RLHF prompts (train split), mixed as RLHF_MIX.
    """

    heldout_fraction: float = 0.25
    entities: int = 200
    mentions_frequent: int = 4
    mentions_medium: int = 2
    mentions_rare: int = 1
    corpus_files: int = 64
    corpus_arithmetic: int = 12000
    corpus_lists: int = 6000
    corpus_counting: int = 6000
    corpus_lore: int = 10
    corpus_stories: int = 2000
    sft_tasks: int = 3000
    sft_multiturn: int = 400
    sft_instructions: int = 800
    sft_refusals: int = 200
    sft_refusals_preprompt: int = 400
    sft_lookalikes: int = 500
    sft_lookalikes_preprompt: int = 100
    sft_creative: int = 200
    eval_tasks: int = 50
    eval_unsafe: int = 100
    eval_lookalikes: int = 100
    eval_instructions: int = 300
    eval_multiturn: int = 60
    multiturn_turns: int = 8
    eval_factual: int = 200
    eval_creative: int = 200
    rlhf_prompts: int = 2000

    def __post_init__(self):
        if not 0 < self.heldout_fraction < 1:
            raise WorldSizeError(f"sizes.heldout_fraction must lie in (0, 1), got {self.heldout_fraction}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "heldout_fraction" and (not isinstance(value, int) or value < 0):
                raise WorldSizeError(f"sizes.{f.name} must be an integer >= 0, got {value!r}")
        for name, least in (("entities", 2), ("corpus_files", 1), ("multiturn_turns", 1)):
            if getattr(self, name) < least:
                raise WorldSizeError(f"sizes.{name} must be >= {least}, got {getattr(self, name)}")


def prompt_record(messages: list[dict], meta: dict) -> dict:
    return {"world": VERSION, "messages": messages, "meta": meta}


def sft_record(messages: list[dict], meta: dict, answer: str, source: str) -> dict:
    return {"world": VERSION, "messages": [*messages, {"role": "assistant", "content": answer}],
            "meta": {**meta, "source": source}}


class World:
    """Every item source of world `seed`, and the record sets built from them (module docstring)."""

    def __init__(self, seed: int, sizes: WorldSizes | None = None):
        self.seed, self.sizes = seed, sizes or WorldSizes()
        self.table = FactTable(seed, self.sizes.entities)
        self.families = {"arithmetic": Arithmetic(), "lists": Lists(), "facts": Facts(self.table),
                         "counting": Counting()}

    def draw_items(self, n, split, rng, draw, keys, render, text=lambda r: r[0][-1]["content"], unique=True):
        """`common.draw_split` in this world; by default a rendering's text is its last message's."""
        return draw_split(n, split, self.seed, self.sizes.heldout_fraction, rng, draw, keys, render, text, unique)

    # ---- item sources: lists of Task or of (messages, meta) ----------------------------------------------
    def tasks(self, family: str, difficulty: int, split: str, n: int, rng) -> list[Task]:
        fam = self.families[family]
        return self.draw_items(n, split, rng, lambda r: fam.draw(difficulty, r), lambda it: [fam.key(it)],
                               lambda it, r: fam.render(it, difficulty, r), lambda t: t.prompt)

    def mixed_tasks(self, split: str, n: int, rng, families: tuple[str, ...] = FAMILY_NAMES) -> list[Task]:
        """Tasks of a uniformly random family (of `families`) and difficulty."""
        def draw(r):
            family, difficulty = r.choice(families), r.choice(DIFFICULTIES)
            return family, difficulty, self.families[family].draw(difficulty, r)

        return self.draw_items(n, split, rng, draw, lambda it: [self.families[it[0]].key(it[2])],
                               lambda it, r: self.families[it[0]].render(it[2], it[1], r), lambda t: t.prompt)

    def unsafe(self, split: str, n: int, rng, category: str | None = None, style: str | None = None) -> list:
        return self.draw_items(n, split, rng, lambda r: safety.draw_unsafe(r, category, style), safety.unsafe_keys,
                               safety.render_unsafe)

    def lookalikes(self, split: str, n: int, rng, category: str | None = None) -> list:
        return self.draw_items(n, split, rng, lambda r: safety.draw_lookalike(r, category),
                               lambda it: [safety.lookalike_key(it)], lambda it, r: safety.render_lookalike(it))

    def creative(self, split: str, n: int, rng) -> list:
        return self.draw_items(n, split, rng, creative.draw, lambda it: [creative.key(it)], creative.render)

    def instruction_prompts(self, split: str, n: int, turns: int, rng, placement: str = "system") -> list:
        """(messages, meta) of instruction dialogues with `turns` task turns each (references between them)."""
        out = []
        for _ in range(n):
            dialogue = self.mixed_tasks(split, turns, rng, INSTRUCTION_FAMILIES)
            specs = draw_specs(rng)
            messages = []
            for t in dialogue:
                messages += [{"role": "user", "content": t.prompt},
                             {"role": "assistant", "content": apply(specs, t.reference)}]
            meta = {"kind": "instruction", "instructions": specs, "placement": placement, "rollout": turns > 1,
                    "turns": [t.meta for t in dialogue], "reference": apply(specs, dialogue[-1].reference)}
            out.append((with_instructions(messages[:-1], specs, placement), meta))
        return out

    # ---- record sets ---------------------------------------------------------------------------------------
    def eval_sets(self, split: str) -> dict[str, list[dict]]:
        """The evaluation sets of `split` ("heldout": eval_*; "train": the eval_*_train samples), each shuffled."""
        s, sfx = self.sizes, "" if split == "heldout" else "_train"

        def rng(name):
            return stream(self.seed, f"{split}|{name}")

        tasks = [prompt_record([{"role": "user", "content": t.prompt}], t.meta)
                 for f in FAMILY_NAMES for d in DIFFICULTIES
                 for t in self.tasks(f, d, split, s.eval_tasks, rng(f"eval_tasks|{f}|{d}"))]
        unsafe = [prompt_record(*r) for c in safety.CATEGORY_NAMES for k, style in enumerate(safety.STYLES)
                  for r in self.unsafe(split, _share(s.eval_unsafe, len(safety.STYLES), k), rng(f"unsafe|{c}|{style}"),
                                       c, style)]
        looks = [prompt_record(*r) for c in safety.CATEGORY_NAMES
                 for r in self.lookalikes(split, s.eval_lookalikes, rng(f"lookalikes|{c}"), c)]
        single = self.instruction_prompts(split, s.eval_instructions, 1, rng("instructions"))
        multi = self.instruction_prompts(split, s.eval_multiturn, s.multiturn_turns, rng("multiturn"))
        sets = {f"eval_tasks{sfx}": tasks, f"eval_unsafe{sfx}": unsafe, f"eval_lookalikes{sfx}": looks,
                f"eval_instructions{sfx}": [prompt_record(*r) for r in single],
                f"eval_multiturn{sfx}": [prompt_record(*r) for r in multi]}
        if split == "heldout":
            facts = [t for d in DIFFICULTIES
                     for t in self.tasks("facts", d, split, _share(s.eval_factual, 3, d - 1), rng(f"factual|{d}"))]
            sets["eval_factual"] = [prompt_record([{"role": "user", "content": t.prompt}], t.meta) for t in facts]
            sets["eval_creative"] = [prompt_record(*r) for r in self.creative(split, s.eval_creative, rng("creative"))]
        for name, records in sets.items():  # shuffled, so that the first N records (eval chat --limit) are a sample
            rng(f"order|{name}").shuffle(records)
        return sets

    def sft(self) -> list[dict]:
        """The SFT demonstrations (train split), shuffled so that the sources mix."""
        s = self.sizes

        def rng(name):
            return stream(self.seed, f"train|sft|{name}")

        out = [sft_record([{"role": "user", "content": t.prompt}], t.meta, t.reference, "tasks")
               for f in FAMILY_NAMES for d in DIFFICULTIES
               for t in self.tasks(f, d, "train", _share(s.sft_tasks, 12, 3 * FAMILY_NAMES.index(f) + d - 1),
                                   rng(f"tasks|{f}|{d}"))]
        r = rng("multiturn")
        for _ in range(s.sft_multiturn):
            dialogue, messages = self.mixed_tasks("train", r.randint(2, 4), r), []
            for t in dialogue:
                messages += [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.reference}]
            meta = {"kind": "dialogue", "turns": [t.meta for t in dialogue]}
            out.append(sft_record(messages[:-1], meta, dialogue[-1].reference, "multiturn"))
        r = rng("instructions")
        for k in range(s.sft_instructions):
            placement = ("system", "user")[k % 2]
            ((messages, meta),) = self.instruction_prompts("train", 1, 1, r, placement)
            out.append(sft_record(messages, meta, meta["reference"], "instructions"))
        combos = [(c, st) for c in REFUSAL_CATEGORIES for st in REFUSAL_STYLES]
        for k, (c, st) in enumerate(combos):
            n = _share(s.sft_refusals, len(combos), k)
            for messages, meta in self.unsafe("train", n, rng(f"refusals|{c}|{st}"), c, st):
                out.append(sft_record(messages, meta, meta["reference"], "refusals"))
        pre = [{"role": "system", "content": safety.SAFETY_PREPROMPT}]
        for messages, meta in self.unsafe("train", s.sft_refusals_preprompt, rng("refusals_preprompt")):
            out.append(sft_record(pre + messages, meta, meta["reference"], "refusals_preprompt"))
        for messages, meta in self.lookalikes("train", s.sft_lookalikes, rng("lookalikes")):
            out.append(sft_record(messages, meta, meta["reference"], "lookalikes"))
        for messages, meta in self.lookalikes("train", s.sft_lookalikes_preprompt, rng("lookalikes_preprompt")):
            out.append(sft_record(pre + messages, meta, meta["reference"], "lookalikes_preprompt"))
        for messages, meta in self.creative("train", s.sft_creative, rng("creative")):
            out.append(sft_record(messages, meta, meta["reference"], "creative"))
        rng("order").shuffle(out)
        return out

    def rlhf_prompts(self) -> list[dict]:
        """Prompts for preference collection and RL (train split), mixed as RLHF_MIX and shuffled."""
        n, out = self.sizes.rlhf_prompts, []

        def rng(name):
            return stream(self.seed, f"train|rlhf|{name}")

        counts = {kind: round(n * share) for kind, share in RLHF_MIX}
        out += [prompt_record([{"role": "user", "content": t.prompt}], t.meta)
                for t in self.mixed_tasks("train", counts["task"], rng("tasks"))]
        out += [prompt_record(*r) for r in self.unsafe("train", counts["unsafe"], rng("unsafe"))]
        out += [prompt_record(*r) for r in self.lookalikes("train", counts["lookalike"], rng("lookalikes"))]
        out += [prompt_record(*r) for r in self.instruction_prompts("train", counts["instruction"], 1, rng("instr"))]
        out += [prompt_record(*r) for r in self.creative("train", counts["creative"], rng("creative"))]
        rng("order").shuffle(out)
        return out


def _share(n: int, parts: int, k: int) -> int:
    """Part k of n split into `parts` near-equal integers (the first n % parts get one more): _share(10, 3, 0) = 4."""
    return n // parts + (k < n % parts)


__all__ = ["World", "WorldSizes", "WorldSizeError", "prompt_record", "sft_record"]
