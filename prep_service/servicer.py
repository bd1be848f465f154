"""``neuronserve.prep.v1.PrepService``: the servicer, its Prometheus metrics and its error map.

``PrepareModel`` validates the request, returns an ``Operation`` at once and runs the pipeline
(:func:`prep_service.convert.prepare`) on a bounded worker pool; queued operations stay PENDING.
An identical request (same normalized fields, ``force`` unset) while one is PENDING/RUNNING returns
that operation; after it finished, ``prepare`` itself reuses the published artifact by its key.
``CompileGraphs`` is an operation of the same kind (``kind = "compile"``): it runs the public
``neuron-serve compile`` as a child process (``prep_service.compile_job``: the prep service knows
nothing of how graphs are compiled), reports per-graph progress, and an existing graph set of the
request's key is answered at once (``reused``).

Errors: a method raises and :data:`ERRORS` (applied to every RPC by ``shared.grpc_util.add_service``)
turns the exception into a status — PrepError INVALID_ARGUMENT, PermissionError PERMISSION_DENIED,
an unknown operation id NOT_FOUND, draining UNAVAILABLE, anything else INTERNAL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc

from prep_service.access import AccessPolicy
from prep_service.api import PrepareRequest, PrepareResult, PrepCancelled, PrepError, Progress
from prep_service.compile_job import CompileRequest, CompileResult, run_compile
from prep_service.operations import (
    CANCELLED,
    COMPILE,
    FAILED,
    PENDING,
    RUNNING,
    STATE_NAMES,
    SUCCEEDED,
    TERMINAL,
    OperationJournal,
    OperationNotFound,
    OperationRecord,
    dedup_key,
    request_from_proto,
)
from protos import prep_pb2, prep_pb2_grpc
from shared import grpc_util
from shared.rpc_errors import ErrorMap, unavailable

log = logging.getLogger(__name__)

SERVICE_NAME = prep_pb2.DESCRIPTOR.services_by_name[
    "PrepService"
].full_name  # neuronserve.prep.v1.PrepService

ERRORS = ErrorMap(
    (
        (PrepError, grpc.StatusCode.INVALID_ARGUMENT),
        (PermissionError, grpc.StatusCode.PERMISSION_DENIED),
        (OperationNotFound, grpc.StatusCode.NOT_FOUND),
    )
)
"""The service's one exception → status map (``RpcError``, e.g. draining, carries its own code)."""

# WatchOperation sends at most this many updates per second per stream; intermediate states are
# coalesced into the latest one (the terminal state is always sent).
WATCH_MAX_RATE_HZ = 10.0


