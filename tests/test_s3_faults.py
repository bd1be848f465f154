"""S3 faults between prep and a real S3 server (SeaweedFS): an HTTP proxy on loopback in front of
it answers 500s, adds latency, or goes down mid-upload. Prep retries, fails cleanly without a
manifest when the store stays down, and a rerun completes without re-uploading finished files."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest

from prep_service.api import PrepareRequest, PrepError
from prep_service.convert import prepare
from shared.storage import S3Store, open_store
from tests.helpers import make_llama


@dataclass
class Faults:
    error_every: int = 0  # answer 500 to every n-th request (0 = never)
    delay_s: float = 0.0
    down: bool = False  # drop every connection without an answer
    down_after_puts: int | None = None  # go down once this many shard PUTs succeeded
    puts: list[str] = field(default_factory=list)  # paths of successful PUTs
    count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _proxy(upstream: str, faults: Faults) -> ThreadingHTTPServer:
    target = urlparse(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self) -> None:
            body = self._body()
            with faults.lock:
                faults.count += 1
                n = faults.count
                down = faults.down
            if down:
                self.close_connection = True
                return  # no answer at all: the client sees the connection drop
            if faults.delay_s:
                time.sleep(faults.delay_s)
            if faults.error_every and n % faults.error_every == 0:
                msg = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                self.send_response(500)
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",)}
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                    self.send_header(k, v)
            # HEAD answers carry the object's length but no body
            length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
            self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            if self.command == "PUT" and resp.status == 200 and "/shards/" in self.path:
                with faults.lock:
                    faults.puts.append(self.path.split("?")[0])
                    if faults.down_after_puts is not None and len(faults.puts) >= faults.down_after_puts:
                        faults.down = True

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def flaky(s3_env: str, seaweedfs, monkeypatch) -> Iterator[tuple[str, Faults, str]]:
    """(bucket URI, faults, proxy endpoint): AWS_ENDPOINT_URL points at the proxy."""
    faults = Faults()
    server = _proxy(seaweedfs.endpoint_url, faults)
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    yield s3_env, faults, endpoint
    server.shutdown()
    server.server_close()


def _direct(bucket_uri: str, seaweedfs) -> S3Store:
    """The bucket seen straight from SeaweedFS, not through the proxy."""
    return S3Store(bucket_uri.removeprefix("s3://"), endpoint_url=seaweedfs.endpoint_url)


def test_500s_and_latency_are_retried(tmp_path: Path, flaky, seaweedfs) -> None:
    bucket, faults, _ = flaky
    faults.error_every, faults.delay_s = 3, 0.02
    make_llama(tmp_path / "ckpt")
    res = prepare(PrepareRequest(source=str(tmp_path / "ckpt"), tp_degree=2, output=f"{bucket}/store"))
    assert faults.count > 10  # requests really went through the faulty proxy
    direct = _direct(bucket, seaweedfs)
    key = res.manifest_uri.removeprefix(f"{bucket}/")
    assert direct.exists(key)


def test_store_down_mid_upload_then_rerun_reuses_finished_files(tmp_path: Path, flaky, seaweedfs) -> None:
    bucket, faults, _ = flaky
    make_llama(tmp_path / "ckpt", num_hidden_layers=4)
    faults.down_after_puts = 1  # the first shard lands, then the store disappears
    t0 = time.monotonic()
    with pytest.raises(PrepError, match="store s3://"):
        prepare(PrepareRequest(source=str(tmp_path / "ckpt"), tp_degree=2, output=f"{bucket}/store"))
    assert time.monotonic() - t0 < 120  # retries are bounded
    direct = _direct(bucket, seaweedfs)
    listed = [o.key for o in direct.list("store/")]
    assert not [k for k in listed if k.endswith("manifest.json")]  # no manifest: not a model
    assert [k for k in listed if "/shards/" in k]  # but the finished shard is there

    first_put = list(faults.puts)
    faults.down, faults.down_after_puts = False, None
    res = prepare(PrepareRequest(source=str(tmp_path / "ckpt"), tp_degree=2, output=f"{bucket}/store"))
    assert direct.exists(res.manifest_uri.removeprefix(f"{bucket}/"))
    again = faults.puts[len(first_put) :]
    assert first_put[0] not in again, "the shard finished before the outage was uploaded again"
    assert len(again) == 1  # only the other rank's shard
    # and what was published is complete and verified
    store = open_store(f"{bucket}/store")
    assert len([o for o in store.list("models/") if "/shards/" in o.key]) == 2
