"""gRPC server plumbing shared by the prep and exec servers.

Both servers are ``grpc.aio`` servers with the same options, the standard ``grpc.health.v1``
service (liveness on ``""``, readiness per service name), server reflection, Prometheus metrics on a
separate HTTP port and a graceful drain on SIGTERM/SIGINT:

    readiness NOT_SERVING -> new work refused -> in-flight work finishes (up to a grace period)
    -> server stopped

Liveness (``""``) stays SERVING while draining: the process is healthy and finishing its work, and a
failing liveness probe would only make Kubernetes kill it early.

TLS / mTLS (server credentials) and bearer-token auth (an interceptor) come from
``ServerSecurity``; exceptions become statuses through each service's ``ErrorMap``
(``shared/rpc_errors.py``, applied by :func:`add_service`); the lifecycle both servers share is
``shared/serving.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from shared.rpc_errors import ErrorMap, RpcError, StatusHook
from shared.security import BearerTokenInterceptor, TLSConfig, load_tokens

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# Generate requests/responses and operations are small; 64 MiB leaves room for long prompts given as
# token ids and for large ModelInfo/ListOperations answers while still bounding a hostile client.
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel arguments for both servers."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Server-initiated keepalive pings find dead clients of long streams (WatchOperation,
        # Generate) behind NATs and load balancers that drop idle connections.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Accept client keepalive pings as often as every 10 s (the default 5 min makes clients
        # that ping more often than that get GOAWAY "too_many_pings").
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        # gRPC enables SO_REUSEPORT by default on Linux, which lets a second server silently share
        # a port that is already in use; a port clash must be an error instead.
        ("grpc.so_reuseport", 0),
    ]


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):  # bare IPv6 literal
        host = f"[{host}]"
    return f"{host}:{port}"


@dataclass
class GrpcServer:
    """An aio server with health and reflection, bound but not yet started."""

    server: grpc.aio.Server
    health: health_aio.HealthServicer
    port: int
    host: str
    service_names: tuple[str, ...]
    health_server: grpc.aio.Server | None = None
    _serving: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return _address(self.host, self.port)

    async def start(self, ready: bool = True) -> None:
        """Starts serving. Readiness for every service name becomes SERVING, or stays NOT_SERVING
        with ``ready=False`` (a server that answers health checks while it loads a model)."""
        await self.set_ready(False)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        if ready:
            await self.set_ready(True)

    async def set_ready(self, ready: bool) -> None:
        status = SERVING if ready else NOT_SERVING
        for name in self.service_names:
            await self.health.set(name, status)
        self._serving = ready

    @property
    def ready(self) -> bool:
        return self._serving

    async def drain(
        self,
        grace_s: float,
        wait_idle: Callable[[float], Awaitable[None]] | None = None,
        min_stop_grace_s: float = 1.0,
    ) -> None:
        """Graceful shutdown: readiness NOT_SERVING, let in-flight work finish, then stop.

        ``wait_idle(timeout_s)`` is the service's own hook: it stops accepting new work, waits up to
        ``timeout_s`` for in-flight work, and winds down what is left. Whatever grace remains after
        it (at least ``min_stop_grace_s``, so that streams can still send the final state of work
        that was just wound down) is given to the in-flight RPCs by ``server.stop``.
        """
        deadline = time.monotonic() + max(grace_s, 0.0)
        await self.set_ready(False)
        if wait_idle is not None:
            try:
                await wait_idle(max(deadline - time.monotonic(), 0.0))
            except Exception:
                log.exception("error while draining")
        await self.server.stop(grace=max(deadline - time.monotonic(), min_stop_grace_s))
        if self.health_server is not None:
            await self.health_server.stop(grace=None)

    async def stop(self, grace_s: float | None = None) -> None:
        await self.set_ready(False)
        await self.server.stop(grace=grace_s)
        if self.health_server is not None:
            await self.health_server.stop(grace=None)


def create_server(
    servicers: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    reflection_enabled: bool = True,
    security: ServerSecurity | None = None,
) -> GrpcServer:
    """Creates a ``grpc.aio`` server with health and reflection and binds ``host:port``.

    ``servicers(server)`` adds the service implementations (``add_XServicer_to_server``).
    ``port=0`` picks a free port; the bound one is in the result. Must be called with a running
    event loop (the aio server binds to it). Readiness for ``service_names`` is NOT_SERVING until
    :meth:`GrpcServer.start`; liveness ``""`` is SERVING from the start.
    """
    security = security or ServerSecurity()
    interceptors = list(interceptors)
    if security.tokens:
        interceptors.insert(
            0, BearerTokenInterceptor(security.tokens, allow_reflection=security.reflection_without_auth)
        )
    server = grpc.aio.server(
        options=server_options(max_message_bytes),
        interceptors=interceptors or None,
    )
    servicers(server)

    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = tuple(service_names)
    if reflection_enabled:
        reflection.enable_server_reflection(
            (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )

    creds = security.tls.server_credentials() if security.tls else None
    bound = _bind(server, host, port, creds)
    health_server = None
    if security.health_port is not None:
        # Kubernetes' gRPC probes cannot speak TLS: a plaintext port that serves health only.
        health_server = grpc.aio.server(options=server_options(64 * 1024))
        health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
        _bind(health_server, host, security.health_port, None)
    return GrpcServer(
        server=server, health=health, port=bound, host=host, service_names=names, health_server=health_server
    )


def _bind(server: grpc.aio.Server, host: str, port: int, creds: grpc.ServerCredentials | None) -> int:
    address = _address(host, port)
    try:
        bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio raises when the port cannot be bound
        raise OSError(f"cannot bind gRPC server to {address}: {e}") from e
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    return bound


@dataclass(frozen=True)
class ServerSecurity:
    """TLS (mTLS when ``tls.client_ca_file`` is set), bearer tokens, and the plaintext health port."""

    tls: TLSConfig | None = None
    tokens: tuple[bytes, ...] = ()
    health_port: int | None = None
    reflection_without_auth: bool = True

    @classmethod
    def from_args(cls, args: Any) -> ServerSecurity:
        """From the CLI flags added by :func:`add_security_arguments` (env vars as fallback)."""
        hp = args.health_port if args.health_port is not None else os.environ.get("NEURON_SERVE_HEALTH_PORT")
        return cls(
            tls=TLSConfig.from_options(args.tls_cert, args.tls_key, args.tls_client_ca),
            tokens=load_tokens(args.auth_token_file),
            health_port=int(hp) if hp not in (None, "") else None,
            reflection_without_auth=not args.reflection_requires_auth,
        )


def add_security_arguments(parser: Any) -> None:
    g = parser.add_argument_group(
        "security (flags override NEURON_SERVE_TLS_* / NEURON_SERVE_AUTH_* env vars)"
    )
    g.add_argument("--tls-cert", default=None, metavar="PEM", help="server certificate (enables TLS)")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="server private key")
    g.add_argument(
        "--tls-client-ca",
        default=None,
        metavar="PEM",
        help="require client certificates signed by this CA (mTLS)",
    )
    g.add_argument(
        "--auth-token-file", default=None, metavar="FILE", help="accepted bearer tokens, one per line"
    )
    g.add_argument(
        "--health-port",
        type=int,
        default=None,
        metavar="P",
        help="plaintext port serving only grpc.health.v1 (for probes when TLS is on)",
    )
    g.add_argument(
        "--reflection-requires-auth",
        action="store_true",
        help="also require the bearer token for server reflection",
    )


def install_signal_handlers(
    drain: Callable[[], Awaitable[None]],
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> Callable[[], None]:
    """On the first SIGTERM/SIGINT, runs ``drain()`` as a task on the running loop.

    A second signal while draining exits the process at once (status 130 for SIGINT, 143 for
    SIGTERM), the way an operator expects a repeated Ctrl-C to behave. Returns a function that
    removes the handlers. Must be called from the event loop's thread (the main thread).
    """
    loop = asyncio.get_running_loop()
    sigs = tuple(signals)
    state: dict[str, asyncio.Task | None] = {"task": None}

    def on_signal(sig: signal.Signals) -> None:
        if state["task"] is None:
            log.info("received %s: draining", sig.name)
            state["task"] = loop.create_task(drain(), name="drain")
        else:
            log.warning("received %s again while draining: exiting now", sig.name)
            os._exit(128 + int(sig))

    for sig in sigs:
        loop.add_signal_handler(sig, on_signal, sig)

    def remove() -> None:
        for sig in sigs:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)

    return remove


def start_metrics_server(port: int, host: str = "127.0.0.1", registry=None):
    """Serves Prometheus metrics over HTTP on ``host:port`` in a daemon thread.

    ``port=0`` disables it (returns None). Returns the ``WSGIServer``; call ``shutdown()`` and
    ``server_close()`` on it to stop.
    """
    if not port:
        return None
    import prometheus_client

    kwargs = {} if registry is None else {"registry": registry}
    httpd, _thread = prometheus_client.start_http_server(port, addr=host, **kwargs)
    log.info("metrics on http://%s/metrics", _address(host, port))
    return httpd


def new_metrics_registry():
    """A fresh registry with the process/platform/GC collectors (one per server object, so that
    several servers in one process, as in tests, don't collide on metric names)."""
    import prometheus_client
    from prometheus_client import gc_collector, platform_collector, process_collector

    registry = prometheus_client.CollectorRegistry()
    process_collector.ProcessCollector(registry=registry)
    platform_collector.PlatformCollector(registry=registry)
    gc_collector.GCCollector(registry=registry)
    return registry


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | int | None = None) -> None:
    """Logs to stderr; level from the argument, else ``NEURON_SERVE_LOG_LEVEL``, else INFO."""
    if level is None:
        level = os.environ.get("NEURON_SERVE_LOG_LEVEL", "INFO")
    if isinstance(level, str):
        level = level.upper()
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (not the object it was at set-up), so a
    replaced or closed stderr (pytest capture, daemonized runs) never breaks logging."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Undecodable:
    """Stands in for a request whose bytes did not parse (e.g. a string field with bad UTF-8)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def add_service(
    server: grpc.aio.Server,
    servicer: object,
    service: Any,
    errors: ErrorMap | None = None,
    on_error: StatusHook | None = None,
) -> None:
    """Registers ``servicer`` for ``service`` (a ServiceDescriptor) like the generated
    ``add_*Servicer_to_server``, with two differences:

    * a request that cannot be decoded is answered INVALID_ARGUMENT (grpc's own deserializer
      failure gives UNKNOWN);
    * an exception raised by a method (or while a stream is being produced) becomes a status
      through ``errors`` (:class:`shared.rpc_errors.ErrorMap`, the service's one map), and
      ``on_error(code)`` is told (the service's rejected-requests metric).
    """
    from google.protobuf import message_factory
    from google.protobuf.message import DecodeError

    emap = errors or ErrorMap()

    async def fail(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        code, message = emap.status(exc)
        if on_error is not None:
            on_error(code)
        await context.abort(code, message)

    handlers = {}
    for method in service.methods:
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)

        def parse(data: bytes, cls=req_cls):
            try:
                return cls.FromString(data)
            except DecodeError as e:
                return _Undecodable(e)

        if method.client_streaming:
            raise NotImplementedError("client-streaming methods are not used by this project")
        if method.server_streaming:

            async def stream(request, context, fn=behaviour):
                try:
                    if isinstance(request, _Undecodable):
                        raise RpcError(
                            grpc.StatusCode.INVALID_ARGUMENT, f"undecodable request: {request.error}"
                        )
                    async for item in fn(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await fail(context, e)

            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=parse, response_serializer=resp_cls.SerializeToString
            )
        else:

            async def unary(request, context, fn=behaviour):
                try:
                    if isinstance(request, _Undecodable):
                        raise RpcError(
                            grpc.StatusCode.INVALID_ARGUMENT, f"undecodable request: {request.error}"
                        )
                    return await fn(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await fail(context, e)

            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=parse, response_serializer=resp_cls.SerializeToString
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
