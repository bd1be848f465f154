"""The ExecService servicer: validate, convert, delegate — nothing else.

``Generate`` = ``requests.to_engine_request`` (protocol validation, defaults) → admission →
``EngineLoop.subscribe`` → ``streaming.GenerationStream`` per batch of outputs. Errors are raised,
never aborted here: ``ERRORS`` is the one exception → status map, applied to every RPC by
``shared.grpc_util.add_service`` (the loading / draining gate included) with the rejected-requests
metric as its hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from exec_service.artifact import Artifact
from exec_service.engine_loop import EngineFailed, EngineLoop, EngineRejected
from exec_service.graph_sets.policy import EAGER_GRAPHS, GraphChoice
from exec_service.metrics import ExecMetrics
from exec_service.requests import GenerationDefaults, Limits, to_engine_request, tokenize_request
from exec_service.streaming import GenerationStream
from exec_service.text import TokenDecoders
from protos import exec_pb2, exec_pb2_grpc
from shared.rpc_errors import ErrorMap, RpcError, unavailable

log = logging.getLogger("neuron_serve.exec")

ERRORS = ErrorMap(
    (
        (EngineRejected, grpc.StatusCode.INVALID_ARGUMENT),
        (EngineFailed, grpc.StatusCode.INTERNAL),
    )
)


@dataclass(frozen=True)
class Serving:
    """What the servicer serves once the model is loaded."""

    artifact: Artifact
    loop: EngineLoop
    tokenizer: Any
    limits: Limits
    defaults: GenerationDefaults
    device: str
    graphs: GraphChoice = EAGER_GRAPHS
    draft_model: str = ""  # the draft model's manifest URI (speculation "draft")


class ExecServicer(exec_pb2_grpc.ExecServiceServicer):
    """Answers UNAVAILABLE until ``serve(...)`` is called (the model is loading) and while draining."""

    def __init__(self, metrics: ExecMetrics) -> None:
        self.metrics = metrics
        self.serving: Serving | None = None
        self._decoders: TokenDecoders | None = None
        self.draining = False
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def serve(self, serving: Serving) -> None:
        self._decoders = TokenDecoders(serving.tokenizer)  # shared by every stream
        self.serving = serving

    def _ready(self) -> Serving:
        if self.draining:
            raise unavailable("the server is draining")
        s = self.serving
        if s is None:
            raise unavailable("the model is still loading")
        if not s.loop.alive:
            raise unavailable("the engine is not running")
        return s

    def _admit(self, s: Serving, n_prompt: int) -> None:
        """Bounded queue, counted here when a stream is admitted (the engine loop's own counts lag
        behind by up to a step)."""
        lim = s.limits
        if self.active >= lim.max_waiting_requests + s.loop.engine.config.max_batch_size:
            raise RpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the waiting queue is full ({lim.max_waiting_requests} requests); retry later",
            )
        if s.loop.waiting_prompt_tokens + n_prompt > lim.max_waiting_prompt_tokens:
            raise RpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the waiting queue holds too many prompt tokens (limit {lim.max_waiting_prompt_tokens}); "
                "retry later",
            )

    async def Generate(
        self, request: exec_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[exec_pb2.GenerateResponse]:
        arrived = time.monotonic()
        s = self._ready()
        metadata_id = dict(context.invocation_metadata() or ()).get("x-request-id", "")
        parsed = to_engine_request(request, s.tokenizer, s.limits, s.defaults, metadata_id)
        n_prompt = len(parsed.prompt_ids)
        self._admit(s, n_prompt)
        self.active += 1
        self._idle.clear()
        self.metrics.prompt_tokens.inc(n_prompt)
        stream = GenerationStream(parsed, s.tokenizer, self.metrics, arrived, decoders=self._decoders)
        sub = s.loop.subscribe(parsed.engine_request)
        log.info(
            "request %s: %d prompt tokens, max_new_tokens %s",
            stream.request_id,
            n_prompt,
            parsed.engine_request.stopping.max_new_tokens,
        )
        try:
            while not stream.finished:
                deadline = stream.deadline
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    delivered = await sub.next(timeout)
                except TimeoutError:
                    sub.abort()  # frees the slot at the next step
                    yield stream.time_limit()
                    break
                msg = stream.push(delivered)
                if stream.stopped_by_text:
                    sub.abort()
                if msg is not None:
                    yield msg
        finally:
            if not stream.finished and not sub.finished:  # cancelled, deadline exceeded, client gone
                sub.abort()
                self.metrics.finished.labels("cancelled").inc()
                log.info(
                    "request %s: cancelled by the client after %d tokens", stream.request_id, stream.generated
                )
            elif stream.finished:
                log.info("request %s: finished after %d tokens", stream.request_id, stream.generated)
            self.metrics.e2e.observe(time.monotonic() - arrived)
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def Tokenize(
        self, request: exec_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> exec_pb2.TokenizeResponse:
        s = self._ready()
        ids = tokenize_request(request, s.tokenizer, s.limits)
        return exec_pb2.TokenizeResponse(ids=ids, tokens=s.tokenizer.convert_ids_to_tokens(ids))

    async def GetModelInfo(
        self, request: exec_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> exec_pb2.ModelInfo:
        s = self._ready()
        man, engine = s.artifact.manifest, s.loop.engine
        cfg, counts = engine.config, s.loop.counts
        return exec_pb2.ModelInfo(
            model=man.name,
            revision=man.source.get("revision") or "",
            family=man.family,
            dtype=man.target.dtype,
            tp_degree=man.target.tp_degree,
            device=s.device,
            max_batch_size=cfg.max_batch_size,
            max_seq_len=cfg.max_seq_len,
            context_buckets=list(cfg.context_buckets),
            kv_buckets=list(cfg.kv_buckets),
            batch_buckets=list(cfg.batch_buckets),
            eos_token_ids=sorted(engine.eos_token_ids),
            vocab_size=man.architecture.vocab_size,
            manifest_digest=s.artifact.digest,
            limits=s.limits.to_proto(),
            running_requests=counts.running,
            waiting_requests=counts.waiting,
            free_slots=counts.free_slots,
            quantization=man.target.quantization or "none",
            manifest_uri=s.artifact.uri,
            graphs=exec_pb2.GraphSetInfo(key=s.graphs.key, origin=s.graphs.origin, count=s.graphs.count),
            speculation=exec_pb2.SpeculationInfo(
                method=cfg.speculation,
                num_speculative_tokens=cfg.num_speculative_tokens,
                draft_model=s.draft_model,
            ),
        )

    async def wait_idle(self, timeout: float) -> None:
        """Drain hook: refuse new streams, give in-flight ones up to ``timeout`` to finish."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
