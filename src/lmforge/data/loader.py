"""`PackedLoader`: fixed-length training samples cut from the concatenated token stream of a split.

Notation: N tokens in the split (all shards back to back), T = `seq_len`, B = `batch_size` per rank,
W = `world_size`, r = `rank`, S = (N - 1) // T samples per epoch.

Sample i is tokens [i*T, (i+1)*T + 1): inputs = the first T, targets = the last T (shifted by one), so the
samples tile the stream and consecutive samples share one token. Worked example with T = 4, N = 11:

    stream    t0 t1 t2 t3 t4 t5 t6 t7 t8 t9 t10          S = (11 - 1) // 4 = 2
    sample 0  t0 t1 t2 t3 t4          inputs t0..t3, targets t1..t4
    sample 1              t4 t5 t6 t7 t8                 (t9 t10 never used as inputs this epoch)

Order: one infinite stream of samples, epoch e being a permutation of [0, S) seeded by (seed, e). The global
cursor c counts samples consumed by all ranks together; position c is sample perm_{c // S}[c % S]. Global
batch g covers cursor positions [g*B*W, (g+1)*B*W) and rank r takes positions g*B*W + r + k*W, k = 0..B-1:
with W = 2, B = 2 rank 0 gets positions 0, 2 and rank 1 gets 1, 3, then 4, 6 and 5, 7, and so on.

State: `state_dict()` is {"cursor": c, ...}, the same on every rank. Because it counts global samples, a
state saved by W ranks resumes exactly on W ranks, and on W' ranks with B' such that B'*W' = B*W it yields
the same global batches (2 ranks x 4 = 1 rank x 8); with another global batch size it continues from the
same place, still without repeating or skipping a sample.

Per batch (B, T): `inputs`, `targets` int64; `loss_mask` bool, False where the shard's mask file says not to
learn the target token (True everywhere for plain text); `document_ids` int32, 0 for the document at the
sample's first token, +1 at each document start inside the sample (for intra-document attention masks).
Documents are the ones the shard index (.idx) records, so a multi-turn dialogue with several </s> stays one
document. Shards are memory-mapped; only the B samples of a batch are ever copied into RAM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.data.shards import SPLITS, read_manifest


@dataclass
class Batch:
    """One rank's batch: inputs, targets (B, T) int64; loss_mask (B, T) bool; document_ids (B, T) int32;
    positions (B, T) int64 rotary positions, or None for 0..T-1 in every row (a stream cut into samples; packed
    dialogues restart at 0 for each dialogue: lmforge.align.packing)."""

    inputs: Tensor
    targets: Tensor
    loss_mask: Tensor
    document_ids: Tensor
    positions: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        tensors = (self.inputs, self.targets, self.loss_mask, self.document_ids, self.positions)
        return Batch(*(t.to(device, non_blocking=non_blocking) if t is not None else None for t in tensors))


class TokenStream:
    """The shards of one split as a single virtual array of N tokens (memory-mapped, read on demand)."""

    def __init__(self, data_dir: str | os.PathLike[str], split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(data_dir)
        dtype = np.dtype(self.manifest["dtype"])
        self.tokens: list[np.ndarray] = []
        self.masks: list[np.ndarray | None] = []
        doc_ends: list[np.ndarray] = []
        offset = 0
        for entry in self.manifest["splits"][split]["shards"]:
            path = self.data_dir / entry["bin"]
            if not path.is_file() or path.stat().st_size != entry["tokens"] * dtype.itemsize:
                raise ValueError(f"{path} is missing or does not hold the {entry['tokens']} tokens its manifest says")
            self.tokens.append(np.memmap(path, dtype=dtype, mode="r"))
            mask = self.data_dir / entry["mask"] if "mask" in entry else None
            self.masks.append(np.memmap(mask, dtype=np.uint8, mode="r") if mask is not None else None)
            doc_ends.append(np.fromfile(self.data_dir / entry["idx"], dtype=np.int64) + offset)
            offset += entry["tokens"]
        self.starts = np.cumsum([0] + [len(t) for t in self.tokens])  # shard j holds [starts[j], starts[j+1])
        self.doc_ends = np.concatenate(doc_ends) if doc_ends else np.zeros(0, dtype=np.int64)
        self.num_tokens = int(self.starts[-1])

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int64) and learn flags (bool) of global positions [start, stop)."""
        ids = np.empty(stop - start, dtype=np.int64)
        learn = np.ones(stop - start, dtype=bool)
        j = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        while pos < stop:  # a sample may cross shard boundaries (several, if shards are tiny)
            lo, hi = pos - self.starts[j], min(stop, self.starts[j + 1]) - self.starts[j]
            ids[pos - start : pos - start + hi - lo] = self.tokens[j][lo:hi]
            if self.masks[j] is not None:
                learn[pos - start : pos - start + hi - lo] = self.masks[j][lo:hi] != 0
            pos += hi - lo
            j += 1
        return ids, learn

    def document_index(self, start: int, stop: int) -> np.ndarray:
        """Index of the document holding each global position in [start, stop)."""
        return np.searchsorted(self.doc_ends, np.arange(start, stop), side="right")


class PackedLoader:
    """Infinite iterator of `Batch`es of packed samples for one data-parallel rank (see module docstring)."""

    def __init__(self, data_dir: str | os.PathLike[str], split: str = "train", seq_len: int = 2048,
                 batch_size: int = 8, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if seq_len < 1 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need seq_len, batch_size, world_size >= 1 and 0 <= rank < world_size, got "
                             f"seq_len={seq_len} batch_size={batch_size} rank={rank} world_size={world_size}")
        self.stream = TokenStream(data_dir, split)
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.num_samples = (self.stream.num_tokens - 1) // seq_len  # S
        if self.num_samples < 1:
            raise ValueError(f"{data_dir} split {split!r} has {self.stream.num_tokens} tokens, fewer than one "
                             f"sample of seq_len + 1 = {seq_len + 1}")
        self.cursor = 0  # global samples consumed, all ranks together
        self._perm: tuple[int, np.ndarray] | None = None

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> Batch:
        global_batch = self.batch_size * self.world_size
        positions = self.cursor + self.rank + self.world_size * np.arange(self.batch_size)
        rows = [self._sample(self.sample_index(int(p))) for p in positions]
        self.cursor += global_batch
        return Batch(*(torch.from_numpy(np.stack(col)) for col in zip(*rows)))

    def sample_index(self, position: int) -> int:
        """The sample at global cursor `position`: perm_e[position % S] with e = position // S."""
        epoch, i = divmod(position, self.num_samples)
        if not self.shuffle:
            return i
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, rng.permutation(self.num_samples))
        return int(self._perm[1][i])

    def _sample(self, i: int) -> tuple[np.ndarray, ...]:
        start, stop = i * self.seq_len, (i + 1) * self.seq_len + 1
        ids, learn = self.stream.read(start, stop)  # (T + 1,)
        docs = self.stream.document_index(start, stop - 1)  # (T,), for the input positions
        return ids[:-1], ids[1:], learn[1:], (docs - docs[0]).astype(np.int32)

    @property
    def epoch(self) -> int:
        return self.cursor // self.num_samples

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle,
                "num_samples": self.num_samples, "split": self.split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seq_len", "seed", "shuffle", "num_samples", "split"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {mine[key]!r}: "
                                 "resuming would not continue the same sample order")
        self.cursor = int(state["cursor"])
