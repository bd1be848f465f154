"""The prep gRPC server: ``neuronserve.prep.v1.PrepService`` as long-running operations.

The server is the shared lifecycle (``shared/serving.py``: bind, health, metrics HTTP, drain, stop)
around one :class:`~prep_service.servicer.PrepServicer`; what is the prep service's own lives
beside it:

    servicer.py     the RPCs, the worker pool, the metrics, the exception → status map
    operations.py   one operation's state, its proto view, the journal in the store
    access.py       which outputs and local sources a remote caller may use

Operations are journaled in the store (``--no-journal``: in memory only): a restarted server still
answers for them, and what was running when it died is reported FAILED as lost. A published
artifact is never lost — the same request reuses it. Finished operations beyond
``max_finished_ops`` are forgotten, oldest first.
"""

from __future__ import annotations

import logging

import grpc

from prep_service.access import AccessPolicy
from prep_service.operations import OperationJournal
from prep_service.servicer import ERRORS, SERVICE_NAME, PrepareFn, PrepServicer
from protos import prep_pb2
from shared import grpc_util
from shared.serving import ServerLifecycle, run_until_signalled

__all__ = ["SERVICE_NAME", "AccessPolicy", "PrepServer", "PrepServicer", "serve"]

log = logging.getLogger(__name__)


class PrepServer:
    """A prep gRPC server in this process (what ``serve`` runs; tests use it directly).

    ``start()`` returns the bound port (``port=0`` picks a free one), also in ``.port`` afterwards.
    ``drain()`` is the graceful shutdown run on SIGTERM (running operations get the grace period,
    then are cancelled); ``stop()`` is the quick one.
    """

    def __init__(
        self,
        *,
        store_uri: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_workers: int = 1,
        metrics_port: int = 0,
        grace_s: float = 30.0,
        prepare: PrepareFn | None = None,
        security: grpc_util.ServerSecurity | None = None,
        access: AccessPolicy | None = None,
        journal: bool = False,
    ) -> None:
        self.port = port
        self.servicer = PrepServicer(
            store_uri=store_uri,
            max_workers=max_workers,
            prepare=prepare,
            access=access,
            journal=OperationJournal(store_uri) if journal else None,
        )
        self._lifecycle = ServerLifecycle(
            add_services=self._add_services,
            service_names=[SERVICE_NAME],
            host=host,
            port=port,
            security=security,
            metrics_registry=self.servicer.metrics.registry,
            metrics_port=metrics_port,
            grace_s=grace_s,
        )

    def _add_services(self, server: grpc.aio.Server) -> None:
        grpc_util.add_service(
            server,
            self.servicer,
            prep_pb2.DESCRIPTOR.services_by_name["PrepService"],
            errors=ERRORS,
            on_error=self.servicer.metrics.on_error,
        )

    @property
    def grpc_server(self) -> grpc_util.GrpcServer:
        return self._lifecycle.grpc_server

    async def start(self) -> int:
        self.servicer.bind_loop()
        self.port = await self._lifecycle.start()
        log.info("prep server listening on %s", self._lifecycle.address)
        return self.port

    async def drain(self) -> None:
        await self._lifecycle.drain(self.servicer.wait_idle)
        self.close()

    async def stop(self, grace_s: float | None = 0) -> None:
        if self._lifecycle.started:
            self.servicer.shutdown()
        await self._lifecycle.stop(grace_s)
        self.close()

    async def wait_for_termination(self) -> None:
        await self._lifecycle.wait_for_termination()

    def close(self) -> None:
        """Cancels what still runs, releases the worker pool and stops the metrics HTTP server."""
        self.servicer.shutdown()
        self._lifecycle.close()


async def serve(
    port: int,
    store_uri: str | None,
    host: str = "127.0.0.1",
    max_workers: int = 1,
    metrics_port: int = 0,
    grace_s: float = 30.0,
    security: grpc_util.ServerSecurity | None = None,
    access: AccessPolicy | None = None,
    journal: bool = True,
) -> None:
    """Runs the prep server until SIGTERM/SIGINT, then drains gracefully."""
    server = PrepServer(
        security=security,
        access=access,
        journal=journal,
        store_uri=store_uri,
        host=host,
        port=port,
        max_workers=max_workers,
        metrics_port=metrics_port,
        grace_s=grace_s,
    )
    if store_uri is None:
        try:
            from shared.storage import default_store_uri

            log.info("store: %s (default)", default_store_uri())
        except Exception:  # only informational
            log.debug("cannot resolve the default store", exc_info=True)
    else:
        log.info("store: %s", store_uri)
    await run_until_signalled(server, "prep server")
