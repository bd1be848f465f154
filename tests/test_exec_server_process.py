"""`neuron-serve exec-server` as a real process: a newcomer's first command, shapes refused at
argument parsing, a load failure ending the process, SIGTERM drain, and tp=2 worker ranks started
and stopped by the server itself."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prep_service.api import PrepareRequest
from prep_service.convert import prepare
from protos import exec_pb2, exec_pb2_grpc
from tests.test_exec_server import _ids_req, make_served_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "neuronserve.exec.v1.ExecService"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EXE = Path(sys.executable).parent / "neuron-serve"
SMALL_SHAPE = ("--max-batch-size", "2", "--max-seq-len", "256", "--context-buckets", "16,32")


def _start(
    manifest_uri: str,
    port: int,
    grace: float = 30.0,
    shape: tuple[str, ...] = SMALL_SHAPE,
    extra: tuple[str, ...] = (),
) -> subprocess.Popen:
    cmd = [
        str(EXE),
        "exec-server",
        "--model",
        manifest_uri,
        "--port",
        str(port),
        *shape,
        "--grace-period",
        str(grace),
        "--log-level",
        "INFO",
        *extra,
    ]
    # Logs go to a file: a pipe nobody reads fills up and then blocks the server's logging.
    log = tempfile.NamedTemporaryFile(prefix="exec-server-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc


def _log_tail(proc: subprocess.Popen, n: int = 4000) -> str:
    return Path(proc.log_path).read_text(errors="replace")[-n:]  # type: ignore[attr-defined]


async def _wait_ready(port: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            assert proc.poll() is None, _log_tail(proc)
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.3)
    raise AssertionError("exec-server did not become ready")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[int, str]:
    d = tmp_path_factory.mktemp("proc")
    make_served_checkpoint(d / "ckpt", seed=9)
    return {
        tp: prepare(
            PrepareRequest(source=str(d / "ckpt"), tp_degree=tp, output=f"file://{d}/store")
        ).manifest_uri
        for tp in (1, 2)
    }


@pytest.mark.slow
def test_a_newcomers_command_serves(artifacts) -> None:
    """`exec-server --model M --max-seq-len 256` and nothing else: the context buckets derive from
    the sequence length (64, 256), the server becomes ready and generates."""
    port = _free_port()
    proc = _start(artifacts[1], port, shape=("--max-seq-len", "256"))
    try:

        async def main():
            await _wait_ready(port, proc)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = exec_pb2_grpc.ExecServiceStub(ch)
                info = await stub.GetModelInfo(exec_pb2.GetModelInfoRequest())
                msgs = [m async for m in stub.Generate(_ids_req(list(range(1, 100)), 5))]
                return info, msgs

        info, msgs = asyncio.run(asyncio.wait_for(main(), 300))
        assert (info.max_seq_len, list(info.context_buckets)) == (256, [64, 256])
        assert info.max_batch_size == 8 and list(info.kv_buckets) == [64, 128, 256]
        assert sum(len(m.token_ids) for m in msgs) == 5 and msgs[-1].finish_reason == exec_pb2.LENGTH
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (
            ("--max-seq-len", "100", "--context-buckets", "64"),
            "--context-buckets: max_seq_len (100) must be a multiple of the largest context bucket (64)",
        ),
        (
            ("--max-seq-len", "256", "--context-buckets", "1,16"),
            "--context-buckets: context buckets must be >= 2",
        ),
        (
            ("--max-seq-len", "256", "--kv-buckets", "64,128"),
            "--kv-buckets: KV buckets must be >= 1 and the largest KV bucket must equal max_seq_len (256)",
        ),
        (("--max-batch-size", "0"), "--max-batch-size: max_batch_size must be >= 1"),
        (("--max-seq-len", "1"), "--max-seq-len: max_seq_len must be >= 2"),
        (("--port", "70000"), "--port: 70000 is out of range"),
        (("--http-port", "-1"), "--http-port: -1 is out of range"),
    ],
)
def test_an_impossible_serving_shape_exits_2_at_parse_time(flags, fragment) -> None:
    """Refused before anything binds or loads: exit 2 naming the flag and the rule."""
    t0 = time.monotonic()
    res = subprocess.run(
        [str(EXE), "exec-server", "--model", "file:///nonexistent/manifest.json", *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    assert fragment in res.stderr, res.stderr
    assert time.monotonic() - t0 < 30  # argument parsing only: no torch, no model


def test_a_missing_manifest_ends_the_process_with_the_reason() -> None:
    """A permanent load failure exits non-zero with the reason on stderr (a crash loop with the
    cause in Kubernetes), instead of a live process that is never ready."""
    port = _free_port()
    res = subprocess.run(
        [str(EXE), "exec-server", "--model", "file:///nonexistent/manifest.json", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1, res.stderr
    assert "error: cannot serve file:///nonexistent/manifest.json: " in res.stderr
    assert "no manifest there" in res.stderr


@pytest.mark.slow
def test_sigterm_drains_in_flight_streams_and_refuses_new_ones(artifacts) -> None:
    """Over gRPC and the HTTP API (--http-port) alike: the process's own SIGTERM handler drains both."""
    import httpx

    port, http_port = _free_port(), _free_port()
    proc = _start(artifacts[1], port, extra=("--http-port", str(http_port)))
    http = f"http://127.0.0.1:{http_port}"
    try:

        async def main():
            await _wait_ready(port, proc)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch, httpx.AsyncClient() as web:
                assert (await web.get(f"{http}/v1/models")).json()["data"][0]["object"] == "model"
                stub = exec_pb2_grpc.ExecServiceStub(ch)
                health = health_pb2_grpc.HealthStub(ch)
                call = stub.Generate(_ids_req([1, 2, 3], 200))
                first = await call.read()
                proc.send_signal(signal.SIGTERM)
                # readiness turns NOT_SERVING and new calls are refused while the stream goes on
                status = None
                for _ in range(50):
                    r = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
                    status = r.status
                    if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
                    await asyncio.sleep(0.05)
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Generate(_ids_req([4, 5], 3)).read()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                r = await web.get(f"{http}/health")
                assert r.status_code == 503 and r.json()["error"]["message"] == "the server is draining"
                msgs = [first]
                while (m := await call.read()) is not grpc.aio.EOF:
                    msgs.append(m)
                return msgs

        msgs = asyncio.run(asyncio.wait_for(main(), 300))
        assert msgs[-1].finish_reason == exec_pb2.LENGTH
        assert sum(len(m.token_ids) for m in msgs) == 200  # the in-flight stream finished whole
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_tp2_server_starts_and_stops_its_worker_ranks(artifacts) -> None:
    port = _free_port()
    proc = _start(artifacts[2], port)
    try:
        asyncio.run(asyncio.wait_for(_wait_ready(port, proc), 300))
        children = psutil.Process(proc.pid).children(recursive=True)
        workers = [c for c in children if "python" in " ".join(c.cmdline()).lower()]
        assert workers, "a tp=2 server runs its rank-1 worker as a child process"

        async def gen():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = exec_pb2_grpc.ExecServiceStub(ch)
                info = await stub.GetModelInfo(exec_pb2.GetModelInfoRequest())
                msgs = [m async for m in stub.Generate(_ids_req([3, 1, 4, 1, 5], 8))]
                return info, msgs

        info, msgs = asyncio.run(asyncio.wait_for(gen(), 120))
        assert info.tp_degree == 2 and sum(len(m.token_ids) for m in msgs) == 8
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, f"worker ranks left running: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_killed_worker_rank_fails_streams_and_liveness(artifacts) -> None:
    """A TP worker dies mid-generation: in-flight streams end with an error (no hang) and liveness
    turns NOT_SERVING so that Kubernetes restarts the pod."""
    port = _free_port()
    proc = _start(artifacts[2], port)
    try:
        asyncio.run(asyncio.wait_for(_wait_ready(port, proc), 300))
        workers = [
            c
            for c in psutil.Process(proc.pid).children(recursive=True)
            if "python" in " ".join(c.cmdline()).lower()
        ]
        assert workers

        async def main():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = exec_pb2_grpc.ExecServiceStub(ch)
                call = stub.Generate(_ids_req([1, 2, 3], 250))
                await call.read()
                for w in workers:
                    w.kill()
                t0 = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    while await call.read() is not grpc.aio.EOF:
                        pass
                failed_after = time.monotonic() - t0
                health = health_pb2_grpc.HealthStub(ch)
                for _ in range(100):
                    r = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    if r.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
                    await asyncio.sleep(0.1)
                with pytest.raises(grpc.aio.AioRpcError) as later:
                    await stub.Generate(_ids_req([1, 2], 2)).read()
                return e.value.code(), failed_after, r.status, later.value.code()

        code, failed_after, live, later = asyncio.run(asyncio.wait_for(main(), 180))
        assert code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
        assert failed_after < 60
        assert live == health_pb2.HealthCheckResponse.NOT_SERVING
        assert later == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
