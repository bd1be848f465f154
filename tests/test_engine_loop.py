"""The engine thread ↔ asyncio bridge (``exec_service.engine_loop``) over a scripted engine: one
hand-over per step for all streams, every token in order for a lagging reader, errors."""

from __future__ import annotations

import asyncio
import threading

import pytest

from exec_service.engine import FinishReason, Request, RequestOutput, StoppingCriteria
from exec_service.engine.types import SpeculationStats
from exec_service.engine_loop import EngineFailed, EngineLoop, EngineRejected


class _Config:
    max_batch_size = 8


class ScriptedEngine:
    """Emits one token per running request per step (token = 1000 * request index + step); each
    step waits for the test's go-ahead when ``gated``."""

    speculation_stats = SpeculationStats()  # the Engine's counters (none: no speculation here)

    def __init__(self, gated: bool = False, fail_at: int | None = None) -> None:
        self.config = _Config()
        self.gated = gated
        self.go = threading.Semaphore(0)
        self.fail_at = fail_at
        self.steps = 0
        self.running: dict[str, list] = {}
        self.order: list[str] = []

    def add_request(self, req: Request) -> str:
        if len(req.prompt_token_ids) > 100:
            raise ValueError("the prompt is longer than 100 tokens")
        self.order.append(req.request_id)
        self.running[req.request_id] = [len(self.order) - 1, 0, req.stopping.max_new_tokens]
        return req.request_id

    def abort(self, rid: str) -> bool:
        return self.running.pop(rid, None) is not None

    def has_unfinished(self) -> bool:
        return bool(self.running)

    num_running = property(lambda self: len(self.running))
    num_waiting = property(lambda self: 0)
    free_slots = property(lambda self: 8 - len(self.running))

    def step(self) -> list[RequestOutput]:
        if self.gated:
            assert self.go.acquire(timeout=30)
        self.steps += 1
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise RuntimeError("device lost")
        outs = []
        for rid, st in list(self.running.items()):
            st[1] += 1
            done = st[1] >= st[2]
            outs.append(
                RequestOutput(
                    rid, (1000 * st[0] + st[1],), None, FinishReason.LENGTH if done else None, 3, st[1], 0
                )
            )
            if done:
                del self.running[rid]
        return outs


def _req(i: int, n: int, prompt: int = 3) -> Request:
    return Request(
        tuple(range(1, prompt + 1)), stopping=StoppingCriteria(max_new_tokens=n), request_id=f"r{i}"
    )