class PrepareFn(Protocol):
    def __call__(
        self,
        req: PrepareRequest,
        *,
        progress: Callable[[Progress], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> PrepareResult: ...


class CompileFn(Protocol):
    def __call__(
        self,
        req: CompileRequest,
        *,
        progress: Callable[[Progress], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> CompileResult: ...


def _default_prepare() -> PrepareFn:
    # Imported lazily: the pipeline pulls in torch/transformers, which the servicer's tests and
    # `neuron-serve --help` don't need.
    from prep_service.convert import prepare

    return prepare


class PrepMetrics:
    """Prometheus metrics of one prep server (its own registry, see grpc_util.new_metrics_registry)."""

    def __init__(self, servicer: PrepServicer, registry=None) -> None:
        from prometheus_client import Counter, Histogram
        from prometheus_client.core import GaugeMetricFamily
        from prometheus_client.registry import Collector

        self.registry = registry if registry is not None else grpc_util.new_metrics_registry()
        self.finished = Counter(
            "neuronserve_prep_operations_finished",
            "Operations that reached a terminal state, by state.",
            ["state"],
            registry=self.registry,
        )
        self.bytes_processed = Counter(
            "neuronserve_prep_bytes_processed",
            "Bytes processed by the pipeline, summed over its stages (hashing, converting, uploading).",
            registry=self.registry,
        )
        self.duration = Histogram(
            "neuronserve_prep_operation_duration_seconds",
            "Run time of finished operations (from RUNNING to the terminal state).",
            ["state"],
            buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400),
            registry=self.registry,
        )
        self.rejected = Counter(
            "neuronserve_prep_requests_rejected",
            "RPCs answered with an error status, by code.",
            ["code"],
            registry=self.registry,
        )

        class _OpsByState(Collector):
            def collect(self):
                g = GaugeMetricFamily(
                    "neuronserve_prep_operations",
                    "Operations held by the server, by state.",
                    labels=["state"],
                )
                for name, n in servicer.count_by_state().items():
                    g.add_metric([name], n)
                yield g

        self.registry.register(_OpsByState())

    def on_error(self, code: grpc.StatusCode) -> None:
        """``add_service``'s hook: every RPC that ends with an error status."""
        self.rejected.labels(code.name).inc()


class PrepServicer(prep_pb2_grpc.PrepServiceServicer):
    """Implements PrepService; the pipeline is injected (``prepare``) so tests can fake it."""

    def __init__(
        self,
        *,
        store_uri: str | None = None,
        max_workers: int = 1,
        prepare: PrepareFn | None = None,
        compile: CompileFn | None = None,
        max_finished_ops: int = 1000,
        metrics_registry=None,
        access: AccessPolicy | None = None,
        journal: OperationJournal | None = None,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self._store_uri = store_uri  # None: the pipeline's default store
        if access is None:
            from shared.storage import default_store_uri

            access = AccessPolicy(outputs=(store_uri or default_store_uri(),))
        self._access = access
        self._journal = journal
        self._prepare = prepare if prepare is not None else _default_prepare()
        self._compile = compile if compile is not None else run_compile
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="prep-worker"
        )
        self._max_finished_ops = max_finished_ops
        self._ops: dict[str, OperationRecord] = {}  # insertion order = creation order
        self._ops_lock = threading.Lock()  # guards _ops (read by the metrics thread)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self.metrics = PrepMetrics(self, metrics_registry)
        if journal is not None:
            self._recover()

    def _recover(self) -> None:
        """Load the journal of earlier processes; what they left unfinished is reported as lost."""
        assert self._journal is not None
        restored = sorted((OperationRecord.restore(m) for m in self._journal.load()), key=lambda o: o.created)
        for op in restored:
            if not op.terminal:
                was = STATE_NAMES[op.state]
                op.state, op.error = (
                    FAILED,
                    (
                        f"lost: the prep server restarted while this operation was {was}; nothing was published "
                        "by it — submit the same request again (a finished artifact is reused)"
                    ),
                )
                op.progress = dataclasses.replace(op.progress, stage="lost")
                op.updated = time.time()
                self._journal.save(op)
            op.done.set()
            self._ops[op.id] = op
        if restored:
            log.info("restored %d operations from the journal", len(restored))

    # ----------------------------------------------------------------- RPCs

    async def PrepareModel(self, request: prep_pb2.PrepareModelRequest, context) -> prep_pb2.Operation:
        self.bind_loop()
        if self._draining:
            raise unavailable("prep server is draining")
        req = request_from_proto(request, self._store_uri)  # PrepError: INVALID_ARGUMENT
        self._access.check(req)  # PermissionError: PERMISSION_DENIED
        return await self._submit(
            req,
            request,
            f"{req.source} tp={req.tp_degree} dtype={req.dtype} output={req.output or '(default store)'}",
        )

    async def CompileGraphs(self, request: prep_pb2.CompileGraphsRequest, context) -> prep_pb2.Operation:
        """``neuron-serve compile`` as an operation: the graph set of a manifest and serving shape,
        published to ``output`` (default: the manifest's store); an existing one is reused."""
        self.bind_loop()
        if self._draining:
            raise unavailable("prep server is draining")
        req = CompileRequest.from_proto(request)  # PrepError: INVALID_ARGUMENT, naming the field
        self._access.check_compile(req.output, req.manifest_uri)
        return await self._submit(req, request, f"compile {req.manifest_uri} device={req.device} {req.shape}")

    async def _submit(
        self,
        req: PrepareRequest | CompileRequest,
        request_pb: prep_pb2.PrepareModelRequest | prep_pb2.CompileGraphsRequest,
        what: str,
    ) -> prep_pb2.Operation:
        if not req.force:
            key = req.dedup_key() if isinstance(req, CompileRequest) else dedup_key(req)
            existing = self._find_active(key)
            if existing is not None:
                log.info("operation %s: identical request joined the active operation", existing.id)
                return existing.to_proto()
        op = OperationRecord(req, request_pb)
        with self._ops_lock:
            self._ops[op.id] = op
            self._forget_old_ops()
        log.info("operation %s: queued %s%s", op.id, what, " force" if req.force else "")
        snapshot = op.to_proto()  # before the worker can touch it: the answer says PENDING
        if self._journal is not None:
            await asyncio.to_thread(self._journal.save, op)
        op.future = self._executor.submit(self._run, op)
        return snapshot

    async def GetOperation(self, request: prep_pb2.GetOperationRequest, context) -> prep_pb2.Operation:
        return self._get(request.operation_id).to_proto()

    async def WatchOperation(
        self, request: prep_pb2.WatchOperationRequest, context
    ) -> AsyncIterator[prep_pb2.Operation]:
        op = self._get(request.operation_id)
        min_interval = 1.0 / WATCH_MAX_RATE_HZ
        while True:
            changed = op.changed  # take the event before the snapshot: no change can be missed
            msg = op.to_proto()
            sent_at = time.monotonic()
            yield msg
            if msg.state in TERMINAL:
                return
            await changed.wait()
            # Coalesce: whatever happens within min_interval goes out as one (the latest) state.
            delay = sent_at + min_interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def CancelOperation(self, request: prep_pb2.CancelOperationRequest, context) -> prep_pb2.Operation:
        op = self._get(request.operation_id)
        self.cancel(op)
        return op.to_proto()

    async def ListOperations(
        self, request: prep_pb2.ListOperationsRequest, context
    ) -> prep_pb2.ListOperationsResponse:
        with self._ops_lock:
            ops = list(self._ops.values())
        ops.sort(key=lambda o: o.created, reverse=True)  # newest first
        return prep_pb2.ListOperationsResponse(operations=[o.to_proto() for o in ops])

    # ------------------------------------------------------ operations

    def cancel(self, op: OperationRecord) -> None:
        """Asks an operation to stop. A PENDING one is cancelled here and never runs; a RUNNING one
        becomes CANCELLED when the pipeline notices (it raises PrepCancelled, publishing nothing)."""
        op.cancel.set()
        with op.lock:
            if op.state != PENDING:
                return
            self._finish_locked(op, CANCELLED, stage="cancelled")
        log.info("operation %s: cancelled before it started", op.id)
        if op.future is not None:
            op.future.cancel()
        if self._journal is not None:
            self._journal.save(op)
        self._notify(op)

    def _run(self, op: OperationRecord) -> None:
        """Worker thread: runs the pipeline for one operation."""
        with op.lock:
            if op.state != PENDING or op.cancel.is_set():
                return  # cancelled while queued
            op.state = RUNNING
            op.progress = dataclasses.replace(op.progress, stage="starting")
            op.updated = time.time()
            op.started_mono = time.monotonic()
        log.info("operation %s: running", op.id)
        if self._journal is not None:
            self._journal.save(op)
        self._notify(op)

        try:
            on_progress = lambda p: self._on_progress(op, p)  # noqa: E731
            result: PrepareResult | CompileResult
            if op.kind == COMPILE:
                result = self._compile(op.req, progress=on_progress, cancel=op.cancel)
            else:
                result = self._prepare(op.req, progress=on_progress, cancel=op.cancel)
        except PrepCancelled:
            self._finish(op, CANCELLED, stage="cancelled")
            log.info("operation %s: cancelled", op.id)
        except PrepError as e:
            self._finish(op, FAILED, stage="failed", error=str(e))
            log.warning("operation %s: failed: %s", op.id, e)
        except Exception as e:  # any other failure is reported on the operation, never lost
            self._finish(op, FAILED, stage="failed", error=f"internal error: {type(e).__name__}: {e}")
            log.exception("operation %s: unexpected error", op.id)
        else:
            if isinstance(result, CompileResult):
                uri, fields = (
                    result.graph_set_uri,
                    {
                        "manifest_uri": op.req.manifest_uri,
                        "graph_set_uri": result.graph_set_uri,
                        "graph_key": result.graph_key,
                    },
                )
            else:
                uri, fields = (
                    result.manifest_uri,
                    {
                        "manifest_uri": result.manifest_uri,
                        "artifact_key": result.artifact_key,
                    },
                )
            self._finish(op, SUCCEEDED, stage="done", reused=result.reused, **fields)
            log.info("operation %s: succeeded%s: %s", op.id, " (reused)" if result.reused else "", uri)

    def _on_progress(self, op: OperationRecord, p: Progress) -> None:
        """Worker thread: the pipeline's progress callback."""
        with op.lock:
            if op.terminal:
                return
            prev = op.progress.bytes_done
            # A counter that went down was restarted by a new stage: count it again from zero.
            delta = p.bytes_done - prev if p.bytes_done >= prev else p.bytes_done
            # Copy: the pipeline may keep mutating the object it passes.
            op.progress = dataclasses.replace(p)
            op.updated = time.time()
        if delta > 0:
            self.metrics.bytes_processed.inc(delta)
        self._notify(op)

    def _finish(self, op: OperationRecord, state: int, **fields) -> None:
        with op.lock:
            if op.terminal:
                return
            self._finish_locked(op, state, **fields)
        if self._journal is not None:
            self._journal.save(op)
        self._notify(op)

    def _finish_locked(
        self,
        op: OperationRecord,
        state: int,
        *,
        stage: str,
        error: str = "",
        manifest_uri: str = "",
        artifact_key: str = "",
        reused: bool = False,
        graph_set_uri: str = "",
        graph_key: str = "",
    ) -> None:
        op.state = state
        op.progress = dataclasses.replace(op.progress, stage=stage)
        if state == SUCCEEDED and op.progress.bytes_total:
            op.progress.bytes_done = op.progress.bytes_total
        op.error = error
        op.manifest_uri = manifest_uri
        op.artifact_key = artifact_key
        op.reused = reused
        op.graph_set_uri, op.graph_key = graph_set_uri, graph_key
        op.updated = time.time()
        name = STATE_NAMES[state]
        self.metrics.finished.labels(name).inc()
        if op.started_mono is not None:
            self.metrics.duration.labels(name).observe(time.monotonic() - op.started_mono)

    def _notify(self, op: OperationRecord) -> None:
        """Any thread: wakes the loop-side watchers of ``op`` (at most one wakeup in flight)."""
        loop = self._loop
        if loop is None:
            return
        with op.lock:
            if op.notify_pending:
                return
            op.notify_pending = True
        # RuntimeError: the loop is closed; the server is gone and nobody is watching.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._wake, op)

    def _wake(self, op: OperationRecord) -> None:
        """Loop thread."""
        with op.lock:
            op.notify_pending = False
            terminal = op.terminal
        changed, op.changed = op.changed, asyncio.Event()
        changed.set()
        if terminal:
            op.done.set()

    # --------------------------------------------------------- helpers

    def bind_loop(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()

    def _get(self, operation_id: str) -> OperationRecord:
        self.bind_loop()
        with self._ops_lock:
            op = self._ops.get(operation_id)
        if op is None:
            raise OperationNotFound(f"no operation {operation_id!r}")
        return op

    def _find_active(self, key: tuple) -> OperationRecord | None:
        with self._ops_lock:
            ops = list(self._ops.values())
        for op in reversed(ops):
            with op.lock:
                if op.key == key and not op.terminal:
                    return op
        return None

    def _forget_old_ops(self) -> None:
        """Caller holds _ops_lock. Drops the oldest finished operations beyond the cap."""
        finished = [op_id for op_id, op in self._ops.items() if op.terminal]
        for op_id in finished[: max(len(finished) - self._max_finished_ops, 0)]:
            del self._ops[op_id]

    def count_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(STATE_NAMES.values(), 0)
        with self._ops_lock:
            ops = list(self._ops.values())
        for op in ops:
            counts[STATE_NAMES[op.state]] += 1
        return counts

    def active_operations(self) -> list[OperationRecord]:
        with self._ops_lock:
            return [op for op in self._ops.values() if not op.terminal]

    # ----------------------------------------------------------- drain

    async def wait_idle(self, timeout_s: float, cancel_wait_s: float = 10.0) -> None:
        """Drain hook: refuses new operations, waits up to ``timeout_s`` for the active ones, then
        cancels the rest and waits up to ``cancel_wait_s`` for the pipeline to acknowledge."""
        self.bind_loop()
        self._draining = True
        active = self.active_operations()
        if active:
            log.info("draining: waiting up to %.0fs for %d operation(s)", timeout_s, len(active))
            await self._wait_done(active, timeout_s)
        left = self.active_operations()
        if left:
            log.warning("draining: cancelling %d unfinished operation(s)", len(left))
            for op in left:
                self.cancel(op)
            await self._wait_done(left, cancel_wait_s)
        still = self.active_operations()
        if still:
            log.warning("draining: %d operation(s) did not stop in time", len(still))

    async def _wait_done(self, ops: list[OperationRecord], timeout_s: float) -> None:
        waits = [asyncio.ensure_future(op.done.wait()) for op in ops if not op.terminal]
        if not waits:
            return
        _done, pending = await asyncio.wait(waits, timeout=timeout_s)
        for w in pending:
            w.cancel()

    def shutdown(self) -> None:
        """Cancels everything and releases the worker pool (does not wait for running threads)."""
        self._draining = True
        for op in self.active_operations():
            self.cancel(op)
        self._executor.shutdown(wait=False, cancel_futures=True)
