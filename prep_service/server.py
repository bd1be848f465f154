"""The prep gRPC server: ``neuronserve.prep.v1.PrepService`` as long-running operations.

``PrepareModel`` validates the request, returns an ``Operation`` at once and runs the pipeline
(:func:`prep_service.convert.prepare`) on a bounded worker pool; queued operations stay PENDING.
An identical request (same normalized fields, ``force`` unset) while one is PENDING/RUNNING returns
that operation; after it finished, ``prepare`` itself reuses the published artifact by its key.

Operations live in memory only: a restart loses them (a published artifact is not lost — the same
request reuses it). Finished operations beyond ``max_finished_ops`` are forgotten, oldest first.

Threading: the pipeline runs in worker threads; every change to an operation is made under the
operation's lock and announced to the event loop with ``loop.call_soon_threadsafe``, which wakes the
``WatchOperation`` streams of that operation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc

from prep_service.api import PrepareRequest, PrepareResult, PrepCancelled, PrepError, Progress
from protos import prep_pb2, prep_pb2_grpc
from shared import grpc_util

log = logging.getLogger(__name__)

SERVICE_NAME = prep_pb2.DESCRIPTOR.services_by_name[
    "PrepService"
].full_name  # neuronserve.prep.v1.PrepService

State = prep_pb2.Operation.State
PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    State.PENDING,
    State.RUNNING,
    State.SUCCEEDED,
    State.FAILED,
    State.CANCELLED,
)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
STATE_NAMES = {s: State.Name(s) for s in (PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED)}

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


def _default_prepare() -> PrepareFn:
    # Imported lazily: the pipeline pulls in torch/transformers, which the servicer's tests and
    # `neuron-serve --help` don't need.
    from prep_service.convert import prepare

    return prepare


def request_from_proto(msg: prep_pb2.PrepareModelRequest, default_output: str | None) -> PrepareRequest:
    """Builds the pipeline's request; raises PrepError (-> INVALID_ARGUMENT) for bad fields."""
    return PrepareRequest(
        source=msg.source.strip(),
        revision=msg.revision.strip() or None,
        output=msg.output.strip() or default_output,
        tp_degree=msg.tp_degree,
        dtype=msg.dtype.strip() or "float32",
        gqa_strategy=msg.gqa_strategy.strip() if msg.HasField("gqa_strategy") else None,
        force=msg.force,
        allow_pickle=msg.allow_pickle,
        name=msg.name.strip() or None,
        quantize=msg.quantize.strip() or None,
        quantize_lm_head=msg.quantize_lm_head,
    )


def _norm_uri(uri: str) -> str:
    """A comparable form of a store URI; raises PrepError for one with '.' or '..' segments."""
    if uri.startswith("s3://"):
        parts = uri[len("s3://") :].rstrip("/").split("/")
        if any(p in (".", "..") for p in parts) or not parts[0]:
            raise PrepError(f"invalid S3 URI {uri!r} ('.'/'..' segments are not allowed)")
        return "s3://" + "/".join(p for p in parts if p)
    if "://" in uri and not uri.startswith("file://"):
        raise PrepError(f"unsupported store URI scheme in {uri!r}")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    from urllib.parse import unquote

    return "file://" + os.path.normpath(os.path.abspath(unquote(path)))


