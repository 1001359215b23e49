"""Preference pairs for reward models and DPO: the files users already have, checked, tokenised, mixed, batched.

Formats, one record per line of a .jsonl file or per row of a .parquet file (TRL's preference formats):

    conversational     {"prompt": [messages, ending with the user's], "chosen": [{"role": "assistant", ...}],
                        "rejected": [{"role": "assistant", ...}]}
    text               {"prompt": str, "chosen": str, "rejected": str}          (a user message, two answers)
    implicit prompt    {"chosen": [whole dialogue], "rejected": [whole dialogue]} (the same messages but the
                        last, the answer)

and optionally "degree" (significantly_better | better | slightly_better | negligibly_better: the margin
tables), "margin" (a number: `--loss.margin column`, TRL's column), "safety_bin", "source" and "oracle" (the
world's scores of both answers; reported by `rm eval`); other fields are ignored. A record that breaks a rule stops the run with one line naming the file,
the line (or parquet row) and the field, before anything is written.

A pair is tokenised as two dialogues in Llama 2's chat format, prompt + chosen and prompt + rejected, each
ending with the answer's closing </s> (lmforge.tokenizer.chat.encode_chat, learn="last"): the reward model
reads its score at that last token, DPO sums the log-probabilities of the answer's tokens (`mask`). A pair
with a sequence longer than `seq_len` tokens is dropped and counted, never cut (a cut answer has no end to
score).

Mixing (`mix_epoch` of SFT's sources): an epoch draws N pairs, n_s = N * w_s / sum(w) from source s, repeated
in whole passes or subsampled. N defaults to the first source read once, N = size_0 * sum(w) / w_0, which
writes Llama 2's two mixes directly:

    Helpfulness RM   [helpfulness.jsonl, safety.jsonl] weights [1, 1]      all helpfulness pairs, as many safety
    Safety RM        [safety.jsonl, helpfulness.jsonl] weights [0.9, 0.1] all safety pairs, 10% helpfulness

Worked example: 900 safety and 5000 helpfulness pairs, weights [0.9, 0.1]: N = 900 * 1.0 / 0.9 = 1000, so an
epoch is the 900 safety pairs and 100 of the helpfulness pairs.

Batches (`PairLoader`): a micro-batch of m pairs is one forward of 2m rows, the m chosen sequences then the m
rejected ones, right-padded to the longest (rounded up to a multiple of 8): on a causal model padding after a
sequence changes nothing before it, so no attention mask is needed. The loader's global cursor counts pairs
consumed by all ranks together (rank r of W takes cursor + r + k W, k < m), so a saved cursor resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.align.preference_losses import MarginTable, margin_of
from lmforge.align.sft_data import mix_epoch
from lmforge.align.world.oracle import DEGREES, SAFETY_BINS
from lmforge.data.sources import DataError, iter_records
from lmforge.tokenizer.chat import ChatFormatError, encode_chat, exchanges

PAD_ID = 0  # <unk>: any id works (padding comes after every real token and is never read)
PAD_MULTIPLE = 8  # padded lengths are rounded up to this, so that compiled / CUDA kernels see few shapes


@dataclass
class PreferenceSource:
    """One file of preference pairs in the mix.

    Attributes:
        path: A .jsonl or .parquet file of pairs (module docstring for the formats).
        weight: Share of each epoch's pairs drawn from this file, relative to the other sources' weights.
    """

    path: str
    weight: float = 1.0


@dataclass
class PreferenceDataConfig:
    """The preference pairs to train on.

    Attributes:
        sources: Pair files, each a path or {path, weight}; several are mixed by their weights, the first read
            once per epoch: Llama 2's Helpfulness RM is [helpfulness.jsonl, safety.jsonl] with weights [1, 1], its
            Safety RM [safety.jsonl, helpfulness.jsonl] with weights [0.9, 0.1].
        tokenizer: tokenizer.model to encode with; None takes the one in the init_from model folder.
        val_fraction: Share of each source's pairs held out for validation (a seeded hash of each pair decides).
        epoch_pairs: Pairs per epoch; None: the first source's pairs once, the others in proportion to the weights.
    """

    sources: list[PreferenceSource | str] = field(default_factory=list)
    tokenizer: str | None = None
    val_fraction: float = 0.0
    epoch_pairs: int | None = None

    def __post_init__(self) -> None:
        self.sources = [PreferenceSource(s) if isinstance(s, str) else s for s in self.sources]
        if not 0 <= self.val_fraction < 1 or (self.epoch_pairs is not None and self.epoch_pairs < 1):
            raise PreferenceDataError(f"data.val_fraction must be in [0, 1) and data.epoch_pairs None or >= 1, got "
                                      f"{self.val_fraction} and {self.epoch_pairs}")


class PreferenceDataError(ValueError):
    """A preference file that cannot be trained on; the message names the file, line and field."""


# ---- reading and checking -----------------------------------------------------------------------------------
@dataclass
class PreferenceRecord:
    """One checked pair: the prompt's messages, the two answers' texts, and the optional labels."""

    prompt: list[dict]
    chosen: str
    rejected: str
    degree: str | None = None
    margin: float | None = None
    safety_bin: str | None = None
    source: str | None = None
    where: str = ""
    oracle: dict | None = None  # the chat world's scores of both answers, where `preferences collect` wrote them


def _answer(value: Any, name: str, where: str) -> str:
    """The text of an answer field: a string, or a list of exactly one assistant message."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role") != "assistant":
            raise PreferenceDataError(f"{where}: field {name!r}: its message must have role 'assistant', got "
                                      f"{value[0].get('role')!r}")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise PreferenceDataError(f"{where}: field {name!r} must be a string or a list of one assistant message")
    if not value.strip():
        raise PreferenceDataError(f"{where}: field {name!r} is empty")
    return value


