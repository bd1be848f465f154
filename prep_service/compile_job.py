"""``CompileGraphs`` operations: a validated request, and its run as a ``neuron-serve compile`` child.

The prep service knows nothing of how graphs are compiled (its import contract forbids the exec
service): it runs the public command, ``neuron-serve compile … --progress json``, in a process of
its own — a fresh compiler cache, its own torch threads and memory, and a cancel that is a signal
to the process group. The child publishes ``graphs.json`` last, so a cancelled or failed run
leaves nothing a server would load. Progress is read from the child's JSON lines on stderr; the
graph set's URI is its last stdout line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from prep_service.api import PrepCancelled, PrepError, Progress
from protos import prep_pb2
from shared.shapes import ServingShape, ShapeError

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "neuron")
PREFER = ("fastest", "compiled")


@dataclass(frozen=True)
class CompileRequest:
    manifest_uri: str
    device: str = "cpu"
    shape: ServingShape = dataclasses.field(default_factory=ServingShape)
    output: str | None = None  # None: the manifest's store
    force: bool = False
    prefer: str = "fastest"

    @classmethod
    def from_proto(
        cls, msg: prep_pb2.CompileGraphsRequest, default_output: str | None = None
    ) -> CompileRequest:
        """Raises PrepError (-> INVALID_ARGUMENT) naming the field."""
        uri = msg.manifest_uri.strip()
        if not uri:
            raise PrepError("manifest_uri: required (the manifest.json of a prepared model)")
        if not uri.endswith("/manifest.json"):
            raise PrepError(f"manifest_uri: expected the URI of a manifest.json, got {uri!r}")
        device = msg.device.strip() or "cpu"
        if device not in DEVICES:
            raise PrepError(f"device: must be one of {', '.join(DEVICES)}, got {device!r}")
        prefer = msg.prefer.strip() or "fastest"
        if prefer not in PREFER:
            raise PrepError(f"prefer: must be one of {', '.join(PREFER)}, got {prefer!r}")
        try:
            shape = ServingShape(
                msg.max_batch_size or 8,
                msg.max_seq_len or 2048,
                tuple(sorted(set(msg.context_buckets))),
                tuple(sorted(set(msg.kv_buckets))),
                tuple(sorted(set(msg.batch_buckets))),
                msg.speculation.strip() or "off",
                msg.num_speculative_tokens,
            )
        except ShapeError as e:
            raise PrepError(f"{e.field}: {e}") from None
        return cls(uri, device, shape, msg.output.strip() or default_output, msg.force, prefer)

    def dedup_key(self) -> tuple:
        """Identity for joining an active identical request (everything but ``force``)."""
        return (
            "compile",
            self.manifest_uri,
            self.device,
            dataclasses.astuple(self.shape),
            self.output,
            self.prefer,
        )

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "shared.cli", "compile", self.manifest_uri, "--device", self.device]
        argv += [*self.shape.cli_flags(), "--prefer", self.prefer, "--progress", "json"]
        if self.output:
            argv += ["--output", self.output]
        if self.force:
            argv.append("--force")
        return argv


@dataclass(frozen=True)
class CompileResult:
    graph_set_uri: str
    graph_key: str
    reused: bool


def run_compile(
    req: CompileRequest,
    *,
    progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
) -> CompileResult:
    """Runs ``neuron-serve compile`` to the end; PrepError for a bad input or a failed compile (its
    last error line), PrepCancelled when ``cancel`` was set (the child is stopped first)."""
    emit = progress or (lambda p: None)
    cancel = cancel or threading.Event()
    proc = subprocess.Popen(
        req.argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    state = {"key": "", "done": 0, "total": 0, "reused": False, "errors": []}

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.strip()
            try:
                event = json.loads(line)
            except ValueError:
                if line:
                    state["errors"].append(line)
                    log.info("compile: %s", line)
                continue
            kind = event.get("event")
            if kind == "start":
                state["key"], state["total"] = event["key"], event["total"]
            elif kind == "graph" and event.get("state") == "done":
                state["done"] = event["index"]
            elif kind == "exists":
                state["key"], state["reused"] = event["key"], True
            emit(Progress("compile", graphs_done=state["done"], graphs_total=state["total"]))

    reader = threading.Thread(target=read_stderr, name="compile-progress", daemon=True)
    reader.start()
    stopper = threading.Thread(target=_stop_on_cancel, args=(proc, cancel), daemon=True)
    stopper.start()
    stdout = proc.stdout.read() if proc.stdout is not None else ""
    code = proc.wait()
    reader.join(timeout=10)
    if cancel.is_set():
        raise PrepCancelled("compile cancelled; nothing was published")
    if code != 0:
        detail = next((e for e in reversed(state["errors"]) if e.startswith("error:")), f"exit {code}")
        raise PrepError(detail.removeprefix("error: "))
    lines = stdout.strip().splitlines()
    if not lines:
        raise PrepError("neuron-serve compile printed no graph set URI")
    return CompileResult(lines[-1], state["key"], state["reused"])


def _stop_on_cancel(proc: subprocess.Popen, cancel: threading.Event) -> None:
    while proc.poll() is None:
        if cancel.wait(0.2):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            return