def _within(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


@dataclasses.dataclass(frozen=True)
class AccessPolicy:
    """What remote callers may read and write on this server's behalf.

    ``outputs``: store URI prefixes a request may publish to (default: the server's store).
    ``source_roots``: local directories a request's local/file:// source must lie under; ``None``
    allows any local path (development only — set ``--source-root`` in production).
    """

    outputs: tuple[str, ...]
    source_roots: tuple[str, ...] | None = None

    def check(self, req: PrepareRequest) -> None:
        """Raises PermissionError (-> PERMISSION_DENIED) or PrepError (-> INVALID_ARGUMENT)."""
        out = _norm_uri(req.output) if req.output else None
        if out is not None and not any(_within(out, _norm_uri(a)) for a in self.outputs):
            raise PermissionError(f"output {req.output!r} is outside the stores this server may write to")
        src = req.source
        if src.startswith("s3://"):
            _norm_uri(src)
            return
        looks_local = src.startswith(("file://", "/", ".", "~")) or (os.sep in src and os.path.exists(src))
        if looks_local and self.source_roots is not None:
            path = os.path.realpath(
                os.path.expanduser(src[len("file://") :] if src.startswith("file://") else src)
            )
            if not any(_within("file://" + path, "file://" + os.path.realpath(r)) for r in self.source_roots):
                raise PermissionError(f"source {src!r} is outside the directories this server may read")


def _dedup_key(req: PrepareRequest) -> tuple:
    """Identity of a request for de-duplicating concurrent operations (everything but ``force``)."""
    return dataclasses.astuple(dataclasses.replace(req, force=False))


class _Operation:
    """One operation's state; fields change only under ``lock``."""

    def __init__(self, req: PrepareRequest, request_pb: prep_pb2.PrepareModelRequest) -> None:
        self.id = uuid.uuid4().hex
        self.req = req
        self.key = _dedup_key(req)
        self.request_pb = request_pb
        self.lock = threading.Lock()
        self.cancel = threading.Event()
        self.state = PENDING
        self.progress = Progress(stage="pending")
        self.manifest_uri = ""
        self.error = ""
        self.artifact_key = ""
        self.reused = False
        self.created = time.time()
        self.updated = self.created
        self.started_mono: float | None = None
        self.future: concurrent.futures.Future | None = None
        # Loop-side wakeup of WatchOperation streams: set and replaced on every change.
        self.changed = asyncio.Event()
        self.notify_pending = False  # a wakeup is already scheduled on the loop
        self.done = asyncio.Event()  # set once the state is terminal (loop side)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @classmethod
    def restore(cls, msg: prep_pb2.Operation) -> _Operation:
        """An operation from the journal of an earlier server process."""
        try:
            req = request_from_proto(msg.request, None)
        except PrepError:
            req = PrepareRequest(source="(unreadable request)")
        op = cls(req, msg.request)
        op.id = msg.operation_id
        op.state = msg.state
        p = msg.progress
        op.progress = Progress(p.stage, p.bytes_done, p.bytes_total, p.tensors_done, p.tensors_total)
        op.manifest_uri, op.error, op.artifact_key, op.reused = (
            msg.manifest_uri,
            msg.error,
            msg.artifact_key,
            msg.reused,
        )
        op.created, op.updated = msg.created_unix, msg.updated_unix
        return op

    def to_proto(self) -> prep_pb2.Operation:
        with self.lock:
            p = self.progress
            return prep_pb2.Operation(
                operation_id=self.id,
                state=self.state,
                progress=prep_pb2.Progress(
                    stage=p.stage,
                    bytes_done=max(p.bytes_done, 0),
                    bytes_total=max(p.bytes_total, 0),
                    tensors_done=max(p.tensors_done, 0),
                    tensors_total=max(p.tensors_total, 0),
                ),
                manifest_uri=self.manifest_uri,
                error=self.error,
                artifact_key=self.artifact_key,
                reused=self.reused,
                request=self.request_pb,
                created_unix=self.created,
                updated_unix=self.updated,
            )


class OperationJournal:
    """Operations persisted in the store (``operations/{id}.json``), so that a restarted server
    still answers Get/List truthfully: what finished keeps its result, and what was running when
    the process died is reported FAILED as lost (never left RUNNING forever)."""

    PREFIX = "operations/"

    def __init__(self, store_uri: str | None) -> None:
        from shared.storage import open_store

        self._store = open_store(store_uri)

    def save(self, op: _Operation) -> None:
        from google.protobuf import json_format

        try:
            self._store.put_bytes(
                f"{self.PREFIX}{op.id}.json", json_format.MessageToJson(op.to_proto()).encode()
            )
        except Exception:  # the journal must never fail an operation
            log.warning("could not journal operation %s", op.id, exc_info=True)

    def load(self) -> list[prep_pb2.Operation]:
        from google.protobuf import json_format

        out = []
        try:
            objects = self._store.list(self.PREFIX)
        except Exception:
            log.warning("could not read the operations journal", exc_info=True)
            return out
        for obj in objects:
            try:
                out.append(json_format.Parse(self._store.get_bytes(obj.key), prep_pb2.Operation()))
            except Exception:
                log.warning("skipping unreadable journal entry %s", obj.key)
        return out


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


class PrepServicer(prep_pb2_grpc.PrepServiceServicer):
    """Implements PrepService; the pipeline is injected (``prepare``) so tests can fake it."""

    def __init__(
        self,
        *,
        store_uri: str | None = None,
        max_workers: int = 1,
        prepare: PrepareFn | None = None,
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
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="prep-worker"
        )
        self._max_finished_ops = max_finished_ops
        self._ops: dict[str, _Operation] = {}  # insertion order = creation order
        self._ops_lock = threading.Lock()  # guards _ops (read by the metrics thread)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self.metrics = PrepMetrics(self, metrics_registry)
        if journal is not None:
            self._recover()

    def _recover(self) -> None:
        """Load the journal of earlier processes; what they left unfinished is reported as lost."""
        assert self._journal is not None
        restored = sorted((_Operation.restore(m) for m in self._journal.load()), key=lambda o: o.created)
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
        self._bind_loop()
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prep server is draining")
        try:
            req = request_from_proto(request, self._store_uri)
            self._access.check(req)
        except PrepError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except PermissionError as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))

        if not req.force:
            existing = self._find_active(_dedup_key(req))
            if existing is not None:
                log.info("operation %s: identical request joined the active operation", existing.id)
                return existing.to_proto()

        op = _Operation(req, request)
        with self._ops_lock:
            self._ops[op.id] = op
            self._forget_old_ops()
        log.info(
            "operation %s: queued %s tp=%d dtype=%s output=%s%s",
            op.id,
            req.source,
            req.tp_degree,
            req.dtype,
            req.output or "(default store)",
            " force" if req.force else "",
        )
        snapshot = op.to_proto()  # before the worker can touch it: the answer says PENDING
        if self._journal is not None:
            await asyncio.to_thread(self._journal.save, op)
        op.future = self._executor.submit(self._run, op)
        return snapshot

    async def GetOperation(self, request: prep_pb2.GetOperationRequest, context) -> prep_pb2.Operation:
        op = await self._get_or_abort(request.operation_id, context)
        return op.to_proto()

    async def WatchOperation(
        self, request: prep_pb2.WatchOperationRequest, context
    ) -> AsyncIterator[prep_pb2.Operation]:
        op = await self._get_or_abort(request.operation_id, context)
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
        op = await self._get_or_abort(request.operation_id, context)
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

    def cancel(self, op: _Operation) -> None:
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

    def _run(self, op: _Operation) -> None:
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
            result = self._prepare(op.req, progress=lambda p: self._on_progress(op, p), cancel=op.cancel)
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
            self._finish(
                op,
                SUCCEEDED,
                stage="done",
                manifest_uri=result.manifest_uri,
                artifact_key=result.artifact_key,
                reused=result.reused,
            )
            log.info(
                "operation %s: succeeded%s: %s",
                op.id,
                " (reused)" if result.reused else "",
                result.manifest_uri,
            )

    def _on_progress(self, op: _Operation, p: Progress) -> None:
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

    def _finish(self, op: _Operation, state: int, **fields) -> None:
        with op.lock:
            if op.terminal:
                return
            self._finish_locked(op, state, **fields)
        if self._journal is not None:
            self._journal.save(op)
        self._notify(op)

    def _finish_locked(
        self,
        op: _Operation,
        state: int,
        *,
        stage: str,
        error: str = "",
        manifest_uri: str = "",
        artifact_key: str = "",
        reused: bool = False,
    ) -> None:
        op.state = state
        op.progress = dataclasses.replace(op.progress, stage=stage)
        if state == SUCCEEDED and op.progress.bytes_total:
            op.progress.bytes_done = op.progress.bytes_total
        op.error = error
        op.manifest_uri = manifest_uri
        op.artifact_key = artifact_key
        op.reused = reused
        op.updated = time.time()
        name = STATE_NAMES[state]
        self.metrics.finished.labels(name).inc()
        if op.started_mono is not None:
            self.metrics.duration.labels(name).observe(time.monotonic() - op.started_mono)

    def _notify(self, op: _Operation) -> None:
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

    def _wake(self, op: _Operation) -> None:
        """Loop thread."""
        with op.lock:
            op.notify_pending = False
            terminal = op.terminal
        changed, op.changed = op.changed, asyncio.Event()
        changed.set()
        if terminal:
            op.done.set()

    # --------------------------------------------------------- helpers

    def _bind_loop(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()

    async def _get_or_abort(self, operation_id: str, context) -> _Operation:
        self._bind_loop()
        with self._ops_lock:
            op = self._ops.get(operation_id)
        if op is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no operation {operation_id!r}")
        return op

    def _find_active(self, key: tuple) -> _Operation | None:
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

    def active_operations(self) -> list[_Operation]:
        with self._ops_lock:
            return [op for op in self._ops.values() if not op.terminal]

    # ----------------------------------------------------------- drain

    async def wait_idle(self, timeout_s: float, cancel_wait_s: float = 10.0) -> None:
        """Drain hook: refuses new operations, waits up to ``timeout_s`` for the active ones, then
        cancels the rest and waits up to ``cancel_wait_s`` for the pipeline to acknowledge."""
        self._bind_loop()
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

    async def _wait_done(self, ops: list[_Operation], timeout_s: float) -> None:
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


class PrepServer:
    """A prep gRPC server in this process (what ``serve`` runs; tests use it directly).

    ``start()`` returns the bound port (``port=0`` picks a free one). ``drain()`` is the graceful
    shutdown run on SIGTERM; ``stop()`` is the quick one.
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
        self.security = security
        self.host = host
        self.port = port
        self.metrics_port = metrics_port
        self.grace_s = grace_s
        self.servicer = PrepServicer(
            store_uri=store_uri,
            max_workers=max_workers,
            prepare=prepare,
            access=access,
            journal=OperationJournal(store_uri) if journal else None,
        )
        self._grpc: grpc_util.GrpcServer | None = None
        self._metrics_httpd = None

    @property
    def grpc_server(self) -> grpc_util.GrpcServer:
        if self._grpc is None:
            raise RuntimeError("server not started")
        return self._grpc

    async def start(self) -> int:
        self.servicer._bind_loop()
        self._grpc = grpc_util.create_server(
            lambda s: grpc_util.add_service(
                s, self.servicer, prep_pb2.DESCRIPTOR.services_by_name["PrepService"]
            ),
            [SERVICE_NAME],
            host=self.host,
            port=self.port,
            security=self.security,
        )
        await self._grpc.start()
        self.port = self._grpc.port
        self._metrics_httpd = grpc_util.start_metrics_server(
            self.metrics_port, self.host, registry=self.servicer.metrics.registry
        )
        log.info("prep server listening on %s", self._grpc.address)
        return self.port

    async def drain(self) -> None:
        await self.grpc_server.drain(self.grace_s, self.servicer.wait_idle)
        self._close()

    async def stop(self, grace_s: float | None = 0) -> None:
        if self._grpc is not None:
            self.servicer.shutdown()
            await self._grpc.stop(grace_s)
        self._close()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.server.wait_for_termination()

    def _close(self) -> None:
        self.servicer.shutdown()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
            self._metrics_httpd = None


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
    await server.start()
    if store_uri is None:
        try:
            from shared.storage import default_store_uri

            log.info("store: %s (default)", default_store_uri())
        except Exception:  # only informational
            log.debug("cannot resolve the default store", exc_info=True)
    else:
        log.info("store: %s", store_uri)
    remove_handlers = grpc_util.install_signal_handlers(server.drain)
    try:
        await server.wait_for_termination()
    finally:
        remove_handlers()
        server._close()
    log.info("prep server stopped")
