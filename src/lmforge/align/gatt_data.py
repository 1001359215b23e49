"""Ghost Attention's data (Llama 2, section 3.3): dialogues in which a system instruction holds at every turn.

A model fine-tuned on single-turn instructions forgets them a few turns later. Ghost Attention builds data in
which the instruction holds at every turn, although the model sees it only once:

    1. sample: append the instruction `inst` to every user message of a dialogue [u_1, ..., u_n] and let the
       current model answer turn by turn, each answer after its own earlier ones (the sampling dialogue):
           [u_1 + inst] -> a_1,   [u_1 + inst, a_1, u_2 + inst] -> a_2,   ...
    2. train: the same dialogue with `inst` in the first user turn only (the training dialogue), and the
       loss zero on every token before the last answer (`learn: last` in sft):
           [inst | u_1, a_1, u_2, a_2, ..., u_t] -> a_t       only a_t (and its </s>) is learned
       so the model learns to follow at turn t an instruction it last saw t - 1 turns ago, from answers it
       gave while it was reminded at every turn.

On the chat world the instructions come from its lists (capitals, a first word, a persona's sign-off, a
toy language), one or two combined at random as Llama 2 combines hobbies, languages and public figures, and
the user turns are task prompts of the train split (`World.instruction_prompts`). Where the instruction goes
in the training dialogue (`placement`): "system", a system message, which Llama 2's chat format writes inside
the first user turn (`[INST] <<SYS>>\\ninst\\n<</SYS>>\\n\\nu_1 [/INST]`) and the way `eval gatt` asks; or
"user", appended to u_1.

Two choices of lmforge's own (Llama 2 gives neither):
- `every_turn`: a sampled dialogue of n turns gives one example per turn t = 2..n (each learns its own last
  answer; the samples are the same), not only t = n: the same sampling cost teaches every distance.
- `keep: adherent`: an example is kept only when its learned answer follows every instruction (the world's
  checker), since a small model reminded at every turn still misses sometimes and would learn its misses.

Also here: how many turns a model's context holds (`prompt_bounds`, `turns_that_fit`, `ContextGuard`), which
`lmforge gatt` (gatt.py) and `lmforge eval gatt` share.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Literal

from lmforge.align.eval_chat import Answerer, answer_prompts
from lmforge.align.world.common import VERSION, stream
from lmforge.align.world.instructions import adheres, with_instructions
from lmforge.infer.sampling import SamplingParams

# NOTE: greedy: a tiny model's samples at temperature 1 are mostly noise. 64 tokens hold about 99% of the world's
# reference answers under their instructions (a toy language's answers are the longest: up to ~85 pieces with a
# 600-piece tokenizer), and keep the worst case of a dialogue small (prompt_bounds): the 20-turn held-out
# dialogues of `eval gatt` fit at least 8 turns in a 1024-token context and all 20 in a 4096-token one (test_eval_gatt).
GATT_SAMPLING = SamplingParams(temperature=0.0, max_new_tokens=64)
# Tokens per earlier turn beyond max_new_tokens in prompt_bounds: the answer's text may re-encode to a piece or
# two more than were sampled, then come its trailing " " piece and </s>.
ANSWER_SLACK = 4


class GattError(ValueError):
    """A Ghost Attention setting that cannot work (the message names the option)."""


@dataclass
class GattConfig:
    """The Ghost Attention data: dialogues, their turns, where the instruction goes, what is kept.

    Attributes:
        dialogues: Multi-turn dialogues sampled (train split of the world).
        min_turns: Fewest user turns of a dialogue (drawn uniformly in [min_turns, max_turns]).
        max_turns: Most user turns of a dialogue; the sampling model's context must hold them.
        placement: Where the training dialogue states the instruction: "system" (a system message, inside the
            first user turn in Llama 2's format) or "user" (appended to the first user message).
        every_turn: One example per turn 2..n of each dialogue (True) or only its last turn.
        keep: "adherent" keeps an example only when its learned answer follows every instruction; "all" keeps
            every example.
        weight: Mixing weight of the Ghost Attention dialogues against sft.data.sources.
        sample_from: Model folder that samples the answers (default: init_from, the model being tuned).
        batch_size: Sequences the engine decodes together while sampling.
    """

    dialogues: int = 200
    min_turns: int = 2
    max_turns: int = 6
    placement: Literal["system", "user"] = "system"
    every_turn: bool = True
    keep: Literal["adherent", "all"] = "adherent"
    weight: float = 1.0
    sample_from: str | None = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.dialogues < 1:
            raise GattError(f"gatt.dialogues must be >= 1, got {self.dialogues}")
        if not 1 <= self.min_turns <= self.max_turns:
            raise GattError(f"gatt.min_turns and gatt.max_turns need 1 <= min_turns <= max_turns, got "
                            f"{self.min_turns} and {self.max_turns}")
        if self.batch_size < 1 or not self.weight > 0:
            raise GattError("gatt.batch_size must be >= 1 and gatt.weight > 0")


# ---- the dialogues --------------------------------------------------------------------------------------------
@dataclass
class InstructionDialogue:
    """A world dialogue of task turns under instructions: `messages` without the instruction (user turns with
    the world's reference answers between them, the last user turn open), the instruction `specs`, and the
    record meta (meta["turns"]: each turn's task)."""

    messages: list[dict]
    specs: list[dict]
    meta: dict

    @property
    def users(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "user"]


def draw_dialogues(world, n: int, min_turns: int, max_turns: int, split: str, rng: random.Random
                   ) -> list[InstructionDialogue]:
    """n instruction dialogues of `split`, each of a number of turns drawn in [min_turns, max_turns]."""
    out = []
    for _ in range(n):
        turns = rng.randint(min_turns, max_turns)
        for messages, meta in world.instruction_prompts(split, 1, turns, rng, placement="system"):
            out.append(InstructionDialogue(messages[1:], meta["instructions"], meta))  # messages[0]: the system
    return out


def sampling_record(d: InstructionDialogue) -> dict:
    """The prompt record that samples `d`: the instruction appended to every user message, answered turn by
    turn (a rollout record of `eval_chat.answer_prompts`)."""
    messages = with_instructions(d.messages, d.specs, "every_user")
    return {"world": VERSION, "messages": messages, "meta": {**d.meta, "placement": "every_user", "rollout": True}}


def training_dialogue(d: InstructionDialogue, answers: list[str], turn: int, placement: str) -> list[dict]:
    """The first `turn` turns of `d` with the sampled `answers`, the instruction stated once (`placement`):
    the dialogue whose last answer, answers[turn - 1], is learned."""
    messages = []
    for user, answer in zip(d.users[:turn], answers[:turn]):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if placement not in ("system", "user"):
        raise GattError(f"gatt.placement must be system or user, got {placement!r}")
    return with_instructions(messages, d.specs, placement)


def example_turns(n: int, every_turn: bool) -> range:
    """The turns whose answer an n-turn dialogue teaches: 2..n (or n alone); a 1-turn dialogue teaches turn 1.

    >>> list(example_turns(4, True)), list(example_turns(4, False)), list(example_turns(1, True))
    ([2, 3, 4], [4], [1])
    """
    return range(min(2, n) if every_turn else n, n + 1)


def gatt_data(world, answer: Answerer, cfg: GattConfig, sampling: SamplingParams = GATT_SAMPLING,
              progress: bool = False) -> tuple[list[dict], dict]:
    """Sample the Ghost Attention data of `world` with `answer` (module docstring): (examples, summary).

    Each example is {"messages": training dialogue, "meta": {...}}: the format `lmforge sft` reads. The
    summary counts the dialogues, the samples that follow their instructions by turn, and what was kept (an
    example whose dialogue holds an empty answer is dropped: sft refuses empty turns).
    """
    dialogues = draw_dialogues(world, cfg.dialogues, cfg.min_turns, cfg.max_turns, "train",
                               stream(world.seed, "train|gatt"))
    answers = answer_prompts(None, None, [sampling_record(d) for d in dialogues], sampling, answer=answer,
                             chunk_size=max(256, cfg.batch_size), progress=progress)
    examples, by_turn, candidates, empty = [], {}, 0, 0
    for i, (d, said) in enumerate(zip(dialogues, answers)):
        follows = [all(adheres(s, a) for s in d.specs) for a in said]
        for t, f in enumerate(follows, 1):
            by_turn.setdefault(t, []).append(f)
        for t in example_turns(len(said), cfg.every_turn):
            candidates += 1
            if not all(a.strip() for a in said[:t]):  # an empty answer (the model ended at once) is no turn
                empty += 1
                continue
            if cfg.keep == "adherent" and not follows[t - 1]:
                continue
            meta = {"kind": "gatt", "dialogue": i, "turn": t, "turns": len(said), "placement": cfg.placement,
                    "instructions": d.specs, "adheres": follows[t - 1]}
            examples.append({"world": VERSION, "messages": training_dialogue(d, said, t, cfg.placement),
                             "meta": meta})
    summary = {"world": VERSION, "world_seed": world.seed, "gatt": asdict(cfg), "sampling": asdict(sampling),
               "dialogues": len(dialogues), "answers": sum(len(a) for a in answers), "candidates": candidates,
               "dropped_empty": empty, "examples": len(examples),
               "sample_adherence_by_turn": {str(t): sum(v) / len(v) for t, v in sorted(by_turn.items())}}
    return examples, summary


# ---- how many turns a context holds ----------------------------------------------------------------------------
def prompt_bounds(tokenizer, messages: list[dict], max_new_tokens: int) -> list[int]:
    """For each user turn t of `messages` (system merged into the first): an upper bound on the prompt tokens
    when it is answered, every earlier answer's text taking at most max_new_tokens + 2 pieces when encoded.

    An exchange is encoded on its own (Llama 2's format): the open turn t is [bos] + encode("[INST] u_t
    [/INST]"), and a completed earlier one adds its answer's pieces, its trailing " " and </s>: at most
    max_new_tokens + ANSWER_SLACK. A model's answer re-encodes to its own pieces or fewer (they merge), except
    for byte pieces that are no valid UTF-8: they decode to U+FFFD, three byte pieces each (`ContextGuard`).
    """
    from lmforge.tokenizer.chat import B_INST, E_INST, exchanges

    users = [u for u, _ in exchanges(messages)]
    bounds, before = [], 0
    for u in users:
        opened = 1 + len(tokenizer.encode(f"{B_INST} {u.strip()} {E_INST}"))
        bounds.append(before + opened)
        before += opened + max_new_tokens + ANSWER_SLACK
    return bounds


def turns_that_fit(tokenizer, messages: list[dict], max_new_tokens: int, context: int | None) -> int:
    """The leading user turns of `messages` that can each be answered in full within `context` tokens
    (prompt bound + max_new_tokens <= context); every turn for None (a sliding-window model's rolling cache)."""
    bounds = prompt_bounds(tokenizer, messages, max_new_tokens)
    if context is None:
        return len(bounds)
    fit = 0
    while fit < len(bounds) and bounds[fit] + max_new_tokens <= context:
        fit += 1
    return fit


class ContextGuard:
    """An answerer that sends on only the dialogues whose prompt leaves sampling.max_new_tokens in `context`;
    the others are answered "" (counted in `overflows`), since the engine refuses a prompt the context cannot
    hold. `prompt_bounds` plans the turns so that this does not happen, save for the rare answer of invalid
    UTF-8 bytes whose text re-encodes longer than it was sampled."""

    def __init__(self, answer: Answerer, tokenizer, context: int | None):
        self.answer, self.tokenizer, self.context, self.overflows = answer, tokenizer, context, 0

    def __call__(self, dialogues: list[list[dict]], sampling: SamplingParams) -> list[str]:
        from lmforge.tokenizer.chat import encode_chat

        fits = [self.context is None or len(encode_chat(self.tokenizer, d, add_generation_prompt=True).ids)
                + sampling.max_new_tokens <= self.context for d in dialogues]
        sent = [d for d, ok in zip(dialogues, fits) if ok]
        texts = iter(self.answer(sent, sampling) if sent else [])
        self.overflows += fits.count(False)
        return [next(texts) if ok else "" for ok in fits]


def context_of(model) -> int | None:
    """Tokens a prompt and its answer share: max_seq_len, or None for a sliding-window model."""
    return None if model.config.sliding_window is not None else model.config.max_seq_len


__all__ = ["GATT_SAMPLING", "ContextGuard", "GattConfig", "GattError", "InstructionDialogue", "context_of",
           "draw_dialogues", "example_turns", "gatt_data", "prompt_bounds", "sampling_record", "training_dialogue",
           "turns_that_fit"]
