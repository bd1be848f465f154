"""prep-server end to end: real grpc.aio server, the real pipeline, a real S3 server (SeaweedFS)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path

import grpc
import pytest

from prep_service.convert import prepare as real_prepare
from prep_service.server import PrepServer
from protos import prep_pb2, prep_pb2_grpc
from shared.manifest import Manifest
from shared.storage import open_store, split_uri
from tests.helpers import make_llama

OP = prep_pb2.Operation


async def _watch(stub, op_id: str) -> list[prep_pb2.Operation]:
    return [op async for op in stub.WatchOperation(prep_pb2.WatchOperationRequest(operation_id=op_id))]


def test_prepare_model_rpc_into_s3(tmp_path: Path, s3_env: str) -> None:
    make_llama(tmp_path / "ckpt")

    async def main() -> None:
        server = PrepServer(store_uri=f"{s3_env}/store")
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = prep_pb2_grpc.PrepServiceStub(ch)
                req = prep_pb2.PrepareModelRequest(
                    source=str(tmp_path / "ckpt"), tp_degree=2, dtype="float32"
                )
                op = await stub.PrepareModel(req)
                assert op.state in (OP.PENDING, OP.RUNNING)
                updates = await _watch(stub, op.operation_id)
                final = updates[-1]
                assert final.state == OP.SUCCEEDED, final.error
                assert (
                    final.progress.stage == "done"
                    and final.progress.tensors_done == final.progress.tensors_total > 0
                )
                assert final.manifest_uri.startswith(f"{s3_env}/store/models/ckpt/")

                # every checksum in the manifest verified by re-download
                store, key = split_uri(final.manifest_uri)
                man = Manifest.from_json(store.get_bytes(key))
                for f in man.files:
                    data = store.get_bytes(f.path)
                    assert len(data) == f.size and hashlib.sha256(data).hexdigest() == f.sha256

                again = await stub.PrepareModel(req)
                done = (await _watch(stub, again.operation_id))[-1]
                assert done.state == OP.SUCCEEDED and done.reused and done.manifest_uri == final.manifest_uri

                listed = await stub.ListOperations(prep_pb2.ListOperationsRequest())
                assert {o.operation_id for o in listed.operations} == {op.operation_id, again.operation_id}
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_cancel_operation_rpc_leaves_no_manifest(tmp_path: Path, s3_env: str) -> None:
    make_llama(tmp_path / "ckpt", num_hidden_layers=6)
    in_convert = threading.Event()
    release = threading.Event()

    def gated_prepare(req, *, progress=None, cancel=None):
        def on_progress(p):
            if progress:
                progress(p)
            if p.stage == "converting" and p.tensors_done >= 2:
                in_convert.set()
                release.wait(30)  # hold the worker mid-conversion until the test has cancelled

        return real_prepare(req, progress=on_progress, cancel=cancel)

    async def main() -> None:
        server = PrepServer(store_uri=f"{s3_env}/store", prepare=gated_prepare)
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = prep_pb2_grpc.PrepServiceStub(ch)
                op = await stub.PrepareModel(
                    prep_pb2.PrepareModelRequest(source=str(tmp_path / "ckpt"), tp_degree=2)
                )
                assert await asyncio.to_thread(in_convert.wait, 60)
                await stub.CancelOperation(prep_pb2.CancelOperationRequest(operation_id=op.operation_id))
                release.set()
                final = (await _watch(stub, op.operation_id))[-1]
                assert final.state == OP.CANCELLED and not final.manifest_uri
        finally:
            release.set()
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 120))
    assert [o.key for o in open_store(f"{s3_env}/store").list("") if o.key.endswith("manifest.json")] == []


@pytest.mark.parametrize(
    ("make", "code_fragment"),
    [
        (lambda p: (p / "empty").mkdir(), "is empty"),
        (
            lambda p: make_llama(p / "empty", num_attention_heads=9, num_key_value_heads=3, hidden_size=72),
            "intermediate_size",
        ),
    ],
)
def test_bad_checkpoint_fails_the_operation_with_a_named_error(
    tmp_path: Path, make, code_fragment: str
) -> None:
    make(tmp_path)

    async def main() -> prep_pb2.Operation:
        server = PrepServer(store_uri=f"file://{tmp_path}/store")
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = prep_pb2_grpc.PrepServiceStub(ch)
                op = await stub.PrepareModel(
                    prep_pb2.PrepareModelRequest(source=str(tmp_path / "empty"), tp_degree=3)
                )
                return (await _watch(stub, op.operation_id))[-1]
        finally:
            await server.stop()

    final = asyncio.run(asyncio.wait_for(main(), 60))
    assert final.state == OP.FAILED and code_fragment in final.error
    assert str(tmp_path / "empty") in final.error
