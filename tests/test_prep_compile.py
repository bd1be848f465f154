"""``PrepService.CompileGraphs`` through a real prep server: an operation like ``PrepareModel``
(watch to SUCCEEDED with per-graph progress, idempotent by graph key, cancel, bad input refused
naming the field), running the real ``neuron-serve compile``."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import grpc
import pytest

from exec_service.graph_sets.manifest import GRAPHS_JSON
from prep_service.api import PrepareRequest
from prep_service.convert import prepare
from prep_service.server import PrepServer
from protos import prep_pb2, prep_pb2_grpc
from tests.test_exec_server import make_served_checkpoint

pytestmark = pytest.mark.timeout(600)
Op = prep_pb2.Operation
# 3 graphs: ctx_b1_s16_k32, tkg_b1_s1_k32 and its greedy variant
SHAPE = dict(max_batch_size=1, max_seq_len=32, context_buckets=[16], kv_buckets=[32])


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> tuple[str, Path]:
    d = tmp_path_factory.mktemp("prep-compile")
    make_served_checkpoint(d / "ckpt", seed=5)
    uri = prepare(PrepareRequest(source=str(d / "ckpt"), output=f"file://{d}/store")).manifest_uri
    return uri, d / "store"


@contextlib.asynccontextmanager
async def serving(store: Path):
    server = PrepServer(store_uri=f"file://{store}")
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield prep_pb2_grpc.PrepServiceStub(channel)
    finally:
        await server.stop()


async def _watch(stub, op_id: str) -> list[prep_pb2.Operation]:
    req = prep_pb2.WatchOperationRequest(operation_id=op_id)
    return [m async for m in stub.WatchOperation(req, timeout=500)]


@pytest.mark.slow
def test_compile_graphs_operation(manifest) -> None:
    uri, store = manifest

    async def body():
        async with serving(store) as stub:
            req = prep_pb2.CompileGraphsRequest(manifest_uri=uri, device="cpu", **SHAPE)
            first = await stub.CompileGraphs(req)
            assert first.kind == "compile" and first.state in (Op.PENDING, Op.RUNNING)
            joined = await stub.CompileGraphs(req)  # identical, while active: the same operation
            assert joined.operation_id == first.operation_id
            updates = await _watch(stub, first.operation_id)
            done = updates[-1]
            assert done.state == Op.SUCCEEDED, done.error
            assert (done.progress.graphs_done, done.progress.graphs_total) == (3, 3)
            assert any(0 < u.progress.graphs_done < 3 for u in updates)  # per-graph progress
            assert done.compile_request.manifest_uri == uri and not done.reused
            path = Path(done.graph_set_uri.removeprefix("file://"))
            assert path == store / "graphs" / done.graph_key / GRAPHS_JSON
            assert len(json.loads(path.read_text())["graphs"]) == 3

            again = await stub.CompileGraphs(req)  # finished: answered from the store by its key
            again_done = (await _watch(stub, again.operation_id))[-1]
            assert again_done.state == Op.SUCCEEDED and again_done.reused
            assert again_done.graph_set_uri == done.graph_set_uri

            # cancel a forced rebuild into another store: CANCELLED, nothing published there
            other = store / "other"
            forced = await stub.CompileGraphs(
                prep_pb2.CompileGraphsRequest(
                    manifest_uri=uri, output=f"file://{store}/other", force=True, **SHAPE
                )
            )
            async for m in stub.WatchOperation(
                prep_pb2.WatchOperationRequest(operation_id=forced.operation_id)
            ):
                if m.state == Op.RUNNING:
                    break
            await asyncio.sleep(3)
            await stub.CancelOperation(prep_pb2.CancelOperationRequest(operation_id=forced.operation_id))
            end = (await _watch(stub, forced.operation_id))[-1]
            assert end.state == Op.CANCELLED
            assert not list(other.rglob(GRAPHS_JSON))
            listed = await stub.ListOperations(prep_pb2.ListOperationsRequest())
            assert {o.kind for o in listed.operations} == {"compile"}

    asyncio.run(asyncio.wait_for(body(), 550))


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "manifest_uri: required"),
        ({"device": "tpu"}, grpc.StatusCode.INVALID_ARGUMENT, "device: must be one of cpu, cuda, neuron"),
        ({"prefer": "slow"}, grpc.StatusCode.INVALID_ARGUMENT, "prefer: must be one of"),
        (
            {"max_seq_len": 100, "context_buckets": [64]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "context_buckets: max_seq_len (100) must be a multiple of the largest context bucket (64)",
        ),
        ({"output": "file:///elsewhere"}, grpc.StatusCode.PERMISSION_DENIED, "output 'file:///elsewhere'"),
    ],
)
def test_bad_compile_request_is_refused_naming_the_field(tmp_path, fields, code, fragment) -> None:
    fields = dict(fields)
    if fields or code == grpc.StatusCode.PERMISSION_DENIED:
        fields.setdefault("manifest_uri", f"file://{tmp_path}/store/models/m/k/manifest.json")

    async def body():
        async with serving(tmp_path / "store") as stub:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.CompileGraphs(prep_pb2.CompileGraphsRequest(**fields))
            assert e.value.code() == code and fragment in e.value.details()

    asyncio.run(asyncio.wait_for(body(), 60))
