"""The prep server's operations: one operation's state (:class:`OperationRecord`), its proto view,
and the journal that persists operations in the store across restarts.

Threading: the pipeline runs in worker threads; every change to an operation is made under the
operation's lock and announced to the event loop (``PrepServicer``), which wakes the
``WatchOperation`` streams of that operation through :attr:`OperationRecord.changed`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
import uuid

from prep_service.api import PrepareRequest, PrepError, Progress
from prep_service.compile_job import CompileRequest
from protos import prep_pb2

log = logging.getLogger(__name__)

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


class OperationNotFound(LookupError):
    """No operation has the id a request names (-> NOT_FOUND)."""


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


def dedup_key(req: PrepareRequest) -> tuple:
    """Identity of a request for de-duplicating concurrent operations (everything but ``force``)."""
    return dataclasses.astuple(dataclasses.replace(req, force=False))


PREPARE, COMPILE = "prepare", "compile"  # Operation.kind


class OperationRecord:
    """One operation's state (a PrepareModel or a CompileGraphs); fields change only under ``lock``."""

    def __init__(
        self,
        req: PrepareRequest | CompileRequest,
        request_pb: prep_pb2.PrepareModelRequest | prep_pb2.CompileGraphsRequest,
    ) -> None:
        self.id = uuid.uuid4().hex
        self.req = req
        self.kind = COMPILE if isinstance(req, CompileRequest) else PREPARE
        self.key = req.dedup_key() if isinstance(req, CompileRequest) else dedup_key(req)
        self.request_pb = request_pb
        self.lock = threading.Lock()
        self.cancel = threading.Event()
        self.state = PENDING
        self.progress = Progress(stage="pending")
        self.manifest_uri = ""
        self.error = ""
        self.artifact_key = ""
        self.reused = False
        self.graph_set_uri = ""
        self.graph_key = ""
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
    def restore(cls, msg: prep_pb2.Operation) -> OperationRecord:
        """An operation from the journal of an earlier server process."""
        req: PrepareRequest | CompileRequest
        if msg.kind == COMPILE:
            try:
                req = CompileRequest.from_proto(msg.compile_request)
            except PrepError:
                req = CompileRequest(manifest_uri="(unreadable request)")
            op = cls(req, msg.compile_request)
        else:
            try:
                req = request_from_proto(msg.request, None)
            except PrepError:
                req = PrepareRequest(source="(unreadable request)")
            op = cls(req, msg.request)
        op.id = msg.operation_id
        op.state = msg.state
        p = msg.progress
        op.progress = Progress(
            p.stage,
            p.bytes_done,
            p.bytes_total,
            p.tensors_done,
            p.tensors_total,
            p.graphs_done,
            p.graphs_total,
        )
        op.graph_set_uri, op.graph_key = msg.graph_set_uri, msg.graph_key
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
            requests = (
                {"compile_request": self.request_pb} if self.kind == COMPILE else {"request": self.request_pb}
            )
            return prep_pb2.Operation(
                operation_id=self.id,
                state=self.state,
                progress=prep_pb2.Progress(
                    stage=p.stage,
                    bytes_done=max(p.bytes_done, 0),
                    bytes_total=max(p.bytes_total, 0),
                    tensors_done=max(p.tensors_done, 0),
                    tensors_total=max(p.tensors_total, 0),
                    graphs_done=max(p.graphs_done, 0),
                    graphs_total=max(p.graphs_total, 0),
                ),
                manifest_uri=self.manifest_uri,
                error=self.error,
                artifact_key=self.artifact_key,
                reused=self.reused,
                created_unix=self.created,
                updated_unix=self.updated,
                kind=self.kind,
                graph_set_uri=self.graph_set_uri,
                graph_key=self.graph_key,
                **requests,
            )


class OperationJournal:
    """Operations persisted in the store (``operations/{id}.json``), so that a restarted server
    still answers Get/List truthfully: what finished keeps its result, and what was running when
    the process died is reported FAILED as lost (never left RUNNING forever)."""

    PREFIX = "operations/"

    def __init__(self, store_uri: str | None) -> None:
        from shared.storage import open_store

        self._store = open_store(store_uri)

    def save(self, op: OperationRecord) -> None:
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
