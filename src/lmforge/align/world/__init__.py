"""The verifiable chat world, version v2: a small synthetic world whose answers, safety and instruction-following a
program scores, so that every alignment stage moves a number that code can check.

Tiny models (a few million parameters, trained for minutes on a laptop CPU) cannot be judged by people or by
a large model, and they cannot learn open-domain chat. The world is therefore made of what such a model can
learn in parts, graded so that accuracies after SFT land in the middle (room for RLHF to move them), and
checkable exactly:

    tasks.py         arithmetic, word-list transforms, counting: generators and checkers, difficulty 1..3
    facts.py         look-ups in a fictional fact table, read from a card of facts in the prompt (difficulty =
                     what the card holds); the pre-training corpus states every fact
    creative.py      open creative prompts (many good answers), beside the factual ones
    safety.py        five fictional risk categories: unsafe requests in five styles, harmless look-alikes,
                     per-category refusals, the refusal checker, the safety pre-prompt
    instructions.py  system instructions checkable on any turn (capitals, a first word, a sign-off, a toy
                     language), combinable
    oracle.py        the judge: graded helpfulness and safety of an answer; the preference degrees and safety
                     bins (fixed since v1)
    records.py       the records: SFT demonstrations, evaluation sets, RLHF prompts
    corpus.py        the pre-training text
    build.py         `lmforge world build`: all of it as files, with a manifest

Everything is deterministic from one seed, sized by `WorldSizes`, and split into train and held-out items by
a seeded hash of each item (never by filtering after the fact), so no held-out prompt can appear in train.

What each later stage can act on:

- SFT: the chat format, multi-turn format, refusals, and each family's easy end (45 + 1, the last word of a
  list, the fact alone on its card);
  `lmforge eval chat` reports task accuracy per family and difficulty, violation and false-refusal rates.
- Reward models: pairs of answers whose oracle helpfulness gap maps to Llama 2's degrees (significantly
  better ... negligibly better) and whose safety scores give the safety bins (oracle.DEGREE_THRESHOLDS,
  oracle.safety_bin). Helpfulness ignores harm, so a helpfulness model alone prefers complying with an unsafe
  request, which is why there is a safety model.
- Rejection sampling, PPO, GRPO: the oracle's partial credit (a closer number, more list positions, the right
  kind of fact) gives a dense reward; the checkers give verifiable 0/1 rewards for GRPO.
- Ghost Attention: SFT has instructions in single-turn dialogues only; eval_multiturn.jsonl measures
  adherence at turns 1..T with the model's own earlier answers, where it drops without GAtt.
- Safety context distillation: SFT refuses every category under the safety pre-prompt but only some categories
  and styles without it (records.REFUSAL_CATEGORIES, REFUSAL_STYLES): the pre-prompt gap is what distillation
  moves into the model without the pre-prompt.
- Red teaming: the attack styles (direct, role play, hypothetical, obfuscated, multi-turn escalation) and their
  template hooks in safety.py.
- Temperature analysis: eval_factual.jsonl (one right answer) and eval_creative.jsonl (many).

The freeze rule: once released, nothing that changes a file, item, checker, oracle score or threshold of a
version may change under its name. A change is a new version (`common.VERSION`), and every figure measured on
the old one is measured again on it. Records carry "world": VERSION, and `lmforge eval chat` refuses records of
another version.

Versions. v1: arithmetic by operand size (1 +/- 1 digit to 2 +/- 2), last word / reverse 3 / reverse 5, facts
recalled from pre-training (difficulty = how often the corpus states a fact). Its SFT accuracies stayed near
zero on arithmetic, lists and facts at the 2-core budget (the corpus taught no fact; benchmarks/RESULTS.md). v2:
each family from an easy to a hard end (tasks.py), facts read from a card with one-word values over a 200-entity
table, an entity's statements kept together in the corpus (corpus.py), and pre-training and SFT in steps of 4
rows, 720 of each (configs/world).
"""

# NOTE: the oracle's functions are not re-exported here: `safety` would hide the safety module.
from lmforge.align.world.common import VERSION
from lmforge.align.world.records import World, WorldSizes

__all__ = ["VERSION", "World", "WorldSizes"]
