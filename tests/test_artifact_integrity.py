"""A damaged artifact is never served: exec refuses to load it with a clear error, readiness
stays NOT_SERVING and Generate answers UNAVAILABLE with the reason."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exec_service.server import ExecServer, ServeConfig
from prep_service.api import PrepareRequest
from prep_service.convert import prepare
from protos import exec_pb2_grpc
from shared.manifest import shard_path
from tests.test_exec_server import _ids_req, make_served_checkpoint


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("integrity")
    make_served_checkpoint(d / "ckpt", seed=2)
    res = prepare(PrepareRequest(source=str(d / "ckpt"), tp_degree=2, output=f"file://{d}/store"))
    return Path(res.manifest_uri.removeprefix("file://")).parent


def _flip_byte(root: Path) -> None:
    p = root / shard_path(1, 2)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _truncate(root: Path) -> None:
    p = root / shard_path(0, 2)
    p.write_bytes(p.read_bytes()[:-4096])


def _edit_manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        m = json.loads((root / "manifest.json").read_text())
        edit(m)
        (root / "manifest.json").write_text(json.dumps(m))

    return apply


def _wrong_checksum(m: dict) -> None:
    m["files"][0]["sha256"] = "0" * 64


def _drop_shard_entry(m: dict) -> None:
    m["files"] = [f for f in m["files"] if f["path"] != shard_path(1, 2)]


def _schema(m: dict) -> None:
    m["schema_version"] = 99


CASES = {
    "flipped byte": (_flip_byte, "does not match the manifest"),
    "truncated shard": (_truncate, "does not match the manifest"),
    "checksum list mismatch": (_edit_manifest(_wrong_checksum), "does not match the manifest"),
    "shard missing from the manifest": (_edit_manifest(_drop_shard_entry), "rank-00001-of-00002"),
    "unsupported schema_version": (_edit_manifest(_schema), "unsupported manifest schema_version 99"),
    "tokenizer file corrupted": (lambda r: (r / "tokenizer.json").write_text("{}"), "tokenizer.json does not match"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_artifact_is_refused(tmp_path: Path, artifact: Path, case: str) -> None:
    damage, fragment = CASES[case]
    root = tmp_path / "artifact"
    shutil.copytree(artifact, root)
    damage(root)

    async def main():
        server = ExecServer(
            ServeConfig(manifest_uri=f"file://{root}/manifest.json", max_batch_size=1, max_seq_len=64, context_buckets=(16,))
        )
        await server.start()
        try:
            assert server.load_error is not None and fragment in server.load_error, server.load_error
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                h = health_pb2_grpc.HealthStub(ch)
                ready = await h.Check(health_pb2.HealthCheckRequest(service="neuronserve.exec.v1.ExecService"))
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await exec_pb2_grpc.ExecServiceStub(ch).Generate(_ids_req([1, 2], 2)).read()
            return ready.status, e.value
        finally:
            await server.stop()

    status, err = asyncio.run(asyncio.wait_for(main(), 120))
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert err.code() == grpc.StatusCode.UNAVAILABLE and fragment in err.details()


def test_missing_manifest(tmp_path: Path) -> None:
    async def main():
        server = ExecServer(ServeConfig(manifest_uri=f"file://{tmp_path}/models/x/k/manifest.json"))
        await server.start()
        try:
            return server.load_error
        finally:
            await server.stop()

    err = asyncio.run(asyncio.wait_for(main(), 60))
    assert err is not None and "no manifest there" in err
