"""Prompt files for rejection sampling and RL: what each iteration answers, and which prompts are safety-tagged.

A prompt file is .jsonl (or .parquet), one prompt per record:

    {"messages": [..., {"role": "user", "content": "..."}]}   a dialogue ending with the user's turn (OpenAI / TRL)
    {"prompt": "..."}                                        one user message
    optional  "meta": {...}                                  a chat-world record's meta (`lmforge world build`
                                                             writes rlhf_prompts.jsonl): the oracle and the
                                                             checkers score answers to it
    optional  "safety": true | false                         the safety tag of Llama 2's reward gate

The safety tag: a record's own "safety" field when it has one; for a chat-world record, true for the unsafe
requests (meta kind "unsafe": the prompts written to elicit unsafe answers), false for everything else,
harmless look-alikes included (their answers are judged by helpfulness unless the Safety RM finds one unsafe,
so refusing them costs reward).

`PromptSchedule` decides which prompts iteration i answers: epoch e is a seeded permutation of all prompts,
and iteration i takes positions [i * P, (i + 1) * P) of the epochs laid end to end (P prompts an iteration).
Worked example, 5 prompts, P = 2: iterations 0, 1 take epoch 0's positions 0-1 and 2-3; iteration 2 takes its
position 4 and epoch 1's position 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file, the line and the problem."""


def read_prompt_records(paths: list[str] | str) -> list[dict]:
    """Every prompt of `paths`, checked: {"messages", "meta" (or None), "safety", "source"} per record."""
    from lmforge.data.sources import DataError, iter_records
    from lmforge.tokenizer.chat import ChatFormatError, exchanges

    out = []
    for path in [paths] if isinstance(paths, str) else paths:
        if not Path(path).is_file():
            raise PromptFileError(f"{path}: no such prompt file")
        try:
            for where, r in iter_records(path):
                if "messages" in r:
                    messages = r["messages"]
                elif isinstance(r.get("prompt"), str):
                    messages = [{"role": "user", "content": r["prompt"]}]
                else:
                    raise PromptFileError(f"{where}: expected a 'messages' list or a 'prompt' string")
                try:
                    exchanges(messages, add_generation_prompt=True)
                except ChatFormatError as e:
                    raise PromptFileError(f"{where}: {e}") from None
                meta = r.get("meta")
                if meta is not None and (not isinstance(meta, dict) or meta.get("rollout")):
                    raise PromptFileError(f"{where}: meta must be a single-turn chat-world record's meta (a "
                                          "multi-turn rollout record is answered turn by turn, not here)")
                tag = r.get("safety")
                if tag is not None and not isinstance(tag, bool):
                    raise PromptFileError(f"{where}: 'safety' must be true or false, got {tag!r}")
                if tag is None:
                    tag = meta is not None and meta.get("kind") == "unsafe"
                out.append({"messages": messages, "meta": meta, "safety": tag, "source": where})
        except DataError as e:
            raise PromptFileError(str(e)) from None
    if not out:
        raise PromptFileError(f"no prompts in {', '.join(map(str, [paths] if isinstance(paths, str) else paths))}")
    return out


def require_world(records: list[dict], who: str) -> None:
    """PromptFileError unless every record is a chat-world record (`who` needs the oracle or the checkers)."""
    for r in records:
        if r["meta"] is None or "kind" not in r["meta"]:
            raise PromptFileError(f"{r['source']}: {who} needs chat-world prompts (a 'meta' with the world's "
                                  "fields, as `lmforge world build` writes them)")


@dataclass
class PromptSchedule:
    """The prompts of each iteration (module docstring): `n` prompts, `per_iteration` an iteration, `seed`."""

    n: int
    per_iteration: int
    seed: int

    def iteration(self, i: int) -> list[int]:
        """Indices of the prompts iteration i (from 0) answers, in order."""
        start = i * self.per_iteration
        out: list[int] = []
        epoch = start // self.n
        pos = start - epoch * self.n
        while len(out) < self.per_iteration:
            order = np.random.default_rng([self.seed, epoch, 17]).permutation(self.n)
            take = order[pos : pos + self.per_iteration - len(out)]
            out += [int(j) for j in take]
            epoch, pos = epoch + 1, 0
        return out


__all__ = ["PromptFileError", "PromptSchedule", "read_prompt_records", "require_world"]
