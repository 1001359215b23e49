"""Packing whole dialogues into fixed-length training rows, and the loader that reads them.

Notation: T = seq_len (input positions per row), L_d the tokens of dialogue d, B rows per rank per batch,
W ranks, r this rank.

A dialogue of L_d tokens gives L_d - 1 (input, target) pairs, so it takes L_d - 1 positions of a row; a row
holds whole dialogues only, never a part of one. Inside a row each dialogue has its own document id, so
attention stays within it, and its rotary positions restart at 0, so a packed dialogue computes exactly what
it computes alone. The rest of a row is padding: its own document id, no loss. Worked example, T = 8,
dialogues a, b, c of 4, 3 and 5 tokens (3, 2 and 4 positions), placed longest first (below):

    row 0   inputs    c0 c1 c2 c3 a0 a1 a2 pad       positions 0 1 2 3 0 1 2 0
            targets   c1 c2 c3 c4 a1 a2 a3 -         doc ids   0 0 0 0 1 1 1 2
    row 1   inputs    b0 b1 pad pad ...              positions 0 1 0 0 ...   doc ids 0 0 1 1 ...

Placement is best-fit decreasing within windows of `window` dialogues of an epoch's order: the window sorted
longest first, each dialogue into the open row with the least room that still fits it, else a new row; the
rows of a window are then shuffled (seeded), so that rows of long dialogues are not all first. Packing
efficiency = real positions / (rows * T). A dialogue with L_d - 1 > T cannot be packed whole: it is dropped
and counted (`PackingStats.dropped`), never cut, because cutting a dialogue would train on an answer whose
end (or whose question) is missing.

The loader (`PackedDialogues`) reads an infinite stream of rows: epoch e's rows come from `plan_epoch(e)`,
one epoch after another. A global cursor c counts rows consumed by all ranks together; global batch g covers
cursor positions [g*B*W, (g+1)*B*W) and rank r takes g*B*W + r + k*W, k = 0..B-1 (as the pre-training loader
does), so a saved cursor resumes exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmforge.data.loader import Batch, TokenStream

PAD_ID = 0  # any valid id: padding positions are never learned and attend only among themselves


@dataclass
class PackingStats:
    """Counts of one packing: rows made, real (input) positions, dialogues packed and dropped as too long."""

    rows: int = 0
    positions: int = 0
    dialogues: int = 0
    dropped: int = 0

    def efficiency(self, seq_len: int) -> float:
        return self.positions / max(1, self.rows * seq_len)


def pack(lengths: Sequence[int], seq_len: int, window: int = 1000, rng: np.random.Generator | None = None
         ) -> tuple[list[list[int]], PackingStats]:
    """Rows of indices into `lengths` (token counts L_d), best-fit decreasing per window (module docstring).

    pack([4, 3, 5], seq_len=8) == ([[2, 0], [1]], ...): 5 -> 4 positions opens row 0, 4 -> 3 positions fits
    in its 4 left, 3 -> 2 positions does not fit in 1 and opens row 1. Without `rng` the rows keep their order.
    """
    stats = PackingStats()
    rows: list[list[int]] = []
    for start in range(0, len(lengths), window):
        idx = [i for i in range(start, min(start + window, len(lengths)))]
        idx.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep their order
        open_rows: list[list[int]] = []
        room: list[int] = []
        for i in idx:
            need = lengths[i] - 1
            if need > seq_len or need < 1:
                stats.dropped += 1
                continue
            fits = [k for k, r in enumerate(room) if r >= need]
            if fits:
                k = min(fits, key=lambda k: room[k])
                open_rows[k].append(i)
                room[k] -= need
            else:
                open_rows.append([i])
                room.append(seq_len - need)
            stats.positions += need
            stats.dialogues += 1
        if rng is not None:
            open_rows = [open_rows[k] for k in rng.permutation(len(open_rows))]
        rows += open_rows
    stats.rows = len(rows)
    return rows, stats


def row_tensors(dialogues: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> tuple[np.ndarray, ...]:
    """inputs, targets, loss mask, document ids, positions (each (T,)) of one row of (ids, learn) dialogues."""
    inputs = np.full(seq_len, PAD_ID, dtype=np.int64)
    targets = np.full(seq_len, PAD_ID, dtype=np.int64)
    mask = np.zeros(seq_len, dtype=bool)
    docs = np.full(seq_len, len(dialogues), dtype=np.int32)  # padding: a document of its own
    positions = np.zeros(seq_len, dtype=np.int64)
    at = 0
    for d, (ids, learn) in enumerate(dialogues):
        n = len(ids) - 1
        inputs[at : at + n], targets[at : at + n], mask[at : at + n] = ids[:-1], ids[1:], learn[1:]
        docs[at : at + n], positions[at : at + n] = d, np.arange(n)
        at += n
    return inputs, targets, mask, docs, positions


class PackedDialogues:
    """Infinite iterator of `Batch`es of packed rows for one data-parallel rank (module docstring).

    streams: one TokenStream per source (the split to read); plan_epoch(e) -> list of rows, each a list of
    (source, dialogue) pairs, deterministic in e.
    """

    def __init__(self, streams: list[TokenStream], plan_epoch: Callable[[int], list[list[tuple[int, int]]]],
                 seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.streams, self.plan_epoch = streams, plan_epoch
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.cursor = 0  # global rows consumed, all ranks together
        self.positions_read = 0  # real (not padding) positions this rank has read: for throughput figures
        self._epochs: dict[int, list[list[tuple[int, int]]]] = {}
        self._starts = [0]  # first global row index of each planned epoch

    def __iter__(self) -> "PackedDialogues":
        return self

    def rows_of_epoch(self, epoch: int) -> list[list[tuple[int, int]]]:
        if epoch not in self._epochs:
            self._epochs = {k: v for k, v in self._epochs.items() if k >= epoch - 1}  # keep memory bounded
            self._epochs[epoch] = self.plan_epoch(epoch)
        return self._epochs[epoch]

    def row(self, index: int) -> list[tuple[int, int]]:
        """The (source, dialogue) pairs of global row `index` (epochs laid end to end)."""
        while self._starts[-1] <= index:
            epoch = len(self._starts) - 1
            n = len(self.rows_of_epoch(epoch))
            if n == 0:
                raise ValueError("an epoch of the SFT data packs into no rows: every dialogue was dropped")
            self._starts.append(self._starts[-1] + n)
        epoch = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.rows_of_epoch(epoch)[index - self._starts[epoch]]

    @property
    def num_samples(self) -> int:
        """Rows of the first epoch: one pass over a validation split (`train.evaluate.split_batches` reads it)."""
        return len(self.rows_of_epoch(0))

    def dialogue(self, source: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        stream = self.streams[source]
        start = int(stream.doc_ends[index - 1]) if index else 0
        return stream.read(start, int(stream.doc_ends[index]))

    def __next__(self) -> Batch:
        positions = self.cursor + self.rank + self.world_size * np.arange(self.batch_size)
        dialogues = [[self.dialogue(s, d) for s, d in self.row(int(p))] for p in positions]
        rows = [row_tensors(row, self.seq_len) for row in dialogues]
        self.positions_read += sum(len(ids) - 1 for row in dialogues for ids, _ in row)
        self.cursor += self.batch_size * self.world_size
        return Batch(*(torch.from_numpy(np.stack(col)) for col in zip(*rows)))

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seq_len", self.seq_len) != self.seq_len:
            raise ValueError(f"loader state has seq_len={state['seq_len']} but this run has {self.seq_len}")
        self.cursor = int(state["cursor"])
