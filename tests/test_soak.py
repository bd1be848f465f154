"""Bounded load and soak against a real exec-server process on loopback: 64 concurrent clients for
two minutes mixing short and long requests, cancellations and deadlines. Every request is
answered exactly once, no slot leaks, and the server's memory is stable."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter

import grpc
import psutil
import pytest

from protos import exec_pb2, exec_pb2_grpc
from tests.test_exec_server import _ids_req
from tests.test_exec_server_process import _free_port, _log_tail, _start, _wait_ready, artifacts  # noqa: F401 (fixture)

DURATION_S = float(os.environ.get("NEURON_SERVE_SOAK_SECONDS", "120"))
CLIENTS = 64


@pytest.mark.slow
def test_soak(artifacts) -> None:  # noqa: F811
    port = _free_port()
    proc = _start(artifacts[1], port)
    server = psutil.Process(proc.pid)
    outcomes: Counter[str] = Counter()
    finals: Counter[str] = Counter()  # request id -> number of final messages seen
    ended_ok: set[str] = set()  # request ids of the streams that ended with status OK
    bad_streams: list[str] = []  # those whose messages were not: ..., exactly one final, nothing after
    sent: set[str] = set()
    rss: list[tuple[float, int]] = []
    try:
        asyncio.run(asyncio.wait_for(_wait_ready(port, proc), 300))

        async def client(i: int, ch, stop_at: float) -> None:
            stub = exec_pb2_grpc.ExecServiceStub(ch)
            rng = random.Random(i)
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                rid = f"c{i}-{n}"
                kind = rng.choices(["short", "long", "cancel", "deadline"], weights=[6, 2, 1, 1])[0]
                length = rng.randint(1, 40)
                req = _ids_req([rng.randint(3, 40000) for _ in range(length)], 4 if kind == "short" else 48)
                req.request_id = rid
                if rng.random() < 0.5:
                    req.sampling.temperature = 0.8
                    req.sampling.seed = n
                sent.add(rid)
                timeout = 0.05 if kind == "deadline" else 120
                call = stub.Generate(req, timeout=timeout)
                try:
                    got = 0
                    last_msg: exec_pb2.GenerateResponse | None = None
                    after_final = 0  # messages received after the one with finish_reason
                    async for msg in call:
                        assert msg.request_id == rid
                        got += len(msg.token_ids)
                        after_final += finals[rid] > 0
                        if msg.finish_reason:
                            finals[rid] += 1
                        last_msg = msg
                        if kind == "cancel" and got >= 2:
                            call.cancel()
                            break
                    else:  # the stream ended OK: exactly one final message, the last one
                        if finals[rid] != 1 or after_final or last_msg is None:
                            bad_streams.append(f"{rid}: {finals[rid]} finals, {after_final} after")
                        elif not (
                            last_msg.finish_reason == exec_pb2.LENGTH  # ignore_eos, prompt + 48 < max_seq_len
                            and last_msg.usage.completion_tokens == got == req.stopping.max_new_tokens
                        ):
                            bad_streams.append(f"{rid}: {got} tokens streamed, final {last_msg}")
                        ended_ok.add(rid)
                    outcomes["cancelled" if kind == "cancel" and got >= 2 else "ok"] += 1
                except grpc.aio.AioRpcError as e:
                    outcomes[e.code().name] += 1

        async def sample_rss(stop_at: float) -> None:
            t0 = time.monotonic()
            while time.monotonic() < stop_at:
                rss.append((time.monotonic() - t0, server.memory_info().rss))
                await asyncio.sleep(5)
            rss.append((time.monotonic() - t0, server.memory_info().rss))

        async def main() -> exec_pb2.ModelInfo:
            stop_at = time.monotonic() + DURATION_S
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                await asyncio.gather(sample_rss(stop_at), *[client(i, ch, stop_at) for i in range(CLIENTS)])
                stub = exec_pb2_grpc.ExecServiceStub(ch)
                for _ in range(100):
                    info = await stub.GetModelInfo(exec_pb2.GetModelInfoRequest())
                    if info.free_slots == info.max_batch_size and info.running_requests == 0:
                        break
                    await asyncio.sleep(0.1)
                return info

        info = asyncio.run(asyncio.wait_for(main(), DURATION_S + 240))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=60) == 0, _log_tail(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    total = sum(outcomes.values())
    print(
        f"soak: {total} requests {dict(outcomes)}; rss samples (s, MiB): "
        f"{[(round(t), m // 2**20) for t, m in rss[::4]]}"
    )
    assert total == len(sent) and total > 200  # every request answered: nothing lost
    assert set(outcomes) <= {"ok", "cancelled", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}, outcomes
    assert outcomes["ok"] > total // 2
    assert all(v == 1 for v in finals.values())  # never answered twice
    # every stream that ended OK: one final message, nothing after it, the tokens it reports
    assert len(ended_ok) == outcomes["ok"] and not bad_streams, bad_streams[:5]
    assert info.free_slots == info.max_batch_size and info.running_requests == 0  # no slot leaked
    at_60 = min((abs(t - DURATION_S / 2), m) for t, m in rss)[1]  # the start of the second minute
    last = rss[-1][1]
    assert last < at_60 * 1.05, f"RSS grew {100 * (last / at_60 - 1):.1f}% from minute 1 to the end"
