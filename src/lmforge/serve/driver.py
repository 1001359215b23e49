"""The engine's driver: one background thread owns the `LLMEngine`; the HTTP event loop only talks to it.

    HTTP event loop (many requests)                     engine thread (one)
    ───────────────────────────────                     ────────────────────
    await driver.add(ids, params, rid, stream)          engine.add_request(...)   (errors come back as the
                             ── command ──►             future's exception: ValueError, RequestRefused)
    async for out in stream  ◄── call_soon_threadsafe ─ outputs = engine.step()   (one callback per step
                                                        carries every request's outputs)
    driver.abort(rid)        ── command ──►             engine.abort(rid)         (blocks freed before the
                                                        next step)
    await driver.run(fn)     ── command ──►             fn(engine), e.g. engine.score(...)

The thread runs every queued command, then one step if any request is unfinished, and sleeps on an event
when there is nothing to do. A forward pass therefore never runs on the event loop, and the engine, which is
not thread-safe, is only ever touched by its own thread. `counters` is a copy the thread refreshes after every
step, for /metrics.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Sequence

from lmforge.infer.engine import EngineCounters, LLMEngine, RequestOutput
from lmforge.infer.sampling import SamplingParams

log = logging.getLogger("lmforge.serve")


class EngineFailed(RuntimeError):
    """A step of the engine raised; every request running at that moment ends with this error."""


class RequestStream:
    """The outputs of one or more engine requests (the choices of one HTTP request), in step order; iteration
    ends once each of them has finished or been aborted."""

    def __init__(self):
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.pending: set[str] = set()
        self._error: BaseException | None = None  # met by ready(), raised by the next __anext__

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        while self.pending:
            item = await self.queue.get() if self._error is None else self._error
            out = self._accept(item)
            if out is not None:
                return out
        raise StopAsyncIteration

    def ready(self) -> list[RequestOutput]:
        """The outputs already delivered, taken without waiting: a consumer that fell behind the engine (many
        streams on one event loop) turns several steps' outputs into one chunk instead of one chunk each."""
        outs: list[RequestOutput] = []
        while self.pending and self._error is None and not self.queue.empty():
            item = self.queue.get_nowait()
            if isinstance(item, BaseException):
                self._error = item  # after the outputs before it
            elif (out := self._accept(item)) is not None:
                outs.append(out)
        return outs

    def _accept(self, item: RequestOutput | BaseException) -> RequestOutput | None:
        """The output to hand on (None for one of an aborted request); raises a delivered error."""
        if isinstance(item, BaseException):
            self._error = None
            self.pending.clear()
            raise item
        if item.request_id not in self.pending:
            return None  # an output of a request aborted after it was queued
        if item.finished:
            self.pending.discard(item.request_id)
        return item


class EngineDriver:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[LLMEngine], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closing = False
        self._streams: dict[str, RequestStream] = {}  # touched on the event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.counters: EngineCounters = copy.deepcopy(engine.counters)

    # --- lifecycle (event loop) ----------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = 10.0) -> None:
        """Abort whatever is still running and stop the thread."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    # --- requests (event loop) -----------------------------------------------------------------------------
    async def add(self, prompt_ids: Sequence[int], sampling: SamplingParams, request_id: str,
                  stream: RequestStream) -> None:
        """Queue a request on the engine, its outputs to go to `stream`. Raises what `add_request` raises."""
        self._streams[request_id] = stream
        stream.pending.add(request_id)
        try:
            await self.run(lambda engine: engine.add_request(prompt_ids, sampling, request_id))
        except asyncio.CancelledError:  # the client left while the add was queued: it may still happen
            self.abort(request_id)
            raise
        except BaseException:
            self._forget(request_id)
            raise

    def abort(self, request_id: str) -> None:
        """Finish a request now (its blocks are freed before the next step); its stream gets nothing more.
        (After `close()` there is nothing left to abort: the thread aborted everything on its way out.)"""
        self._forget(request_id)
        if self._thread is not None and self._thread.is_alive():
            self._submit(lambda engine: engine.abort(request_id))

    def _forget(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.pending.discard(request_id)

    async def run(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """fn(engine) on the engine thread, between two steps; its result (or exception)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def command(engine: LLMEngine) -> None:
            try:
                result = fn(engine)
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting request
                self._call(_settle, future, None, e)
            else:
                self._call(_settle, future, result, None)

        self._submit(command)
        return await future

    def _submit(self, command: Callable[[LLMEngine], None]) -> None:
        if self._thread is None or not self._thread.is_alive():
            raise EngineFailed("the engine is not running")
        self._commands.put(command)
        self._wake.set()

    # --- the engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                command(engine)
            if self._closing:
                for rid in list(engine.seqs):
                    engine.abort(rid)
                self._refresh()
                return
            if engine.has_unfinished():
                try:
                    outputs = engine.step()
                except Exception as e:  # noqa: BLE001 - a bug or a device error: fail the running requests
                    log.exception("engine step failed")
                    self._fail_all(engine, e)
                    continue
                self._refresh()
                if outputs:
                    self._call(self._dispatch, outputs)
            else:
                self._refresh()
                self._wake.wait()
                self._wake.clear()

    def _refresh(self) -> None:
        self.counters = copy.deepcopy(self.engine.counters)

    def _fail_all(self, engine: LLMEngine, error: Exception) -> None:
        ids = list(engine.seqs)
        for rid in ids:
            engine.abort(rid)
        self._refresh()
        self._call(self._fail, ids, EngineFailed(f"the engine failed: {type(error).__name__}: {error}"))

    def _call(self, fn, *args) -> None:
        """Run fn(*args) on the event loop (from the engine thread)."""
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    # --- delivery (event loop) -----------------------------------------------------------------------------
    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted by its consumer after this step began
            stream.queue.put_nowait(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail(self, ids: list[str], error: BaseException) -> None:
        for rid in ids:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.queue.put_nowait(error)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


__all__ = ["EngineDriver", "EngineFailed", "RequestStream"]
