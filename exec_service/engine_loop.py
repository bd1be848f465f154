"""The thread ↔ asyncio bridge: the engine runs ``step()`` on its own thread; streams wait on asyncio.

* The **engine loop** (one thread) owns the engine: it takes new requests and aborts from a queue
  between steps, runs ``engine.step()`` and hands the whole step's outputs to the event loop in ONE
  ``call_soon_threadsafe`` (one wake-up of the event loop per step, not one per stream: each wake-up
  is a self-pipe write, a context switch and a GIL hand-over that the engine thread pays for too).
  Nothing on the gRPC side can delay a forward pass.
* A **Subscription** is one request's asyncio side: ``next()`` waits for outputs and returns every
  one that piled up (a lagging client gets them in one message, in order); ``abort()`` stops the
  request unless it finished.

Failures are exceptions on the asyncio side: ``EngineRejected`` (the engine refused the request,
INVALID_ARGUMENT) and ``EngineFailed`` (the loop died: every stream fails, liveness goes false).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from exec_service.engine import Engine, Request, RequestOutput
from exec_service.engine.types import SpeculationStats

log = logging.getLogger("neuron_serve.exec")


class EngineRejected(ValueError):
    """The engine cannot take this request (its message names the limit)."""


class EngineFailed(RuntimeError):
    """The engine loop died; the message says why."""


@dataclass(frozen=True)
class Delivered:
    """One engine output and the time the step that produced it started."""

    output: RequestOutput
    step_started: float


# what a subscription receives: an output, or the error that ends it
_Item = Delivered | BaseException


@dataclass(frozen=True)
class _Add:
    request: Request
    sub: Subscription


def _put_all(batch: Sequence[tuple[Subscription, _Item]]) -> None:
    """Event loop thread: one step's items, in the engine's order."""
    for sub, item in batch:
        sub._put(item)


def _post(aio: asyncio.AbstractEventLoop, batch: list[tuple[Subscription, _Item]]) -> None:
    """Engine thread: hand ``batch`` to ``aio`` in one ``call_soon_threadsafe``. A closed event loop
    has nobody left to listen (the server stopped); the engine loop must not die of it."""
    try:
        aio.call_soon_threadsafe(_put_all, batch)
    except RuntimeError:  # "Event loop is closed"
        if not aio.is_closed():
            raise


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class Counts:
    """The engine's counters as of the last step (written by the loop thread only)."""

    running: int = 0
    waiting: int = 0
    free_slots: int = 0
    speculation: SpeculationStats = field(default_factory=SpeculationStats)  # cumulative


