"""uvicorn serving the OpenAI front on the exec server's own event loop.

Not ``uvicorn.run`` (its own loop, its own process model) and not ``Server.serve`` as it is: that
installs SIGTERM/SIGINT handlers of its own, and the exec server's drain owns those signals. The
socket is bound here, so a port in use is an ``OSError`` at start (as for gRPC) and port 0 picks a
free one (tests). TLS and mTLS come from the gRPC settings (``ServerSecurity.tls``); bearer tokens
are checked by the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Generator
from typing import Any

import uvicorn

from shared.security import TLSConfig

log = logging.getLogger("neuron_serve.exec.http")


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves the process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while old sockets linger
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot bind the HTTP server to {host}:{port}: {e.strerror or e}") from e
    sock.set_inheritable(True)
    return sock


class HttpServer:
    """``start()`` binds and serves ``app``; ``stop(grace_s)`` lets open responses finish up to
    ``grace_s``, then cancels them."""

    def __init__(self, app: Any, host: str, port: int, tls: TLSConfig | None = None) -> None:
        self.host, self.requested_port, self.tls = host, port, tls
        self.port = 0
        kw: dict[str, Any] = {}
        if tls is not None:
            kw = {
                "ssl_certfile": tls.cert_file,
                "ssl_keyfile": tls.key_file,
                "ssl_ca_certs": tls.client_ca_file,
                "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.client_ca_file else ssl.CERT_NONE,
            }
        self._config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,  # the process's logging as it is (uvicorn would install its own)
            access_log=False,  # the exec server logs each request itself
            server_header=False,
            proxy_headers=False,
            timeout_keep_alive=30,
            **kw,
        )
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    async def start(self) -> int:
        self._config.load()  # TLS files are read here: a bad one fails the start
        sock = _bind(self.host, self.requested_port)
        port = sock.getsockname()[1]
        server = self._server = _EmbeddedServer(self._config)
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="http-server")
        while not server.started:  # startup is a few awaits: listen on the bound socket
            if self._task.done():
                self._task.result()  # raises what failed it
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.005)
        self.port = port  # set once it accepts connections
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", self.scheme, self.host, self.port)
        return self.port

    async def stop(self, grace_s: float = 0.0) -> None:
        server, task = self._server, self._task
        if server is None or task is None:
            return
        self._server = self._task = None
        server.config.timeout_graceful_shutdown = max(grace_s, 0.1)  # then uvicorn cancels what is left
        server.should_exit = True  # listeners close, idle connections are told to close
        deadline = time.monotonic() + grace_s
        while server.server_state.tasks and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.02)
        if not server.server_state.tasks:
            # every response is complete: what is left are keep-alive connections closing (a TLS close
            # waits for the peer's close_notify): nothing to wait for
            server.force_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def close(self) -> None:
        """Synchronous last resort (the server object is being torn down without ``stop``)."""
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True
