"""The prep gRPC server, in-process on 127.0.0.1, called through the generated stubs.

The pipeline is a fake (injected as ``prepare``) that reports progress, honours cancel and fails on
request; the real pipeline is exercised by the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from prep_service.api import PrepareRequest, PrepareResult, PrepCancelled, PrepError, Progress
from prep_service.server import SERVICE_NAME, AccessPolicy, PrepServer
from protos import prep_pb2, prep_pb2_grpc

Op = prep_pb2.Operation
RPC_TIMEOUT = 10.0


@dataclass
class FakePrepare:
    """Stands in for prep_service.convert.prepare; behaviour is chosen by the source's prefix.

    ``ok/…`` finishes after a few progress steps; ``block/…`` reports progress then waits for
    ``release()`` (or cancel); ``bad/…`` raises PrepError; ``boom/…`` raises RuntimeError;
    ``chatty/…`` reports 2000 progress updates as fast as it can.
    """

    calls: list[PrepareRequest] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    _gate: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def release(self) -> None:
        self._gate.set()

    def __call__(self, req, *, progress=None, cancel=None) -> PrepareResult:
        with self._lock:
            self.calls.append(req)
        self.started.set()
        report = progress or (lambda p: None)
        kind = req.source.split("/", 1)[0]
        if kind == "bad":
            report(Progress("resolve"))
            raise PrepError("model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' has shape [3, 5]")
        if kind == "boom":
            raise RuntimeError("disk on fire")
        if kind == "chatty":
            for i in range(2000):
                report(
                    Progress(
                        "convert", bytes_done=i + 1, bytes_total=2000, tensors_done=i, tensors_total=2000
                    )
                )
        else:
            p = Progress("download", bytes_done=0, bytes_total=1000, tensors_total=10)
            for i in range(1, 6):
                p.bytes_done = i * 100
                report(p)  # the same mutable object each time, as a pipeline might do
                time.sleep(0.005)
            report(Progress("convert", bytes_done=500, bytes_total=1000, tensors_done=5, tensors_total=10))
        if kind == "block":
            while not self._gate.wait(0.01):
                if cancel is not None and cancel.is_set():
                    with self._lock:
                        self.cancelled.append(req.source)
                    raise PrepCancelled()
        if cancel is not None and cancel.is_set():
            raise PrepCancelled()
        report(Progress("publish", bytes_done=1000, bytes_total=1000, tensors_done=10, tensors_total=10))
        key = f"key-{abs(hash((req.source, req.tp_degree, req.dtype))) % 10**8}"
        return PrepareResult(
            manifest_uri=f"{req.output or 'file:///store'}/models/{req.name or 'm'}/{key}/manifest.json",
            artifact_key=key,
            reused=False,
        )


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def serving(fake: FakePrepare, **kwargs):
    server = PrepServer(prepare=fake, store_uri=kwargs.pop("store_uri", "file:///srv/store"), **kwargs)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield server, prep_pb2_grpc.PrepServiceStub(channel), channel
    finally:
        fake.release()
        await server.stop()


def req(source: str = "ok/model", **kw) -> prep_pb2.PrepareModelRequest:
    kw.setdefault("tp_degree", 2)
    kw.setdefault("dtype", "bfloat16")
    return prep_pb2.PrepareModelRequest(source=source, **kw)


async def watch_all(stub, op_id: str) -> list[prep_pb2.Operation]:
    return [
        m
        async for m in stub.WatchOperation(
            prep_pb2.WatchOperationRequest(operation_id=op_id), timeout=RPC_TIMEOUT
        )
    ]


async def wait_state(stub, op_id: str, state: int) -> prep_pb2.Operation:
    async for m in stub.WatchOperation(
        prep_pb2.WatchOperationRequest(operation_id=op_id), timeout=RPC_TIMEOUT
    ):
        if m.state == state:
            return m
    raise AssertionError(f"operation {op_id} ended in {Op.State.Name(m.state)}, never {Op.State.Name(state)}")


# --------------------------------------------------------------------- tests


def test_prepare_returns_at_once_and_watch_streams_to_succeeded() -> None:
    fake = FakePrepare()

    async def body():
        async with serving(fake) as (_server, stub, _ch):
            t0 = time.monotonic()
            op = await stub.PrepareModel(req("block/m", name="mine"), timeout=RPC_TIMEOUT)
            assert time.monotonic() - t0 < 2.0
            assert op.operation_id
            assert op.state in (Op.PENDING, Op.RUNNING)
            assert op.request.source == "block/m" and op.request.tp_degree == 2
            assert op.created_unix > 0

            watch = asyncio.ensure_future(watch_all(stub, op.operation_id))
            await wait_state(stub, op.operation_id, Op.RUNNING)
            fake.release()
            msgs = await watch

            states = [m.state for m in msgs]
            assert states[-1] == Op.SUCCEEDED
            assert Op.RUNNING in states
            assert states == sorted(states), states  # PENDING < RUNNING < SUCCEEDED, never back
            assert all(m.state != Op.SUCCEEDED for m in msgs[:-1])  # the stream ends at the terminal state
            assert any(m.progress.stage in ("download", "convert") for m in msgs)
            last = msgs[-1]
            assert last.manifest_uri.startswith("file:///srv/store/models/mine/")
            assert last.manifest_uri.endswith("/manifest.json")
            assert last.artifact_key and not last.error
            assert last.progress.bytes_done == last.progress.bytes_total == 1000

            got = await stub.GetOperation(
                prep_pb2.GetOperationRequest(operation_id=op.operation_id), timeout=RPC_TIMEOUT
            )
            assert got.state == Op.SUCCEEDED and got.manifest_uri == last.manifest_uri
            # Watching a finished operation yields its final state once and ends.
            again = await watch_all(stub, op.operation_id)
            assert [m.state for m in again] == [Op.SUCCEEDED]

            # The pipeline got the request as given, with the server's store as the default output.
            (call,) = fake.calls
            assert call == PrepareRequest(
                source="block/m", output="file:///srv/store", tp_degree=2, dtype="bfloat16", name="mine"
            )

    run(body())


def test_request_fields_are_passed_through() -> None:
    fake = FakePrepare()

    async def body():
        access = AccessPolicy(outputs=("file:///srv/store", "s3://bucket"))
        async with serving(fake, access=access) as (_server, stub, _ch):
            op = await stub.PrepareModel(
                prep_pb2.PrepareModelRequest(
                    source=" ok/m ",
                    revision="v1",
                    output="s3://bucket/p",
                    tp_degree=4,
                    gqa_strategy="convert_to_mha",
                    allow_pickle=True,
                ),
                timeout=RPC_TIMEOUT,
            )
            final = (await watch_all(stub, op.operation_id))[-1]
            assert final.state == Op.SUCCEEDED
            assert final.manifest_uri.startswith("s3://bucket/p/")
            (call,) = fake.calls
            assert call == PrepareRequest(
                source="ok/m",
                revision="v1",
                output="s3://bucket/p",
                tp_degree=4,
                dtype="float32",  # empty dtype = float32
                gqa_strategy="convert_to_mha",
                allow_pickle=True,
            )

    run(body())


def test_list_operations_newest_first() -> None:
    fake = FakePrepare()

    async def body():
        async with serving(fake, max_workers=2) as (_server, stub, _ch):
            ids = []
            for tp in (1, 2, 4):
                op = await stub.PrepareModel(req("ok/m", tp_degree=tp), timeout=RPC_TIMEOUT)
                ids.append(op.operation_id)
                await asyncio.sleep(0.01)
            for op_id in ids:
                await wait_state(stub, op_id, Op.SUCCEEDED)
            listed = await stub.ListOperations(prep_pb2.ListOperationsRequest(), timeout=RPC_TIMEOUT)
            assert [o.operation_id for o in listed.operations] == ids[::-1]
            assert all(o.state == Op.SUCCEEDED for o in listed.operations)
            assert [o.request.tp_degree for o in listed.operations] == [4, 2, 1]

    run(body())


def test_cancel_running_operation() -> None:
    fake = FakePrepare()

    async def body():
        async with serving(fake) as (_server, stub, _ch):
            op = await stub.PrepareModel(req("block/m"), timeout=RPC_TIMEOUT)
            await wait_state(stub, op.operation_id, Op.RUNNING)
            watch = asyncio.ensure_future(watch_all(stub, op.operation_id))
            await stub.CancelOperation(
                prep_pb2.CancelOperationRequest(operation_id=op.operation_id), timeout=RPC_TIMEOUT
            )
            msgs = await watch
            assert msgs[-1].state == Op.CANCELLED
            assert msgs[-1].manifest_uri == ""
            assert fake.cancelled == ["block/m"]
            # Cancelling a finished operation changes nothing.
            again = await stub.CancelOperation(
                prep_pb2.CancelOperationRequest(operation_id=op.operation_id), timeout=RPC_TIMEOUT
            )
            assert again.state == Op.CANCELLED

    run(body())


def test_queued_operation_stays_pending_and_cancels_without_running() -> None:
    fake = FakePrepare()

    async def body():
        async with serving(fake, max_workers=1) as (_server, stub, _ch):
            first = await stub.PrepareModel(req("block/a"), timeout=RPC_TIMEOUT)
            await wait_state(stub, first.operation_id, Op.RUNNING)
            second = await stub.PrepareModel(req("ok/b"), timeout=RPC_TIMEOUT)
            await asyncio.sleep(0.2)
            got = await stub.GetOperation(
                prep_pb2.GetOperationRequest(operation_id=second.operation_id), timeout=RPC_TIMEOUT
            )
            assert got.state == Op.PENDING  # one worker, busy with the first

            cancelled = await stub.CancelOperation(
                prep_pb2.CancelOperationRequest(operation_id=second.operation_id), timeout=RPC_TIMEOUT
            )
            assert cancelled.state == Op.CANCELLED  # at once: it never ran

            fake.release()
            await wait_state(stub, first.operation_id, Op.SUCCEEDED)
            await asyncio.sleep(0.1)
            assert [c.source for c in fake.calls] == ["block/a"]

    run(body())


def test_identical_request_joins_the_active_operation() -> None:
    fake = FakePrepare()

    async def body():
        async with serving(fake, max_workers=2) as (_server, stub, _ch):
            a = await stub.PrepareModel(req("block/m"), timeout=RPC_TIMEOUT)
            # Same normalized request (blank dtype/output spelled out differently) -> same operation.
            b = await stub.PrepareModel(req("block/m "), timeout=RPC_TIMEOUT)
            assert b.operation_id == a.operation_id
            # A different target, or force, is a new operation.
            c = await stub.PrepareModel(req("block/m", tp_degree=4), timeout=RPC_TIMEOUT)
            d = await stub.PrepareModel(req("block/m", force=True), timeout=RPC_TIMEOUT)
            assert len({a.operation_id, c.operation_id, d.operation_id}) == 3
            fake.release()
            for op in (a, c, d):
                await wait_state(stub, op.operation_id, Op.SUCCEEDED)
            assert len(fake.calls) == 3
            # After completion a new operation is started; the pipeline itself reuses the artifact.
            e = await stub.PrepareModel(req("block/m"), timeout=RPC_TIMEOUT)
            assert e.operation_id not in {a.operation_id, c.operation_id, d.operation_id}
            await wait_state(stub, e.operation_id, Op.SUCCEEDED)

    run(body())


def test_unknown_operation_is_not_found() -> None:
    fake = FakePrepare()

    async def body():
        async with serving(fake) as (_server, stub, _ch):
            for call in (
                stub.GetOperation(prep_pb2.GetOperationRequest(operation_id="nope"), timeout=RPC_TIMEOUT),
                stub.CancelOperation(
                    prep_pb2.CancelOperationRequest(operation_id="nope"), timeout=RPC_TIMEOUT
                ),
                watch_all(stub, "nope"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await call
                assert ei.value.code() == grpc.StatusCode.NOT_FOUND
                assert "nope" in ei.value.details()

    run(body())


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"tp_degree": 0}, "tp_degree"),
        ({"tp_degree": 1000}, "tp_degree"),
        ({"dtype": "int4"}, "dtype"),
        ({"gqa_strategy": "shuffle"}, "gqa_strategy"),
        ({"source": "  "}, "source"),
    ],
)
def test_bad_request_is_invalid_argument(fields: dict, reason: str) -> None:
    fake = FakePrepare()

    async def body():
        async with serving(fake) as (_server, stub, _ch):
            kw = {"source": "ok/m", "tp_degree": 2, **fields}
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.PrepareModel(prep_pb2.PrepareModelRequest(**kw), timeout=RPC_TIMEOUT)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason in ei.value.details()
            listed = await stub.ListOperations(prep_pb2.ListOperationsRequest(), timeout=RPC_TIMEOUT)
            assert not listed.operations and not fake.calls

    run(body())


def test_failures_are_reported_on_the_operation() -> None:
    fake = FakePrepare()

    async def body():
        async with serving(fake) as (_server, stub, _ch):
            bad = await stub.PrepareModel(req("bad/m"), timeout=RPC_TIMEOUT)
            final = (await watch_all(stub, bad.operation_id))[-1]
            assert final.state == Op.FAILED
            assert (
                final.error
                == "model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' has shape [3, 5]"
            )
            assert final.manifest_uri == ""

            boom = await stub.PrepareModel(req("boom/m"), timeout=RPC_TIMEOUT)
            final = (await watch_all(stub, boom.operation_id))[-1]
            assert final.state == Op.FAILED
            assert "RuntimeError" in final.error and "disk on fire" in final.error

            # The server keeps working after a crash in the pipeline.
            ok = await stub.PrepareModel(req("ok/m"), timeout=RPC_TIMEOUT)
            assert (await watch_all(stub, ok.operation_id))[-1].state == Op.SUCCEEDED

    run(body())


def test_watch_coalesces_fast_progress() -> None:
    fake = FakePrepare()

    async def body():
        async with serving(fake) as (_server, stub, _ch):
            op = await stub.PrepareModel(req("chatty/m"), timeout=RPC_TIMEOUT)
            t0 = time.monotonic()
            msgs = await watch_all(stub, op.operation_id)
            elapsed = time.monotonic() - t0
            assert msgs[-1].state == Op.SUCCEEDED
            # 2000 updates arrive; the stream sends at most ~10 per second (+ the first and the last).
            assert len(msgs) <= 10 * elapsed + 3, (len(msgs), elapsed)

    run(body())


def test_health_and_drain() -> None:
    fake = FakePrepare()

    async def body():
        async with serving(fake, grace_s=10) as (server, stub, channel):
            health = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                r = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
                return r.status

            assert await status("") == health_pb2.HealthCheckResponse.SERVING
            assert await status(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
            assert SERVICE_NAME == "neuronserve.prep.v1.PrepService"

            op = await stub.PrepareModel(req("block/m"), timeout=RPC_TIMEOUT)
            await wait_state(stub, op.operation_id, Op.RUNNING)
            watch = asyncio.ensure_future(watch_all(stub, op.operation_id))
            drain = asyncio.ensure_future(server.drain())
            await asyncio.sleep(0.2)
            assert not drain.done()  # waiting for the running operation
            assert await status(SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await status("") == health_pb2.HealthCheckResponse.SERVING  # liveness
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.PrepareModel(req("ok/other"), timeout=RPC_TIMEOUT)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE

            fake.release()  # the in-flight operation finishes within the grace period
            await asyncio.wait_for(drain, 10)
            assert (await watch)[-1].state == Op.SUCCEEDED

    run(body())


def test_drain_cancels_what_outlives_the_grace_period() -> None:
    fake = FakePrepare()

    async def body():
        async with serving(fake, grace_s=0.3) as (server, stub, _ch):
            op = await stub.PrepareModel(req("block/m"), timeout=RPC_TIMEOUT)
            await wait_state(stub, op.operation_id, Op.RUNNING)
            watch = asyncio.ensure_future(watch_all(stub, op.operation_id))
            await asyncio.sleep(0.05)
            await asyncio.wait_for(server.drain(), 15)
            assert (await watch)[-1].state == Op.CANCELLED
            assert fake.cancelled == ["block/m"]

    run(body())


def test_reflection_lists_the_service_and_drives_a_dynamic_client() -> None:
    fake = FakePrepare()

    def reflect(port: int) -> tuple[str, int, str]:
        # A client that knows nothing but the server address: descriptors come from reflection.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
            svc = pool.FindServiceByName(SERVICE_NAME)
            methods = {}
            for name in ("PrepareModel", "GetOperation"):
                m = svc.methods_by_name[name]
                methods[name] = ch.unary_unary(
                    f"/{svc.full_name}/{m.name}",
                    request_serializer=lambda msg: msg.SerializeToString(),
                    response_deserializer=message_factory.GetMessageClass(m.output_type).FromString,
                )
                methods[name + ".in"] = message_factory.GetMessageClass(m.input_type)
            op = methods["PrepareModel"](
                methods["PrepareModel.in"](source="ok/dyn", tp_degree=1), timeout=RPC_TIMEOUT
            )
            for _ in range(500):
                got = methods["GetOperation"](
                    methods["GetOperation.in"](operation_id=op.operation_id), timeout=RPC_TIMEOUT
                )
                if got.state == Op.SUCCEEDED:
                    break
                time.sleep(0.01)
            return op.operation_id, got.state, got.manifest_uri

    async def body():
        async with serving(fake) as (server, _stub, channel):
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            responses = [r async for r in call]
            names = {s.name for s in responses[0].list_services_response.service}
            assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names

            # The synchronous client runs in a thread: the server shares this event loop.
            op_id, state, uri = await asyncio.to_thread(reflect, server.port)
            assert op_id and state == Op.SUCCEEDED and uri.endswith("/manifest.json")

    run(body())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics() -> None:
    fake = FakePrepare()
    metrics_port = _free_port()

    async def body():
        async with serving(fake, metrics_port=metrics_port) as (_server, stub, _ch):
            ok = await stub.PrepareModel(req("ok/m"), timeout=RPC_TIMEOUT)
            bad = await stub.PrepareModel(req("bad/m"), timeout=RPC_TIMEOUT)
            for op in (ok, bad):
                await watch_all(stub, op.operation_id)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetOperation(
                    prep_pb2.GetOperationRequest(operation_id="nope"), timeout=RPC_TIMEOUT
                )
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())

    text = run(body())
    lines = set(text.splitlines())
    assert 'neuronserve_prep_operations{state="SUCCEEDED"} 1.0' in lines
    assert 'neuronserve_prep_operations{state="FAILED"} 1.0' in lines
    assert 'neuronserve_prep_operations{state="RUNNING"} 0.0' in lines
    assert 'neuronserve_prep_operations_finished_total{state="SUCCEEDED"} 1.0' in lines
    # ok/ reports 500 bytes of download, then convert and publish up to 1000.
    bytes_line = next(line for line in lines if line.startswith("neuronserve_prep_bytes_processed_total "))
    assert float(bytes_line.split()[1]) >= 1000
    assert 'neuronserve_prep_requests_rejected_total{code="NOT_FOUND"} 1.0' in lines
    assert "process_cpu_seconds_total" in text


def test_port_in_use_is_an_error() -> None:
    fake = FakePrepare()

    async def body():
        async with serving(fake) as (server, _stub, _ch):
            other = PrepServer(prepare=fake, port=server.port)
            with pytest.raises(OSError):
                await other.start()

    run(body())


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        ({"output": "s3://other-bucket/x"}, grpc.StatusCode.PERMISSION_DENIED, "outside the stores"),
        ({"output": "file:///srv/store/../../etc"}, grpc.StatusCode.PERMISSION_DENIED, "outside the stores"),
        ({"output": "file:///srv/storeX"}, grpc.StatusCode.PERMISSION_DENIED, "outside the stores"),
        ({"output": "s3://bucket/a/../b"}, grpc.StatusCode.INVALID_ARGUMENT, "'..' segments"),
        ({"source": "/etc"}, grpc.StatusCode.PERMISSION_DENIED, "outside the directories"),
        ({"source": "/srv/models/../../etc"}, grpc.StatusCode.PERMISSION_DENIED, "outside the directories"),
        ({"source": "s3://b/../x"}, grpc.StatusCode.INVALID_ARGUMENT, "'..' segments"),
    ],
)
def test_access_policy(fields: dict, code: grpc.StatusCode, fragment: str) -> None:
    fake = FakePrepare()

    async def body():
        access = AccessPolicy(outputs=("file:///srv/store", "s3://bucket"), source_roots=("/srv/models",))
        async with serving(fake, access=access) as (_server, stub, _ch):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.PrepareModel(req(**fields), timeout=RPC_TIMEOUT)
            return e.value

    err = run(body())
    assert err.code() == code and fragment in err.details()
    assert fake.calls == []


def test_access_policy_allows_sub_prefixes_and_roots() -> None:
    fake = FakePrepare()

    async def body():
        access = AccessPolicy(outputs=("file:///srv/store",), source_roots=("/",))
        async with serving(fake, access=access) as (_server, stub, _ch):
            op = await stub.PrepareModel(
                req(source="/tmp", output="file:///srv/store/team-a"), timeout=RPC_TIMEOUT
            )
            return (await watch_all(stub, op.operation_id))[-1]

    assert run(body()).state == Op.SUCCEEDED
