"""SFT data: dialogues from the files users already have, checked, tokenised once, and mixed by weight.

Formats, one record per line of a .jsonl file or per row of a .parquet file (other fields are ignored):

    conversational     {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
                       (OpenAI's and TRL's format)
    prompt-completion  {"prompt": str, "completion": str}                          (TRL, text)
                       {"prompt": [messages...], "completion": [messages...]}      (TRL, conversational)

A prompt-completion pair is the dialogue prompt + completion, a text prompt being one user message and a
text completion one assistant message. A dialogue is an optional system message, then user and assistant
messages alternating, user first, assistant last (the last answer is what there is to learn); every content a
non-empty string. A record that breaks a rule stops the run with one line naming the file, the line (or
parquet row) and the problem, before anything is written.

Tokenisation is Llama 2's chat format with its loss mask (lmforge.tokenizer.chat.encode_chat): `learn: all`
learns every answer of a dialogue, `learn: last` only the last one (Ghost Attention and rejection-sampled
data). Each source is tokenised once into token shards with loss masks (lmforge.data's shard format), split
into train and validation by a seeded hash of each dialogue's ids (`val_fraction`), and cached under
`cache_dir/sft-<key>`, where the key hashes the file's bytes, the tokenizer, `learn`, `val_fraction` and the
seed: a later run with the same inputs reuses the shards, a changed input gets new ones.

Mixing (`mix_epoch`): an epoch draws N dialogues (N = the train dialogues of all sources together, or
`epoch_dialogues`), n_s = N * w_s / sum(w) of them from source s, rounded so that they sum to N (largest
remainders). A source drawn more than its size is repeated in whole passes, each a fresh permutation, then
the rest of one more; less than its size, a seeded subset. Worked example, sources of 100 and 50 dialogues
with weights 1 and 3: N = 150, n = (37.5, 112.5) -> (38, 112) after the largest-remainder rounding (ties go to
the first source); the second source is read twice over and then 12 more of its dialogues.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from lmforge.data.loader import TokenStream
from lmforge.data.shards import file_sha256
from lmforge.data.sources import iter_records
from lmforge.io import atomic_dir, write_marker
from lmforge.tokenizer.chat import ChatFormatError, encode_chat, exchanges

CACHE_FORMAT = "lmforge-sft-cache/1"


class SFTDataError(ValueError):
    """A dialogue file that cannot be trained on; the message names the file, line and problem."""


@dataclass
class SFTSource:
    """One file of dialogues in the mix.

    Attributes:
        path: A .jsonl or .parquet file of dialogues (module docstring for the formats).
        weight: Share of each epoch's dialogues drawn from this file, relative to the other sources' weights.
        learn: "all" learns every answer of a dialogue; "last" only its last answer.
    """

    path: str
    weight: float = 1.0
    learn: Literal["all", "last"] = "all"

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise SFTDataError(f"data.sources: the weight of {self.path} must be > 0, got {self.weight}")


@dataclass
class SFTDataConfig:
    """The dialogues to fine-tune on.

    Attributes:
        sources: Dialogue files, each a path or {path, weight, learn} (e.g. in YAML: `- path: chat.jsonl` /
            `weight: 2`); several are mixed by their weights.
        tokenizer: tokenizer.model to encode with; None takes the one in the init_from model folder.
        val_fraction: Share of each source's dialogues held out for the validation loss (a seeded hash of
            each dialogue decides, so the split does not depend on the order of the file).
        epoch_dialogues: Dialogues per epoch; None: as many as the sources hold together.
        cache_dir: Where tokenised sources are cached (reused by later runs with the same inputs).
    """

    sources: list[SFTSource | str] = field(default_factory=list)
    tokenizer: str | None = None
    val_fraction: float = 0.05
    epoch_dialogues: int | None = None
    cache_dir: str = "runs/cache"

    def __post_init__(self) -> None:
        self.sources = [SFTSource(s) if isinstance(s, str) else s for s in self.sources]
        if not 0 <= self.val_fraction < 1:
            raise SFTDataError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.epoch_dialogues is not None and self.epoch_dialogues < 1:
            raise SFTDataError(f"data.epoch_dialogues must be >= 1, got {self.epoch_dialogues}")


# ---- reading and checking -----------------------------------------------------------------------------------
def dialogue(record: dict, where: str) -> list[dict]:
    """The messages of one record (module docstring), checked; SFTDataError naming `where` otherwise."""
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise SFTDataError(f"{where}: 'prompt' and 'completion' must each be a string or a list of messages")
        messages = prompt + completion
    else:
        fields = ", ".join(sorted(record)) or "none"
        raise SFTDataError(f"{where}: expected a 'messages' list, or 'prompt' and 'completion' (fields: {fields})")
    if not isinstance(messages, list) or not messages:
        raise SFTDataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if isinstance(m, dict) and isinstance(m.get("content"), str) and not m["content"].strip():
            raise SFTDataError(f"{where}: message {i} ({m.get('role')}) has empty content")
    try:
        pairs = exchanges(messages)
    except ChatFormatError as e:
        raise SFTDataError(f"{where}: {e}") from None
    if pairs[-1][1] is None:
        raise SFTDataError(f"{where}: the last message is the user's; a training dialogue ends with the "
                           "assistant's answer (the part that is learned)")
    return messages


def read_dialogues(path: str | Path) -> Iterator[list[dict]]:
    """Every dialogue of a .jsonl / .parquet file, checked (SFTDataError at the first bad record)."""
    path = Path(path)
    if not path.is_file():
        raise SFTDataError(f"{path}: no such file (data.sources takes .jsonl or .parquet files of dialogues)")
    if path.suffix.lower() not in (".jsonl", ".parquet"):
        raise SFTDataError(f"{path}: expected a .jsonl or .parquet file of dialogues")
    n = 0
    for where, record in iter_records(path):
        yield dialogue(record, where)
        n += 1
    if n == 0:
        raise SFTDataError(f"{path} holds no dialogues")


# ---- tokenising, with a cache -------------------------------------------------------------------------------
@dataclass
class TokenizedSource:
    """A source's cached shards: `lengths[split]` holds the token count of each dialogue, in file order among
    those of that split; `stream(split)` reads their tokens and loss masks."""

    source: SFTSource
    folder: Path
    lengths: dict[str, np.ndarray]

    def stream(self, split: str) -> TokenStream:
        return TokenStream(self.folder, split)


def tokenize_source(source: SFTSource, tokenizer, val_fraction: float, seed: int, cache_dir: str | Path,
                    ) -> TokenizedSource:
    """Tokenise `source` into the cache (module docstring), or reuse the cached shards of the same inputs.

    tokenizer: a lmforge Tokenizer. The whole file is checked before any shard is written.
    """
    from lmforge.data.prepare import write_token_documents

    path = Path(source.path)
    dialogues = list(read_dialogues(path))  # checks every record first: a bad line 9000 writes nothing
    key = json.dumps({"format": CACHE_FORMAT, "file": file_sha256(path), "tokenizer": tokenizer.sha256,
                      "learn": source.learn, "val_fraction": val_fraction, "seed": seed}, sort_keys=True)
    folder = Path(cache_dir) / f"sft-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not (folder / "manifest.json").is_file():
        encoded = (encode_chat(tokenizer, d, learn=source.learn) for d in dialogues)
        with atomic_dir(folder) as tmp:  # complete or absent: a crash leaves nothing to reuse by mistake
            write_token_documents(((e.ids, e.loss_mask) for e in encoded), tmp, tokenizer,
                                  val_fraction=val_fraction, seed=seed, name=str(path))
            (tmp / "source.json").write_text(key + "\n")
            write_marker(tmp, "lmforge sft (tokenised dialogues)")
    lengths = {}
    for split in ("train", "validation"):
        ends = TokenStream(folder, split).doc_ends
        lengths[split] = np.diff(ends, prepend=0)
    return TokenizedSource(source, folder, lengths)


# ---- mixing -------------------------------------------------------------------------------------------------
def mix_counts(sizes: list[int], weights: list[float], total: int) -> list[int]:
    """Dialogues per source in an epoch of `total`: proportional to the weights, largest remainders rounding.

    mix_counts([100, 50], [1, 3], 150) == [38, 112] (module docstring)."""
    exact = np.asarray(weights, dtype=np.float64) / sum(weights) * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")  # largest remainder first, ties to the earlier source
    counts[order[: total - counts.sum()]] += 1
    return [int(c) for c in counts]


def mix_epoch(sizes: list[int], weights: list[float], total: int, seed: int, epoch: int) -> np.ndarray:
    """The (source, dialogue) pairs of epoch `epoch`, shuffled: (total, 2) int64, drawn per `mix_counts`."""
    rng = np.random.default_rng([seed, epoch])
    picks = []
    for s, (size, count) in enumerate(zip(sizes, mix_counts(sizes, weights, total))):
        if size == 0 or count == 0:
            continue
        passes = [rng.permutation(size) for _ in range(-(-count // size))]  # ceil(count / size) passes
        chosen = np.concatenate(passes)[:count]
        picks.append(np.stack([np.full(count, s), chosen], axis=1))
    pairs = np.concatenate(picks) if picks else np.zeros((0, 2), dtype=np.int64)
    return pairs[rng.permutation(len(pairs))]
