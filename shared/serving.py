"""The server lifecycle the prep and exec servers share: bind, health, metrics HTTP, drain, stop.

    start(ready) -> [readiness NOT_SERVING while a service loads] -> set_ready(True)
    SIGTERM/SIGINT -> drain(wait_idle): readiness NOT_SERVING, the service's own wind-down hook,
                      in-flight RPCs get what is left of the grace period -> stopped, closed

A service composes one :class:`ServerLifecycle` (its gRPC services, names, metrics registry) and
adds only what is its own (loading a model, an operation pool). :func:`run_until_signalled` is the
``serve()`` of both: start, wait, drain on the first signal, always close.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc

from shared import grpc_util

log = logging.getLogger(__name__)

WaitIdle = Callable[[float], Awaitable[None]]


class ServerLifecycle:
    def __init__(
        self,
        *,
        add_services: Callable[[grpc.aio.Server], None],
        service_names: Sequence[str],
        host: str = "127.0.0.1",
        port: int = 0,
        security: grpc_util.ServerSecurity | None = None,
        metrics_registry: Any = None,
        metrics_port: int = 0,
        grace_s: float = 30.0,
        max_message_bytes: int = grpc_util.DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._add_services = add_services
        self.service_names = tuple(service_names)
        self.host, self.requested_port = host, port
        self.security = security
        self.metrics_registry = metrics_registry
        self.metrics_port = metrics_port
        self.grace_s = grace_s
        self.max_message_bytes = max_message_bytes
        self._grpc: grpc_util.GrpcServer | None = None
        self._metrics_httpd: Any = None

    @property
    def grpc_server(self) -> grpc_util.GrpcServer:
        if self._grpc is None:
            raise RuntimeError("server not started")
        return self._grpc

    @property
    def started(self) -> bool:
        return self._grpc is not None

    @property
    def port(self) -> int:
        return self.grpc_server.port

    @property
    def address(self) -> str:
        return self.grpc_server.address

    async def start(self, ready: bool = True) -> int:
        """Bind and serve; readiness SERVING now, or NOT_SERVING until ``set_ready(True)``
        (``ready=False``: a server that answers health checks while it loads). Returns the port."""
        self._grpc = grpc_util.create_server(
            self._add_services,
            self.service_names,
            host=self.host,
            port=self.requested_port,
            security=self.security,
            max_message_bytes=self.max_message_bytes,
        )
        await self._grpc.start(ready=ready)
        self._metrics_httpd = grpc_util.start_metrics_server(
            self.metrics_port, self.host, self.metrics_registry
        )
        return self._grpc.port

    async def set_ready(self, ready: bool) -> None:
        await self.grpc_server.set_ready(ready)

    async def set_live(self, live: bool) -> None:
        """Liveness ``""``: NOT_SERVING makes Kubernetes restart the pod."""
        status = grpc_util.SERVING if live else grpc_util.NOT_SERVING
        await self.grpc_server.health.set("", status)

    async def drain(self, wait_idle: WaitIdle | None = None) -> None:
        """Graceful stop (SIGTERM): see ``GrpcServer.drain``; then ``close``."""
        if self._grpc is not None:
            await self._grpc.drain(self.grace_s, wait_idle)
        self.close()

    async def stop(self, grace_s: float | None = 0) -> None:
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
        self.close()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.server.wait_for_termination()

    def close(self) -> None:
        """Stops the metrics HTTP server (idempotent; the gRPC server is stopped by drain/stop)."""
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
            self._metrics_httpd = None


class Servable(Protocol):
    async def start(self) -> int: ...

    async def drain(self) -> None: ...

    async def wait_for_termination(self) -> None: ...

    def close(self) -> None: ...


async def run_until_signalled(server: Servable, name: str) -> None:
    """Runs ``server`` until SIGTERM/SIGINT, then drains it; closes it whatever happens (a start
    that raises — e.g. a model that cannot be loaded — propagates to the caller)."""
    remove = grpc_util.install_signal_handlers(server.drain)
    try:
        await server.start()
        await server.wait_for_termination()
    finally:
        remove()
        server.close()
    log.info("%s stopped", name)
