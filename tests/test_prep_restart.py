"""A prep-server killed mid-operation: after a restart, Get/ListOperations report the lost
operation truthfully, finished ones keep their result, and the same request again completes and
then reuses the artifact."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc

from prep_service.server import PrepServer
from protos import prep_pb2, prep_pb2_grpc
from tests.helpers import make_llama

ROOT = Path(__file__).resolve().parents[1]
Op = prep_pb2.Operation

# A prep server whose pipeline hangs once it is converting "slow" checkpoints (the test kills it there).
_SERVER = textwrap.dedent(
    """
    import asyncio, sys, threading
    from prep_service.convert import prepare
    from prep_service.server import PrepServer

    def gated(req, *, progress=None, cancel=None):
        def on_progress(p):
            if progress:
                progress(p)
            if "slow" in req.source and p.stage == "converting":
                print("CONVERTING", flush=True)
                threading.Event().wait()  # hang here until killed
        return prepare(req, progress=on_progress, cancel=cancel)

    async def main():
        server = PrepServer(store_uri=sys.argv[1], prepare=gated, journal=True)
        print("PORT", await server.start(), flush=True)
        await server.wait_for_termination()

    asyncio.run(main())
    """
)


async def _watch_last(stub, op_id: str) -> prep_pb2.Operation:
    last = None
    async for o in stub.WatchOperation(prep_pb2.WatchOperationRequest(operation_id=op_id), timeout=120):
        last = o
    assert last is not None
    return last


def test_restart_reports_lost_operation_and_rerun_reuses(tmp_path: Path) -> None:
    make_llama(tmp_path / "fast")
    make_llama(tmp_path / "slow", seed=1)
    store = f"file://{tmp_path}/store"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, store],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split()[1])

        async def before_crash():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = prep_pb2_grpc.PrepServiceStub(ch)
                fast = await stub.PrepareModel(
                    prep_pb2.PrepareModelRequest(source=str(tmp_path / "fast"), tp_degree=1)
                )
                done = await _watch_last(stub, fast.operation_id)
                slow = await stub.PrepareModel(
                    prep_pb2.PrepareModelRequest(source=str(tmp_path / "slow"), tp_degree=2)
                )
                return done, slow.operation_id

        done, slow_id = asyncio.run(asyncio.wait_for(before_crash(), 120))
        assert done.state == Op.SUCCEEDED
        assert proc.stdout.readline().strip() == "CONVERTING"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    async def after_restart():
        server = PrepServer(store_uri=store, journal=True)
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = prep_pb2_grpc.PrepServiceStub(ch)
                lost = await stub.GetOperation(prep_pb2.GetOperationRequest(operation_id=slow_id))
                kept = await stub.GetOperation(prep_pb2.GetOperationRequest(operation_id=done.operation_id))
                listed = await stub.ListOperations(prep_pb2.ListOperationsRequest())
                watched = await _watch_last(stub, slow_id)  # a lost operation's watch ends at once
                req = prep_pb2.PrepareModelRequest(source=str(tmp_path / "slow"), tp_degree=2)
                rerun = await _watch_last(stub, (await stub.PrepareModel(req)).operation_id)
                again = await _watch_last(stub, (await stub.PrepareModel(req)).operation_id)
                return lost, kept, listed, watched, rerun, again
        finally:
            await server.stop()

    lost, kept, listed, watched, rerun, again = asyncio.run(asyncio.wait_for(after_restart(), 180))
    assert lost.state == Op.FAILED and lost.error.startswith(
        "lost: the prep server restarted while this operation was RUNNING"
    )
    assert watched.state == Op.FAILED
    assert kept.state == Op.SUCCEEDED and kept.manifest_uri == done.manifest_uri
    assert {o.operation_id for o in listed.operations} >= {slow_id, done.operation_id}
    assert rerun.state == Op.SUCCEEDED and not rerun.reused
    assert again.state == Op.SUCCEEDED and again.reused and again.manifest_uri == rerun.manifest_uri
