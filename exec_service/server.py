"""The exec server: load an artifact, run the engine loop, serve ExecService over grpc.aio.

Lifecycle (``shared.serving.ServerLifecycle``, shared with the prep server): the port is bound and
answers health checks (readiness NOT_SERVING, RPCs UNAVAILABLE "still loading") while the model
loads and warms up; readiness turns SERVING after that. A load that cannot succeed — no manifest, a
damaged or incompatible artifact, a bad serving shape for this model — stops the server and raises
:class:`LoadFailed`, so the process exits non-zero with the reason (Kubernetes shows a crash loop
with the cause, not a pod that is silently never ready); store errors (after the store client's own
retries) are retried here with backoff first. Liveness ``""`` turns NOT_SERVING if the engine loop
dies (e.g. a TP worker died). SIGTERM drains: readiness NOT_SERVING, new calls UNAVAILABLE,
in-flight streams get the grace period.

With ``ServeConfig.http_port`` set, the OpenAI-compatible HTTP front (``exec_service.http``) is
served beside gRPC on the same event loop, bound at start with the gRPC port (it answers 503 while
the model loads) and stopped after the drain; both fronts go through one ``gateway.Gateway``.

The rest is elsewhere, one concern per module: ``requests`` (validation, defaults), ``gateway`` (the
ready gate, admission, the stream loop, the error map), ``streaming`` (text, stop strings,
messages), ``engine_loop`` (the thread bridge), ``servicer`` (the RPCs), ``http`` (the OpenAI
front), ``metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from exec_service.artifact import Artifact, open_artifact
from exec_service.engine import Engine, Request, RuntimeConfig, StoppingCriteria
from exec_service.engine_loop import Counts, EngineLoop
from exec_service.gateway import ERRORS, Gateway, Serving
from exec_service.graph_sets.policy import EAGER_GRAPHS, GraphChoice, choose
from exec_service.graph_sets.policy import MODES as GRAPH_MODES
from exec_service.http.app import OpenAIFront
from exec_service.http.server import HttpServer
from exec_service.metrics import ExecMetrics
from exec_service.requests import MAX_MESSAGE_BYTES, GenerationDefaults, Limits
from exec_service.runtime.compiled import compile_counters
from exec_service.servicer import ExecServicer
from protos import exec_pb2
from shared import grpc_util
from shared.serving import ServerLifecycle, run_until_signalled
from shared.shapes import ServingShape
from shared.storage import StoreError

log = logging.getLogger("neuron_serve.exec")

SERVICE_NAME = "neuronserve.exec.v1.ExecService"
EXEC_MAX_MESSAGE_BYTES = MAX_MESSAGE_BYTES
T = TypeVar("T")


class LoadFailed(RuntimeError):
    """The model cannot be served; the message names the artifact and the reason."""


@dataclass(frozen=True)
class ServeConfig:
    manifest_uri: str
    host: str = "127.0.0.1"
    port: int = 0
    device: str = "cpu"
    max_batch_size: int = 8
    max_seq_len: int = 2048
    context_buckets: tuple[int, ...] = ()  # () = derived from max_seq_len (shared.shapes)
    kv_buckets: tuple[int, ...] = ()
    batch_buckets: tuple[int, ...] = ()  # () = powers of two up to max_batch_size
    graphs: str = "auto"  # exec_service.graph_sets.policy.MODES
    graphs_store: str | None = None  # where graph sets live (default: the manifest's store)
    speculation: str = "off"  # shared.shapes.SPECULATION_METHODS
    num_speculative_tokens: int = 0  # k (0 = the default with speculation on)
    draft_model: str | None = None  # manifest URI of the draft model (speculation "draft")
    metrics_port: int = 0
    http_port: int | None = None  # the OpenAI-compatible HTTP API: None = off, 0 = any free port
    grace_s: float = 30.0
    max_waiting_requests: int = 256
    max_waiting_prompt_tokens: int = 262_144
    security: grpc_util.ServerSecurity | None = None
    load_attempts: int = 5  # store errors while loading: tries before giving up
    load_retry_s: float = 1.0  # first backoff; doubles per try (capped at 30 s)

    def __post_init__(self) -> None:
        self.serving_shape()  # an impossible shape is refused here, before anything binds a port
        if self.graphs not in GRAPH_MODES:
            raise ValueError(f"graphs must be one of {', '.join(GRAPH_MODES)}, got {self.graphs!r}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in [0, 65535], got {self.http_port}")
        if (self.speculation == "draft") != bool(self.draft_model):
            raise ValueError("speculation 'draft' and a draft model (--draft-model) go together")

    def serving_shape(self) -> ServingShape:
        return ServingShape(
            self.max_batch_size,
            self.max_seq_len,
            self.context_buckets,
            self.kv_buckets,
            self.batch_buckets,
            self.speculation,
            self.num_speculative_tokens,
        )

    def runtime_config(self) -> RuntimeConfig:
        return RuntimeConfig(**self.serving_shape().fields(), backend=self.device)


class ExecServer:
    """``start()`` binds, loads and returns the port (raises LoadFailed after stopping the server
    when the model cannot be served). ``engine`` / ``artifact``: already built ones (bench)."""

    def __init__(
        self, cfg: ServeConfig, engine: Engine | None = None, artifact: Artifact | None = None
    ) -> None:
        self.cfg = cfg
        self._engine = engine
        self._artifact = artifact
        self.metrics = ExecMetrics()
        self.gateway = Gateway()
        self.servicer = ExecServicer(self.metrics, self.gateway)
        self.http: HttpServer | None = None
        self.loop: EngineLoop | None = None
        self.load_error: str | None = None
        self._liveness_task: asyncio.Task | None = None
        self._stopping = False
        self.lifecycle = ServerLifecycle(
            add_services=lambda server: grpc_util.add_service(
                server,
                self.servicer,
                exec_pb2.DESCRIPTOR.services_by_name["ExecService"],
                errors=ERRORS,
                on_error=self.metrics.reject,
            ),
            service_names=[SERVICE_NAME],
            host=cfg.host,
            port=cfg.port,
            security=cfg.security,
            metrics_registry=self.metrics.registry,
            metrics_port=cfg.metrics_port,
            grace_s=cfg.grace_s,
            max_message_bytes=EXEC_MAX_MESSAGE_BYTES,
        )

    @property
    def port(self) -> int:
        return self.lifecycle.port

    @property
    def grpc_server(self) -> grpc_util.GrpcServer:
        return self.lifecycle.grpc_server

    @property
    def http_port(self) -> int | None:
        """The port of the HTTP API once it accepts connections (None when off or not yet)."""
        return self.http.port or None if self.http is not None else None

    async def start(self) -> int:
        """Bind and answer health checks at once (NOT_SERVING), load + warm up, then SERVING."""
        port = await self.lifecycle.start(ready=False)
        if self.cfg.http_port is not None:
            try:
                await self._start_http()
            except BaseException:
                await self.stop()
                raise
        log.info("exec server listening on %s; loading %s", self.lifecycle.address, self.cfg.manifest_uri)
        try:
            artifact, engine, tokenizer, graphs = await in_own_thread(self._load_with_retries, "exec-load")
        except LoadFailed as e:
            self.load_error = str(e)
            log.error("%s", e)
            await self.stop()
            raise
        if self._stopping:  # drained while loading
            engine.close()
            return port
        self.loop = EngineLoop(engine, self._on_step)
        self.loop.start()
        cfg = engine.config
        limits = Limits(
            max_prompt_tokens=engine.limits.max_prompt_tokens,
            max_new_tokens=engine.limits.max_new_tokens,
            max_top_logprobs=cfg.num_top_logprobs,
            max_waiting_requests=self.cfg.max_waiting_requests,
            max_waiting_prompt_tokens=self.cfg.max_waiting_prompt_tokens,
        )
        defaults = GenerationDefaults.from_generation_config(artifact.generation_config)
        self.metrics.graphs.labels(graphs.key, graphs.origin).set(graphs.count)
        self.gateway.serve(
            Serving(
                artifact,
                self.loop,
                tokenizer,
                limits,
                defaults,
                self.cfg.device,
                graphs,
                self.cfg.draft_model or "",
            )
        )
        self._liveness_task = asyncio.create_task(self._watch_liveness())
        await self.lifecycle.set_ready(True)
        man = artifact.manifest
        log.info("exec server ready: %s (%s, tp=%d)", man.name, self.cfg.device, man.target.tp_degree)
        return port

    def _load_with_retries(self) -> tuple[Artifact, Engine, object, GraphChoice]:
        """Store errors are retried with backoff; anything else is permanent (LoadFailed)."""
        uri, attempts = self.cfg.manifest_uri, max(1, self.cfg.load_attempts)
        delay = self.cfg.load_retry_s
        for attempt in range(1, attempts + 1):
            try:
                return self._load()
            except StoreError as e:
                if attempt == attempts or self._stopping:
                    raise LoadFailed(f"cannot serve {uri}: the store failed {attempt} times: {e}") from e
                log.warning(
                    "loading %s: %s (try %d of %d; again in %.1f s)", uri, e, attempt, attempts, delay
                )
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
            except Exception as e:  # a corrupt or missing artifact, a dead worker rank, a bad shape
                raise LoadFailed(f"cannot serve {uri}: {type(e).__name__}: {e}") from e
        raise AssertionError("unreachable")

    def _load(self) -> tuple[Artifact, Engine, object, GraphChoice]:
        artifact = self._artifact or open_artifact(self.cfg.manifest_uri)
        engine = self._engine
        tokenizer = None
        if engine is None:
            config = self.cfg.runtime_config()
            graphs = choose(self.cfg.graphs, artifact, config, self.cfg.graphs_store)
            config = dataclasses.replace(config, graphs=graphs.graphs)
            draft = None
            if self.cfg.draft_model:
                tokenizer = artifact.load_tokenizer()
                draft = open_draft_model(self.cfg.draft_model, tokenizer)
            engine = Engine(artifact, config, eos_token_ids=artifact.eos_token_ids, draft_source=draft)
        else:  # built by the caller (bench): whatever it runs
            graphs = EAGER_GRAPHS
        try:
            t = time.monotonic()
            before = compile_counters()
            n = engine.warm_up_compiled()
            misses = compile_counters()["fxgraph_cache_miss"] - before["fxgraph_cache_miss"]
            self.metrics.graph_compiles_at_start.set(misses)
            if n:
                log.info(
                    "%d compiled graphs ready in %.1f s (%d built by the compiler here)",
                    n,
                    time.monotonic() - t,
                    misses,
                )
            if misses and graphs.origin != "eager":
                log.warning(
                    "graph set %s did not hold %d of its graphs: the compiler built them", graphs.key, misses
                )
            _warm_up(engine)
            tokenizer = tokenizer or artifact.load_tokenizer()
        except BaseException:
            engine.close()
            raise
        return artifact, engine, tokenizer, graphs

    def _on_step(self, counts: Counts) -> None:
        m = self.metrics
        m.steps.inc()
        m.running.set(counts.running)
        m.waiting.set(counts.waiting)
        m.free_slots.set(counts.free_slots)
        m.speculation(counts.speculation)

    async def _watch_liveness(self) -> None:
        """Liveness "" mirrors the engine loop: a dead loop makes it NOT_SERVING (pod restarted)."""
        while True:
            await asyncio.sleep(0.5)
            if self.loop is not None and not self.loop.alive:
                await self.lifecycle.set_live(False)
                await self.lifecycle.set_ready(False)
                return

    async def _start_http(self) -> None:
        security = self.cfg.security or grpc_util.ServerSecurity()
        front = OpenAIFront(self.gateway, self.metrics.http, security.tokens)
        self.http = HttpServer(front.app, self.cfg.host, self.cfg.http_port or 0, security.tls)
        await self.http.start()

    async def _stop_http(self, grace_s: float) -> None:
        if self.http is not None:
            await self.http.stop(grace_s)

    async def drain(self) -> None:
        """SIGTERM: both fronts refuse new requests (gRPC UNAVAILABLE, HTTP 503), in-flight ones of
        both get the grace period (the gateway counts them), then gRPC stops, then HTTP."""
        self._stopping = True
        await self.lifecycle.drain(self.gateway.wait_idle)
        await self._stop_http(1.0)  # what the grace period left: the final chunks of wound-down streams
        self.close()

    async def stop(self, grace_s: float | None = 0) -> None:
        self._stopping = True
        self.gateway.draining = True
        await self.lifecycle.stop(grace_s)
        await self._stop_http(grace_s or 0.0)
        self.close()

    async def wait_for_termination(self) -> None:
        await self.lifecycle.wait_for_termination()

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
        if self._liveness_task is not None:
            self._liveness_task.cancel()
            self._liveness_task = None
        if self.loop is not None:
            self.loop.stop()
            self.loop.engine.close()
            self.loop = None
        self.lifecycle.close()


async def in_own_thread(fn: Callable[[], T], name: str) -> T:
    """``fn()`` on a new thread that has exited when this returns.

    Not ``asyncio.to_thread``: its pool thread would live on, and with it the OpenMP thread pool
    that the load and warm-up's torch ops gave it. libgomp counts the threads of every live pool;
    once they outnumber the cores (a second pool: the engine loop's), every worker spins only ~100
    times before it sleeps, so each of a decode step's ~400 parallel regions pays a futex wake-up.
    Measured on the 2-core machine (SmolLM2 fp32, 2 threads): batch-1 decode steps ~36 ms with one
    pool, 47-60 ms with the loader's pool alive (~420 voluntary context switches per step instead
    of ~0); served/engine alone 0.74 -> 0.98 at 1 stream, 0.77 -> 0.91-0.96 at 8. Torch work must
    run on one live thread at a time: the loader, then the engine loop (an engine built elsewhere,
    e.g. on the main thread, brings the same penalty: build it on a thread that exits).
    """
    aio = asyncio.get_running_loop()
    done: asyncio.Future[T] = aio.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not done.done():
            (done.set_result if ok else done.set_exception)(value)

    def run() -> None:
        try:
            result, ok = fn(), True
        except BaseException as e:  # handed to the awaiting coroutine
            result, ok = e, False
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is waiting
            aio.call_soon_threadsafe(settle, ok, result)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    result = await done  # a cancelled wait returns at once; the thread then finishes on its own
    while thread.is_alive():  # its exit frees its OpenMP pool, moments after the result
        await asyncio.sleep(0.005)
    return result


def open_draft_model(uri: str, tokenizer) -> Artifact:
    """The draft model's artifact, refused unless its tokenizer is the target's (same vocabulary:
    a draft token must mean the same text)."""
    draft = open_artifact(uri)
    theirs = draft.load_tokenizer()
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"the draft model {uri} has another tokenizer ({len(theirs.get_vocab())} tokens against the "
            f"target's {len(tokenizer.get_vocab())}, or the same size with other tokens): a draft model "
            "must share the target's vocabulary"
        )
    return draft


def _warm_up(engine: Engine) -> None:
    """Run every context bucket and a few decode steps once so the first request pays no
    first-call costs (allocation, compilation when enabled)."""
    for bucket in engine.config.context_buckets:
        n = min(bucket, engine.config.max_seq_len - 2)
        engine.generate(
            [Request(tuple([0] * n), stopping=StoppingCriteria(max_new_tokens=2, ignore_eos=True))]
        )


async def serve(cfg: ServeConfig) -> None:
    """Runs the exec server until SIGTERM/SIGINT, then drains (raises LoadFailed)."""
    await run_until_signalled(ExecServer(cfg), "exec server")
