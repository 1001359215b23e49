"""Work on all cores, results in input order: the process pool of the data verbs (`data prepare`, `data audit`).

    tasks = batches(documents, size=len)                      # lists of items, ~256 KiB of text each
    for result in ordered_map(work, tasks, workers, init, (arg,)):
        ...                                                   # work(task) of each task, in task order

P = `workers` processes, each set up once by `initializer(*initargs)` (a tokenizer, a language model), take
the tasks; at most 2P tasks are in flight, so a corpus larger than memory streams through; the results come
back in the order of the tasks, so whatever the caller builds from them (token shards, summed counts) is the
same for any number of workers. `workers == 1` runs everything in this process, with the same initializer.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

BATCH_BYTES = 1 << 18  # text per task sent to a worker (256 KiB): amortises pickling, keeps workers balanced


def batches(items: Iterable[T], size: Callable[[T], int], limit: int | None = None) -> Iterator[list[T]]:
    """`items` in consecutive lists, each closed once the sizes of its items add up to `limit` (default
    BATCH_BYTES) or more.

    Worked example with limit 10 and sizes 4 6 3 9 2: [4, 6] (10), [3, 9] (12), [2] (the rest).
    """
    limit = BATCH_BYTES if limit is None else limit  # read when called, so that tests can make batches small
    batch: list[T] = []
    total = 0
    for item in items:
        batch.append(item)
        total += size(item)
        if total >= limit:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


def ordered_map(func: Callable[[Any], R], tasks: Iterable[Any], workers: int,
                initializer: Callable[..., None], initargs: tuple = ()) -> Iterator[R]:
    """func(task) for each task, in task order, computed by `workers` processes (module docstring)."""
    if workers == 1:
        initializer(*initargs)
        for task in tasks:
            yield func(task)
        return
    # NOTE: "fork" where available: workers start in milliseconds instead of re-importing torch (spawn,
    # forkserver). Callers' workers run only SentencePiece, regular expressions and language identification,
    # never torch, so forking a parent that imported torch is safe.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(func, (task,)))
            if len(pending) >= 2 * workers:  # bounded: Pool.imap would read the whole corpus ahead
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
