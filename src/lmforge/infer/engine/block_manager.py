"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, block tables, prefix sharing, window freeing.

Notation: bs = `block_size` tokens per block, N = `num_blocks`, W the sliding window, c a sequence's computed
tokens, n the tokens a step adds.

A sequence's keys / values live in blocks of the pool; its block table maps logical block i (positions
[i * bs, (i + 1) * bs)) to a pool block, and the slot of position p is

    slot(p) = block_table[p // bs] * bs + p % bs

Worked example, bs = 4, block_table = [7, 2, 9]: position 0 -> slot 28, position 5 -> block 2, offset 1 ->
slot 9, position 11 -> slot 39. Holding c + n positions takes ceil((c + n) / bs) blocks: c = 5, n = 4 needs
ceil(9 / 4) = 3, so a table of 2 entries grows by one block.

Reference counts. A block may appear in several tables (shared prefix); `ref[b]` is how many, and a block is
free exactly when `ref[b] == 0` (asserted by `check_invariants`).

Prefix sharing (full-attention models). Once every position of a sequence's block i is computed, the block is
registered under its chain key (hash of block i - 1's key, the bs token ids of block i): two sequences with the
same first k * bs tokens have the same first k keys. A new sequence looks up its full prompt blocks and shares
the hits (ref + 1) instead of computing them. Worked example, bs = 4, prompt A = [1 2 3 4 5 6 7 8 9] computed:
keys K0 = (None, (1 2 3 4)), K1 = (hash K0, (5 6 7 8)) registered. Prompt B = [1 2 3 4 5 6 7 8 0 0]: both
hits, B starts with c = 8 and computes only [0 0]. A freed block keeps its key and stays findable until the
pool hands it out again (least recently freed first), so a finished or preempted prompt can still be reused.
NOTE: only blocks whose K/V are computed are registered, so a sequence never reads a block that another
sequence is still filling in the same step; and lookups stop before the prompt's last token, so every request
computes at least one token (the logits it samples from) and never writes into a shared block.

Forks and copy-on-write (K samples of one prompt, sequence.py). `fork(src, dst)` gives dst src's whole table,
every block one reference more; blocks are then shared in full, the prompt's last, partly filled block
included. The first sequence to write into a block that others still hold takes a fresh block and the shared
one is copied into it before the step runs (`copies`, done by the runner); the last holder writes in place.
Worked example, bs = 4, prompt of 6 tokens in blocks [7, 2] (block 2 holds positions 4, 5), forked to r0, r1,
r2: ref[7] = ref[2] = 3. The next step writes position 6 for all three: r0 takes block 5 (copy 2 -> 5,
ref[2] = 2), r1 takes block 8 (copy 2 -> 8, ref[2] = 1), r2 writes into block 2 itself. Tables [7, 5],
[7, 8], [7, 2]; block 7 stays shared (ref 3) and is never written again.

Sliding window. Position p attends to keys j > p - W, so when the next position to compute is c, block i is
needed no more once (i + 1) * bs <= c - W + 1. It is freed and its table entry becomes -1. Worked example,
W = 8, bs = 4, c = 13: keys from position 6 on are needed; block 0 (positions 0..3) is freed, block 1
(4..7) stays. A window model's live blocks per sequence are at most ceil((W - 1 + n) / bs) + 1.
NOTE: prefix sharing is off for window models: their early blocks are freed as they are passed.
"""

from __future__ import annotations

from collections import OrderedDict

from lmforge.infer.engine.sequence import Sequence

BlockKey = tuple[int | None, tuple[int, ...]]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, window: int | None = None, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size, self.window = num_blocks, block_size, window
        self.enable_prefix_caching = enable_prefix_caching and window is None
        self.ref = [0] * num_blocks
        # Blocks with ref 0, least recently freed first: the next fresh block is taken from the front.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[BlockKey, int] = {}  # prefix cache: chain key -> block holding those K/V
        self.block_key: list[BlockKey | None] = [None] * num_blocks
        self.prefix_hits = 0  # blocks reused from the prefix cache (a counter for metrics)
        self.copies: list[tuple[int, int]] = []  # (src, dst) block copies owed before the next step runs

    # --- queries -------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_to_add(self, seq: Sequence, n: int) -> int:
        """Fresh blocks needed to hold positions up to c + n - 1: ceil((c + n) / bs) - len(table)."""
        total = -(-(seq.num_computed_tokens + n) // self.block_size)
        return max(0, total - len(seq.block_table))

    def slot(self, seq: Sequence, pos: int) -> int:
        block = seq.block_table[pos // self.block_size]
        assert block >= 0, f"position {pos} of {seq.request_id} lies in a freed block"
        return block * self.block_size + pos % self.block_size

    def max_blocks_per_seq(self, num_tokens: int, max_chunk: int) -> int:
        """Most blocks one sequence of `num_tokens` tokens can hold at once (chunks of at most `max_chunk`)."""
        full = -(-num_tokens // self.block_size)
        if self.window is None:
            return full
        return min(full, -(-(self.window - 1 + max_chunk) // self.block_size) + 1)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of seq's tokens, excluding its last token (see above)."""
        if not self.enable_prefix_caching:
            return []
        tokens, bs = seq.token_ids, self.block_size
        hits: list[int] = []
        parent: int | None = None
        for i in range((len(tokens) - 1) // bs):
            key = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
            block = self.cached.get(key)
            if block is None:
                break
            hits.append(block)
            parent = hash(key)
        return hits

    # --- allocation ----------------------------------------------------------------------------------------
    def admit(self, seq: Sequence, hits: list[int], n: int, reserve: int = 0) -> bool:
        """Give a waiting sequence (no blocks) the shared `hits` plus fresh blocks for n more tokens, keeping
        `reserve` blocks free; on failure change nothing. Sets c = len(hits) * bs."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        bs = self.block_size
        fresh = -(-(len(hits) * bs + n) // bs) - len(hits)
        revived = sum(1 for b in hits if self.ref[b] == 0)  # cached but free: leaving the free pool too
        if len(self.free) - revived - fresh < reserve:
            return False
        parent: int | None = None
        for b in hits:
            self.free.pop(b, None)
            self.ref[b] += 1
            parent = hash(self.block_key[b])
            seq.block_hashes.append(parent)
        self.prefix_hits += len(hits)
        seq.block_table = list(hits) + [self._take() for _ in range(fresh)]
        seq.num_computed_tokens = len(hits) * bs
        return True

    def append(self, seq: Sequence, n: int) -> bool:
        """Grow a running sequence's table to hold n more tokens; False (and no change) if blocks are short.
        The first new position may land in a block other sequences share (a fork): that block is copied."""
        c, bs = seq.num_computed_tokens, self.block_size
        shared = c % bs != 0 and self.ref[seq.block_table[c // bs]] > 1
        need = self.blocks_to_add(seq, n) + shared
        if need > len(self.free):
            return False
        if shared:
            # NOTE: should seq be preempted later in this schedule, the copy still runs, into a block that is
            # free or newly handed out; either way nothing reads it before it is written again.
            old, new = seq.block_table[c // bs], self._take()
            self._release(old)
            seq.block_table[c // bs] = new
            self.copies.append((old, new))
        seq.block_table.extend(self._take() for _ in range(self.blocks_to_add(seq, n)))
        return True

    def fork(self, src: Sequence, dst: Sequence) -> None:
        """Give dst (no blocks yet) src's blocks, each one reference more, and src's computed tokens."""
        assert not dst.block_table and dst.num_computed_tokens == 0
        for b in src.block_table:
            if b >= 0:
                self.ref[b] += 1
        dst.block_table, dst.block_hashes = list(src.block_table), list(src.block_hashes)
        dst.num_computed_tokens = src.num_computed_tokens

    def take_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) block copies owed since the last call; the runner copies them before the step."""
        copies, self.copies = self.copies, []
        return copies

    def free_seq(self, seq: Sequence) -> None:
        """Release every block of a finished, aborted or preempted sequence (shared blocks lose one ref)."""
        for b in reversed(seq.block_table):  # NOTE: last block first, so prefix blocks are evicted last
            if b >= 0:
                self._release(b)
        seq.block_table, seq.block_hashes = [], []
        seq.num_computed_tokens = 0

    def on_computed(self, seq: Sequence) -> None:
        """After a step advanced c: register newly completed blocks, free blocks that left the window."""
        bs, c = self.block_size, seq.num_computed_tokens
        if self.enable_prefix_caching:
            tokens = seq.token_ids
            for i in range(len(seq.block_hashes), c // bs):
                parent = seq.block_hashes[-1] if seq.block_hashes else None
                key = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
                seq.block_hashes.append(hash(key))
                block = seq.block_table[i]
                if key not in self.cached and self.block_key[block] is None:
                    self.cached[key] = block
                    self.block_key[block] = key
        if self.window is not None:
            first_needed = c - self.window + 1  # the smallest key position the next query can see
            i = 0
            while (i + 1) * bs <= first_needed and i < len(seq.block_table):
                if seq.block_table[i] >= 0:
                    self._release(seq.block_table[i])
                    seq.block_table[i] = -1
                i += 1

    def reset_prefix_cache(self) -> None:
        """Forget every cached key (after a weight update the cached K/V belong to the old model)."""
        self.cached.clear()
        self.block_key = [None] * self.num_blocks

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        if self.block_key[block] is not None:  # evict it from the prefix cache
            del self.cached[self.block_key[block]]
            self.block_key[block] = None
        self.ref[block] = 1
        return block

    def _release(self, block: int) -> None:
        assert self.ref[block] > 0, f"block {block} released more often than taken"
        self.ref[block] -= 1
        if self.ref[block] == 0:
            self.free[block] = None

    # --- invariants ----------------------------------------------------------------------------------------
    def check_invariants(self, live: list[Sequence]) -> None:
        """Every ref count equals the block's uses in `live` tables; free blocks are exactly those with ref 0;
        the prefix cache and block keys agree; window models hold a bounded number of blocks per sequence."""
        uses = [0] * self.num_blocks
        for seq in live:
            for b in seq.block_table:
                if b >= 0:
                    uses[b] += 1
            assert len(seq.block_table) * self.block_size >= seq.num_computed_tokens, seq.request_id
        assert uses == self.ref, "reference counts differ from the block tables"
        assert set(self.free) == {b for b in range(self.num_blocks) if self.ref[b] == 0}, "free list is wrong"
        for key, b in self.cached.items():
            assert self.block_key[b] == key, f"prefix cache entry of block {b} is stale"
        if self.window is not None:  # exactly the blocks before the window's first needed key are freed
            for seq in live:
                first_live = max(0, seq.num_computed_tokens - self.window + 1) // self.block_size
                expected = [i >= first_live for i in range(len(seq.block_table))]
                live = [b >= 0 for b in seq.block_table]
                assert live == expected, f"{seq.request_id}: window blocks {seq.block_table}"


__all__ = ["BlockManager"]
