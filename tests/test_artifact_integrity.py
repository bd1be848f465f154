"""A damaged artifact is never served: exec refuses to load it with the reason and stops (the
process then exits non-zero — tests/test_exec_server_process.py); store errors while loading are
retried with backoff before giving up."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exec_service.server import ExecServer, LoadFailed, ServeConfig
from prep_service.api import PrepareRequest
from prep_service.convert import prepare
from protos import exec_pb2_grpc
from shared.manifest import shard_path
from shared.storage import StoreError
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
    "tokenizer file corrupted": (
        lambda r: (r / "tokenizer.json").write_text("{}"),
        "tokenizer.json does not match",
    ),
}


def _refused(manifest_uri: str, **cfg) -> tuple[str, int]:
    """Start a server on a bad artifact: LoadFailed's message, and the port it had bound."""

    async def main():
        server = ExecServer(ServeConfig(manifest_uri=manifest_uri, **cfg))
        with pytest.raises(LoadFailed) as e:
            await server.start()
        assert server.load_error == str(e.value)
        port = server.port
        # the server stopped: nothing answers on its port any more
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert gone.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        return str(e.value), port

    return asyncio.run(asyncio.wait_for(main(), 120))


SMALL = dict(max_batch_size=1, max_seq_len=64, context_buckets=(16,))


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_artifact_is_refused(tmp_path: Path, artifact: Path, case: str) -> None:
    damage, fragment = CASES[case]
    root = tmp_path / "artifact"
    shutil.copytree(artifact, root)
    damage(root)
    uri = f"file://{root}/manifest.json"
    message, _ = _refused(uri, **SMALL)
    assert message.startswith(f"cannot serve {uri}: ") and fragment in message, message


def test_missing_manifest(tmp_path: Path) -> None:
    message, _ = _refused(f"file://{tmp_path}/models/x/k/manifest.json")
    assert "no manifest there" in message


class _FlakyStore:
    """``open_artifact`` that fails with a store error ``failures`` times, then works."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    def __call__(self, uri: str):
        from exec_service.artifact import open_artifact

        self.calls += 1
        if self.calls <= self.failures:
            raise StoreError(f"S3 get {uri} failed: SlowDown (call {self.calls})")
        return open_artifact(uri)


def test_store_errors_are_retried_with_backoff(tmp_path: Path, artifact: Path, monkeypatch) -> None:
    import exec_service.server as server_mod

    flaky = _FlakyStore(failures=2)
    monkeypatch.setattr(server_mod, "open_artifact", flaky)

    async def main():
        server = ExecServer(
            ServeConfig(manifest_uri=f"file://{artifact}/manifest.json", load_retry_s=0.05, **SMALL)
        )
        t0 = asyncio.get_running_loop().time()
        await server.start()
        took = asyncio.get_running_loop().time() - t0
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                ready = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service="neuronserve.exec.v1.ExecService")
                )
                msgs = [m async for m in exec_pb2_grpc.ExecServiceStub(ch).Generate(_ids_req([1, 2], 3))]
            return ready.status, msgs, took
        finally:
            await server.stop()

    status, msgs, took = asyncio.run(asyncio.wait_for(main(), 120))
    assert flaky.calls == 3 and took >= 0.05 + 0.1  # two backoffs: 0.05 s, then 0.1 s
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert sum(len(m.token_ids) for m in msgs) == 3


def test_store_errors_give_up_after_the_attempts(tmp_path: Path, artifact: Path, monkeypatch) -> None:
    import exec_service.server as server_mod

    flaky = _FlakyStore(failures=100)
    monkeypatch.setattr(server_mod, "open_artifact", flaky)
    message, _ = _refused(f"file://{artifact}/manifest.json", load_attempts=3, load_retry_s=0.01, **SMALL)
    assert flaky.calls == 3
    assert "the store failed 3 times" in message and "SlowDown" in message