async def _queued(sub, tokens: int, timeout: float = 30) -> None:
    """Until ``tokens`` tokens wait in the subscription (handed over, not yet read)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while sum(len(d.output.new_token_ids) for d in sub._items) < tokens:
        assert asyncio.get_running_loop().time() < deadline, "the outputs never arrived"
        await asyncio.sleep(0.005)


async def _drain(sub) -> list[list[int]]:
    """Every next() result, as the token ids of each delivered output."""
    got = []
    while not sub.finished:
        got.append([t for d in await sub.next(30) for t in d.output.new_token_ids])
    return got


def test_one_handover_per_step_for_all_streams() -> None:
    async def main():
        aio = asyncio.get_running_loop()
        calls = []
        real = aio.call_soon_threadsafe

        def counting(cb, *args, **kw):
            calls.append(len(args[0]) if args else 0)
            return real(cb, *args, **kw)

        aio.call_soon_threadsafe = counting  # type: ignore[method-assign]
        eng = ScriptedEngine(gated=True)
        loop = EngineLoop(eng)
        subs = [loop.subscribe(_req(i, 5)) for i in range(8)]  # all 8 are there for the first step
        loop.start()
        try:
            for step in range(1, 6):
                eng.go.release()
                got = [await s.next(30) for s in subs]
                # all 8 outputs of this step arrived in one hand-over, none later than the first
                assert [len(g) for g in got] == [1] * 8
                assert [g[0].output.new_token_ids for g in got] == [(1000 * i + step,) for i in range(8)]
            assert all(s.finished for s in subs)
            assert calls == [8] * 5  # one call_soon_threadsafe per step, carrying all 8 outputs
        finally:
            loop.stop()

    asyncio.run(main())


def test_lagging_reader_gets_every_token_in_order() -> None:
    async def main():
        eng = ScriptedEngine()
        loop = EngineLoop(eng)
        loop.start()
        try:
            fast, slow = loop.subscribe(_req(0, 40)), loop.subscribe(_req(1, 40))
            fast_got = await _drain(fast)
            assert [t for g in fast_got for t in g] == list(range(1, 41))
            # the slow reader had not asked yet: everything piled up and comes in one batch
            await _queued(slow, 40)
            slow_got = await _drain(slow)
            assert slow_got == [[1000 + k for k in range(1, 41)]]
        finally:
            loop.stop()

    asyncio.run(main())


def test_reader_that_reads_every_few_steps() -> None:
    async def main():
        eng = ScriptedEngine(gated=True)
        loop = EngineLoop(eng)
        sub = loop.subscribe(_req(0, 12))
        loop.start()
        try:
            batches = []
            for chunk in (1, 3, 5, 3):
                eng.go.release(chunk)
                await _queued(sub, chunk)  # all of these steps are handed over
                batches.append([t for d in await sub.next(30) for t in d.output.new_token_ids])
            # what piled up between reads comes in one batch, oldest first
            assert batches == [[1], [2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12]]
            assert sub.finished
        finally:
            loop.stop()

    asyncio.run(main())


def test_rejected_request_and_time_out() -> None:
    async def main():
        loop = EngineLoop(ScriptedEngine(gated=True))
        loop.start()
        try:
            bad = loop.subscribe(_req(0, 4, prompt=101))
            with pytest.raises(EngineRejected, match="longer than 100"):
                await bad.next(30)
            assert loop.waiting_prompt_tokens == 0
            idle = loop.subscribe(_req(1, 4))
            with pytest.raises(TimeoutError):
                await idle.next(0.05)  # the gated engine never steps
            loop.engine.go.release()
            assert [d.output.new_token_ids for d in await idle.next(30)] == [(1,)]  # the first admitted
        finally:
            loop.engine.gated = False
            loop.engine.go.release(10)
            loop.stop()

    asyncio.run(main())


def test_engine_failure_fails_every_stream() -> None:
    async def main():
        loop = EngineLoop(ScriptedEngine(fail_at=3))
        subs = [loop.subscribe(_req(i, 10)) for i in range(3)]
        loop.start()
        try:
            for s in subs:
                with pytest.raises(EngineFailed, match="device lost"):
                    await _drain(s)
            assert not loop.alive
        finally:
            loop.stop()

    asyncio.run(main())


def test_a_closed_event_loop_does_not_kill_the_engine_loop() -> None:
    eng = ScriptedEngine(gated=True)
    loop = EngineLoop(eng)
    loop.start()
    try:
        gone = asyncio.new_event_loop()
        gone.run_until_complete(_subscribe(loop, _req(0, 3)))
        gone.close()  # the server's event loop went away with a stream still running

        async def later():
            sub = loop.subscribe(_req(1, 2))
            eng.go.release(5)
            return await _drain(sub)

        assert [t for g in asyncio.run(later()) for t in g] == [1001, 1002]
        assert loop.alive
    finally:
        eng.gated = False
        eng.go.release(10)
        loop.stop()


async def _subscribe(loop: EngineLoop, req: Request):
    return loop.subscribe(req)


def test_in_own_thread_returns_raises_and_has_exited() -> None:
    """The server loads and warms up the model on a thread that is gone before the engine loop
    steps (a live loader thread would keep its OpenMP pool: see ``server.in_own_thread``)."""
    from exec_service.server import in_own_thread

    seen = []

    def work() -> int:
        seen.append(threading.current_thread())
        return 42

    def fail() -> None:
        seen.append(threading.current_thread())
        raise LookupError("no manifest")

    async def main():
        assert await in_own_thread(work, "exec-load") == 42
        assert not seen[-1].is_alive() and seen[-1].name == "exec-load"
        assert seen[-1] is not threading.current_thread()
        with pytest.raises(LookupError, match="no manifest"):
            await in_own_thread(fail, "exec-load")

    asyncio.run(main())


def test_a_burst_arriving_while_idle_starts_in_one_step() -> None:
    """Streams started together (here 8, 1 ms apart, while the engine is idle) are all in the
    engine before its first step — so their prompts are prefilled together — and a lone request
    waits only for the short quiet period."""

    class Recording(ScriptedEngine):
        def step(self):
            self.seen_at_step.append(len(self.running))
            return super().step()

    async def main():
        eng = Recording()
        eng.seen_at_step = []
        loop = EngineLoop(eng)
        loop.start()
        try:
            await asyncio.sleep(0.05)  # idle
            subs = []
            for i in range(8):
                subs.append(loop.subscribe(_req(i, 3)))
                await asyncio.sleep(0.001)
            for s in subs:
                await _drain(s)
            assert eng.seen_at_step[0] == 8, eng.seen_at_step
            t0 = asyncio.get_running_loop().time()
            lone = loop.subscribe(_req(99, 1))
            await _drain(lone)
            assert asyncio.get_running_loop().time() - t0 < 0.2
        finally:
            loop.stop()

    asyncio.run(main())
