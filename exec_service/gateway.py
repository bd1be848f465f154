"""The one way from a front (the gRPC servicer, the HTTP app) into the engine loop.

Both fronts parse their own schema into a ``ParsedRequest`` (``requests.parse_request``), then:

* :meth:`Gateway.ready`: UNAVAILABLE while the model loads, while draining, once the engine loop died;
* :meth:`Gateway.open`: the engine's own request check (``engine.limits.check_request``, the rules
  that depend on the model) and admission (the bounded queue: RESOURCE_EXHAUSTED), then the request
  is submitted. All of it happens before a front answers anything, so every refusal is a status: HTTP
  sends its status line with the first byte and cannot refuse a stream it has started;
* :meth:`Generation.messages`: the stream — ``GenerationStream`` per batch of engine outputs, the
  time limit, the abort after a stop string, and the abort when the caller goes away (the slot is
  freed at the next engine step). ``GenerateResponse`` is the stream message of both fronts: gRPC
  sends it as it is, HTTP maps it to OpenAI chunks.

The in-flight count (what a drain waits for) and the per-protocol metrics are kept here too, so the
two fronts cannot drift apart on admission or cancellation.
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
from exec_service.engine.limits import check_request
from exec_service.engine_loop import EngineFailed, EngineLoop, EngineRejected, Subscription
from exec_service.graph_sets.policy import EAGER_GRAPHS, GraphChoice
from exec_service.metrics import ProtocolMetrics
from exec_service.requests import GenerationDefaults, Limits, ParsedRequest
from exec_service.streaming import GenerationStream
from exec_service.text import TokenDecoders
from protos import exec_pb2
from shared.rpc_errors import ErrorMap, RpcError, unavailable

log = logging.getLogger("neuron_serve.exec")

# The one exception → status map of the exec server. The gRPC front applies it to every RPC
# (``shared.grpc_util.add_service``); the HTTP front maps the status on to an HTTP one
# (``exec_service.http.errors``). ``RequestError`` / ``RpcError`` carry their own status.
ERRORS = ErrorMap(
    (
        (EngineRejected, grpc.StatusCode.INVALID_ARGUMENT),
        (EngineFailed, grpc.StatusCode.INTERNAL),
    )
)


@dataclass(frozen=True)
class Serving:
    """What the fronts serve once the model is loaded."""

    artifact: Artifact
    loop: EngineLoop
    tokenizer: Any
    limits: Limits
    defaults: GenerationDefaults
    device: str
    graphs: GraphChoice = EAGER_GRAPHS
    draft_model: str = ""  # the draft model's manifest URI (speculation "draft")

    @property
    def model_name(self) -> str:
        return self.artifact.manifest.name


class Gateway:
    """Answers UNAVAILABLE until ``serve(...)`` is called (the model is loading) and while draining."""

    def __init__(self) -> None:
        self.serving: Serving | None = None
        self._decoders: TokenDecoders | None = None
        self.draining = False
        self.active = 0  # admitted streams, both fronts
        self._idle = asyncio.Event()
        self._idle.set()

    def serve(self, serving: Serving) -> None:
        self._decoders = TokenDecoders(serving.tokenizer)  # shared by every stream
        self.serving = serving

    def ready(self) -> Serving:
        if self.draining:
            raise unavailable("the server is draining")
        s = self.serving
        if s is None:
            raise unavailable("the model is still loading")
        if not s.loop.alive:
            raise unavailable("the engine is not running")
        return s

    def open(self, s: Serving, parsed: ParsedRequest, metrics: ProtocolMetrics, arrived: float) -> Generation:
        """Check, admit and submit ``parsed``; raises EngineRejected / RpcError (nothing submitted)."""
        try:  # the engine checks again when it takes the request: the same rules, found here first
            check_request(parsed.engine_request, s.loop.engine.limits)
        except ValueError as e:
            raise EngineRejected(str(e)) from None
        n_prompt = len(parsed.prompt_ids)
        self._admit(s, n_prompt)
        self.active += 1
        self._idle.clear()
        metrics.prompt_tokens.inc(n_prompt)
        stream = GenerationStream(parsed, s.tokenizer, metrics, arrived, decoders=self._decoders)
        sub = s.loop.subscribe(parsed.engine_request)
        log.info(
            "request %s (%s): %d prompt tokens, max_new_tokens %s",
            stream.request_id,
            metrics.protocol,
            n_prompt,
            parsed.engine_request.stopping.max_new_tokens,
        )
        return Generation(self, stream, sub, metrics, arrived)

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

    def _release(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> None:
        """Drain hook: refuse new streams, give in-flight ones up to ``timeout`` to finish."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)


class Generation:
    """One admitted request. Iterate :meth:`messages` for its ``GenerateResponse`` messages. Use it
    as a context manager (or call :meth:`close`): leaving early — the caller cancelled, the client
    went away, or it never iterated — aborts the engine request. A suspended async generator is
    finalized only when it is garbage-collected, so the front closes explicitly."""

    def __init__(
        self,
        gateway: Gateway,
        stream: GenerationStream,
        sub: Subscription,
        metrics: ProtocolMetrics,
        arrived: float,
    ) -> None:
        self._gateway, self.stream, self._sub = gateway, stream, sub
        self._metrics, self._arrived = metrics, arrived
        self._closed = False

    @property
    def request_id(self) -> str:
        return self.stream.request_id

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def messages(self) -> AsyncIterator[exec_pb2.GenerateResponse]:
        stream, sub = self.stream, self._sub
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
            self.close()

    def close(self) -> None:
        """Ends the request: aborts it unless it finished (cancelled); the accounting, once."""
        if self._closed:
            return
        self._closed = True
        stream, sub = self.stream, self._sub
        if not stream.finished and not sub.finished:  # cancelled, deadline exceeded, client gone
            sub.abort()
            self._metrics.finish("cancelled")
            log.info(
                "request %s: cancelled by the client after %d tokens", stream.request_id, stream.generated
            )
        elif stream.finished:
            log.info("request %s: finished after %d tokens", stream.request_id, stream.generated)
        self._metrics.e2e.observe(time.monotonic() - self._arrived)
        self._gateway._release()