class EngineLoop:
    """Runs ``engine.step()`` on its own thread; requests and aborts arrive between steps."""

    # Idle when a request arrives: wait until no further request has come for BURST_QUIET_S (at most
    # BURST_WINDOW_S), so that N streams a client starts together are prefilled in one step instead
    # of one, then N - 1 (8 gRPC streams arrive within a few ms here; a lone request waits 2 ms).
    BURST_QUIET_S = 0.002
    BURST_WINDOW_S = 0.010

    def __init__(self, engine: Engine, on_step: Callable[[Counts], None] | None = None) -> None:
        self.engine = engine
        self._on_step = on_step
        self._cmds: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._subs: dict[str, Subscription] = {}
        self.error: BaseException | None = None
        self.counts = Counts(free_slots=engine.config.max_batch_size)
        # prompt tokens submitted but not yet admitted into a slot (admission control)
        self._pending_tokens: dict[str, int] = {}
        self.waiting_prompt_tokens = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def subscribe(self, request: Request) -> Subscription:
        """Submit ``request`` (call on the event loop's thread); its outputs arrive on the result."""
        assert request.request_id is not None, "the servicer names every engine request"
        sub = Subscription(self, request.request_id, asyncio.get_running_loop())
        with self._lock:
            self._pending_tokens[request.request_id] = len(request.prompt_token_ids)
            self.waiting_prompt_tokens += len(request.prompt_token_ids)
        self._cmds.put(_Add(request, sub))
        self._wake.set()
        return sub

    def abort(self, request_id: str) -> None:
        self._cmds.put(_Abort(request_id))
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the loop thread ------------------------------------------------------------------------

    def _admitted(self, rid: str) -> None:
        if rid not in self._pending_tokens:  # only this thread removes entries
            return
        with self._lock:
            self.waiting_prompt_tokens -= self._pending_tokens.pop(rid, 0)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished():
                    self._snapshot()
                    if self._wake.wait(0.25):
                        self._gather_burst()
                    self._wake.clear()
                    continue
                started = time.monotonic()
                outputs = self.engine.step()
                self._snapshot()  # before the streams hear of it: a client then sees freed slots
                self._deliver(outputs, started)
        except BaseException as e:  # the engine is broken: fail every stream, liveness goes false
            self.error = e
            log.exception("engine loop died")
            failed = EngineFailed(f"the engine failed: {type(e).__name__}: {e}")
            subs = list(self._subs.values())
            self._subs.clear()
            while True:  # anything submitted meanwhile fails too
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    break
                if isinstance(cmd, _Add):
                    subs.append(cmd.sub)
            self._post_grouped((sub, failed) for sub in subs)

    def _gather_burst(self) -> None:
        """Idle and woken by a submission: let the rest of a burst arrive (see BURST_QUIET_S)."""
        deadline = time.monotonic() + self.BURST_WINDOW_S
        seen = -1
        while (n := self._cmds.qsize()) != seen and time.monotonic() < deadline:
            seen = n
            time.sleep(self.BURST_QUIET_S)

    def _deliver(self, outputs: Sequence[RequestOutput], started: float) -> None:
        """All of one step's outputs reach the event loop together, in one hand-over."""
        subs = self._subs
        items: list[tuple[Subscription, _Item]] = []
        for out in outputs:
            rid = out.request_id
            sub = subs.pop(rid, None) if out.finished else subs.get(rid)
            if out.finished or out.new_token_ids:
                self._admitted(rid)
            if sub is not None:
                items.append((sub, Delivered(out, started)))
        self._post_grouped(items)

    @staticmethod
    def _post_grouped(items) -> None:
        """One ``call_soon_threadsafe`` per event loop (a server has one; tests may have several)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Subscription, _Item]]] = {}
        for sub, item in items:
            by_loop.setdefault(sub.aio, []).append((sub, item))
        for aio, batch in by_loop.items():
            _post(aio, batch)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Abort):
                self.engine.abort(cmd.request_id)
                continue
            rid = cmd.request.request_id or ""
            try:
                self.engine.add_request(cmd.request)
            except ValueError as e:
                self._admitted(rid)
                _post(cmd.sub.aio, [(cmd.sub, EngineRejected(str(e)))])
                continue
            self._subs[rid] = cmd.sub

    def _snapshot(self) -> None:
        e = self.engine
        self.counts = Counts(e.num_running, e.num_waiting, e.free_slots, e.speculation_stats)
        if self._on_step is not None:
            self._on_step(self.counts)


class Subscription:
    """One request's outputs on the asyncio side."""

    def __init__(self, loop: EngineLoop, request_id: str, aio_loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self.request_id, self.aio = loop, request_id, aio_loop
        # a plain deque and one future to wake the reader: what asyncio.Queue does, without its
        # getter/putter bookkeeping on every token
        self._items: collections.deque[_Item] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.finished = False

    def _put(self, item: _Item) -> None:
        """Event loop thread (the engine thread posts through ``call_soon_threadsafe``)."""
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def next(self, timeout: float | None = None) -> list[Delivered]:
        """Waits (up to ``timeout`` s: TimeoutError) for outputs; returns all that are queued, up to
        and including the final one, oldest first. Raises EngineRejected / EngineFailed."""
        items = self._items
        if not items:
            w = self._waiter = self.aio.create_future()
            try:
                if timeout is None:
                    await w
                else:
                    await asyncio.wait_for(w, timeout)
            finally:
                self._waiter = None
        out: list[Delivered] = []
        while items:
            item = items.popleft()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            out.append(item)
            if item.output.finished:
                self.finished = True
                break
        return out

    def abort(self) -> None:
        """Stop the engine request (its slot is freed at the next step); idempotent."""
        if not self.finished:
            self.finished = True
            self._loop.abort(self.request_id)