def _prompt(value: Any, where: str, name: str = "prompt") -> list[dict]:
    """The messages of a prompt field (a string is one user message), checked: a dialogue ending with the user."""
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
    if not isinstance(messages, list) or not messages:
        raise PreferenceDataError(f"{where}: field {name!r} must be a string or a non-empty list of messages")
    try:
        exchanges(messages, add_generation_prompt=True)
    except ChatFormatError as e:
        raise PreferenceDataError(f"{where}: field {name!r}: {e}") from None
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise PreferenceDataError(f"{where}: field {name!r}: message {i} ({m['role']}) has empty content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def preference_record(record: dict, where: str) -> PreferenceRecord:
    """One record as a PreferenceRecord (module docstring), checked; PreferenceDataError naming `where`."""
    for name in ("chosen", "rejected"):
        if name not in record:
            fields = ", ".join(sorted(record)) or "none"
            raise PreferenceDataError(f"{where}: missing field {name!r} (fields: {fields})")
    if "prompt" in record:
        prompt = _prompt(record["prompt"], where)
        chosen, rejected = _answer(record["chosen"], "chosen", where), _answer(record["rejected"], "rejected", where)
    else:  # TRL's implicit prompt: two whole dialogues that differ in their last (assistant) message
        c, r = record["chosen"], record["rejected"]
        if not (isinstance(c, list) and isinstance(r, list) and len(c) >= 2 and len(r) >= 2):
            raise PreferenceDataError(f"{where}: without a 'prompt' field, 'chosen' and 'rejected' must be whole "
                                      "dialogues (lists of messages ending with the answer)")
        prompt = _prompt(c[:-1], where, "chosen")
        if _prompt(r[:-1], where, "rejected") != prompt:
            raise PreferenceDataError(f"{where}: field 'rejected': its messages before the answer differ from "
                                      "'chosen''s (an implicit prompt must be the same in both)")
        chosen, rejected = _answer(c[-1:], "chosen", where), _answer(r[-1:], "rejected", where)
    out = PreferenceRecord(prompt, chosen, rejected, where=where)
    for name, allowed in (("degree", DEGREES), ("safety_bin", SAFETY_BINS)):
        if record.get(name) is not None and record[name] not in allowed:
            raise PreferenceDataError(f"{where}: field {name!r} is {record[name]!r}; it must be one of "
                                      f"{', '.join(allowed)}")
    out.degree, out.safety_bin = record.get("degree"), record.get("safety_bin")
    if record.get("margin") is not None:
        m = record["margin"]
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise PreferenceDataError(f"{where}: field 'margin' must be a finite number, got {m!r}")
        out.margin = float(m)
    if record.get("source") is not None:
        out.source = str(record["source"])
    oracle = record.get("oracle")
    if isinstance(oracle, dict) and all(isinstance(oracle.get(k), dict) and isinstance(oracle[k].get("preference"),
                                                                                         (int, float))
                                        for k in ("chosen", "rejected")):
        out.oracle = oracle
    return out


def read_preferences(path: str | Path) -> list[PreferenceRecord]:
    """Every pair of a .jsonl / .parquet file, checked (PreferenceDataError at the first bad record)."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"{path}: no such file (preference data is a .jsonl or .parquet file of pairs)")
    if path.suffix.lower() not in (".jsonl", ".parquet"):
        raise PreferenceDataError(f"{path}: expected a .jsonl or .parquet file of preference pairs")
    try:
        records = [preference_record(r, where) for where, r in iter_records(path)]
    except DataError as e:
        raise PreferenceDataError(str(e)) from None
    if not records:
        raise PreferenceDataError(f"{path} holds no preference pairs")
    return records


# ---- tokenising ---------------------------------------------------------------------------------------------
@dataclass
class TokenizedPair:
    """A pair as token ids: `ids[k]` and `mask[k]` (k = 0 chosen, 1 rejected), the mask True on the answer's
    tokens and its closing </s>; `margin` the loss margin; `record` the labels."""

    ids: tuple[np.ndarray, np.ndarray]
    mask: tuple[np.ndarray, np.ndarray]
    margin: float
    record: PreferenceRecord
    reference: tuple[float, float] | None = None  # DPO: the reference model's log-probs of both answers


@dataclass
class PairSet:
    """The tokenised pairs of one source, split into "train" and "validation", and the pairs dropped as too long."""

    source: PreferenceSource | None
    splits: dict[str, list[TokenizedPair]]
    dropped: int = 0


def _held_out(record: PreferenceRecord, seed: int, val_fraction: float) -> bool:
    if val_fraction == 0:
        return False
    key = json.dumps([seed, record.prompt, record.chosen, record.rejected])
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16**12 < val_fraction


def tokenize_pairs(records: list[PreferenceRecord], tokenizer, seq_len: int, margin: MarginTable = "none",
                   seed: int = 0, val_fraction: float = 0.0, source: PreferenceSource | None = None) -> PairSet:
    """Tokenise checked records (module docstring); margins from the table `margin` (a missing degree or margin
    is one PreferenceDataError naming the record)."""
    out = PairSet(source, {"train": [], "validation": []})
    for r in records:
        try:
            m = margin_of(r.degree, margin, r.margin)
        except ValueError as e:
            raise PreferenceDataError(f"{r.where}: {e}") from None
        encoded = [encode_chat(tokenizer, [*r.prompt, {"role": "assistant", "content": a}], learn="last")
                   for a in (r.chosen, r.rejected)]
        if max(len(e.ids) for e in encoded) > seq_len:
            out.dropped += 1
            continue
        pair = TokenizedPair(tuple(np.asarray(e.ids, dtype=np.int64) for e in encoded),
                             tuple(np.asarray(e.loss_mask, dtype=bool) for e in encoded), m, r)
        out.splits["validation" if _held_out(r, seed, val_fraction) else "train"].append(pair)
    return out


def load_pair_sets(data: PreferenceDataConfig, tokenizer, seq_len: int, margin: MarginTable, seed: int) -> list[PairSet]:
    """Every source of `data`, read, checked and tokenised; a mix with no training pair is refused."""
    if not data.sources:
        raise PreferenceDataError("data.sources is empty: give one or more preference files (--data.sources "
                                  "pairs.jsonl)")
    for s in data.sources:
        if not s.weight > 0:
            raise PreferenceDataError(f"data.sources: the weight of {s.path} must be > 0, got {s.weight}")
    sets = [tokenize_pairs(read_preferences(s.path), tokenizer, seq_len, margin, seed, data.val_fraction, s)
            for s in data.sources]
    if not sets[0].splits["train"]:
        raise PreferenceDataError(f"{data.sources[0].path}: no training pairs (all longer than train.seq_len "
                                  f"{seq_len}, or held out by data.val_fraction)")
    return sets


def epoch_size(sizes: list[int], weights: list[float], epoch_pairs: int | None) -> int:
    """Pairs per epoch: `epoch_pairs`, or the first source once, the others in proportion (module docstring).

    epoch_size([900, 5000], [0.9, 0.1], None) == 1000."""
    return epoch_pairs or max(1, round(sizes[0] * sum(weights) / weights[0]))


# ---- batches ------------------------------------------------------------------------------------------------
@dataclass
class PairBatch:
    """m pairs as one forward's rows: `tokens` (2m, T) int64, the m chosen sequences then the m rejected ones,
    right-padded with PAD_ID; `lengths` (2m,) their real lengths (the reward is read at lengths - 1); `mask`
    (2m, T) bool, True on the answer tokens; `margin` (m,) float32; `pairs` the TokenizedPairs; `reference`
    (2m,) float32 the reference model's log-probs of the rows (DPO), once they are known."""

    tokens: Tensor
    lengths: Tensor
    mask: Tensor
    margin: Tensor
    pairs: list[TokenizedPair]
    reference: Tensor | None = None

    def to(self, device: torch.device) -> "PairBatch":
        ref = self.reference.to(device) if self.reference is not None else None
        return PairBatch(self.tokens.to(device), self.lengths.to(device), self.mask.to(device),
                         self.margin.to(device), self.pairs, ref)


def pair_batch(pairs: list[TokenizedPair]) -> PairBatch:
    """The rows of `pairs` (PairBatch), chosen sequences first."""
    seqs = [p.ids[0] for p in pairs] + [p.ids[1] for p in pairs]
    masks = [p.mask[0] for p in pairs] + [p.mask[1] for p in pairs]
    T = -(-max(len(s) for s in seqs) // PAD_MULTIPLE) * PAD_MULTIPLE
    tokens = np.full((len(seqs), T), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        tokens[i, : len(s)], mask[i, : len(s)] = s, m
    reference = None
    if all(p.reference is not None for p in pairs):
        reference = torch.tensor([p.reference[0] for p in pairs] + [p.reference[1] for p in pairs])
    return PairBatch(torch.from_numpy(tokens), torch.tensor([len(s) for s in seqs]), torch.from_numpy(mask),
                     torch.tensor([p.margin for p in pairs], dtype=torch.float32), pairs, reference)


class PairLoader:
    """Infinite iterator of `PairBatch`es of `batch_size` pairs for one data-parallel rank (module docstring).

    sets: the sources' PairSets; weights, per_epoch, seed: the mix of each epoch (`mix_epoch`).
    """

    def __init__(self, sets: list[PairSet], weights: list[float], per_epoch: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, split: str = "train"):
        self.sets, self.split = sets, split
        self.sizes = [len(s.splits[split]) for s in sets]
        self.weights = [w if n else 0.0 for w, n in zip(weights, self.sizes)]
        self.per_epoch, self.batch_size, self.seed = per_epoch, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.cursor = 0  # global pairs consumed, all ranks together
        self.tokens_read = 0  # real (not padding) tokens this rank has read: for throughput figures
        self._epoch: tuple[int, np.ndarray] | None = None

    def __iter__(self) -> "PairLoader":
        return self

    def pairs_of_epoch(self, epoch: int) -> np.ndarray:
        """(per_epoch, 2) (source, pair) indices of epoch `epoch`, shuffled."""
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, mix_epoch(self.sizes, self.weights, self.per_epoch, self.seed, epoch))
        return self._epoch[1]

    def pair(self, index: int) -> TokenizedPair:
        """Global pair `index` of the stream (epochs laid end to end)."""
        s, i = self.pairs_of_epoch(index // self.per_epoch)[index % self.per_epoch]
        return self.sets[s].splits[self.split][i]

    def __next__(self) -> PairBatch:
        picked = [self.pair(self.cursor + self.rank + self.world_size * k) for k in range(self.batch_size)]
        self.cursor += self.batch_size * self.world_size
        self.tokens_read += sum(len(p.ids[0]) + len(p.ids[1]) for p in picked)
        return pair_batch(picked)

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "per_epoch": self.per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("per_epoch", self.per_epoch) != self.per_epoch:
            raise PreferenceDataError(f"the checkpoint's data mix has {state['per_epoch']} pairs an epoch, this run "
                                      f"{self.per_epoch}: resume with the same data and settings")
        self.cursor = int(state["cursor"])


def batches_of(pairs: list[TokenizedPair], batch_size: int) -> list[PairBatch]:
    """`pairs` in order as batches of `batch_size` pairs (the last may be smaller)."""
    return [pair_batch(pairs[i : i + batch_size]) for i in range(0, len(pairs), batch_size)]


__all__ = ["PAD_ID", "PairBatch", "batches_of", "PairLoader", "PairSet", "PreferenceDataConfig", "PreferenceDataError",
           "PreferenceRecord", "PreferenceSource", "TokenizedPair", "epoch_size", "load_pair_sets", "pair_batch",
           "preference_record", "read_preferences", "tokenize_pairs"]
