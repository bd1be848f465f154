"""ExecService over grpc.aio: streaming Generate with continuous batching.

Threads and loops:
* the **engine loop** (one thread) owns the token engine: it takes new requests and aborts from a
  queue between steps, runs ``engine.step()``, and hands each output to the request's asyncio
  queue with ``call_soon_threadsafe``. Nothing on the gRPC side can delay a forward pass.
* the **gRPC event loop** runs one coroutine per stream: it turns token outputs into text
  (incremental detokenizer, stop strings, time limit) and writes messages. When a client lags,
  outputs pile up in its queue and the next message carries all of them.

Errors are gRPC status codes, mapped in one place (:func:`_abort`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from exec_service.artifact import Artifact
from exec_service.engine import (
    Engine,
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
    StoppingCriteria,
)
from exec_service.text import IncrementalDetokenizer, StopMatcher
from protos import exec_pb2, exec_pb2_grpc
from shared import grpc_util

log = logging.getLogger("neuron_serve.exec")

SERVICE_NAME = "neuronserve.exec.v1.ExecService"
EXEC_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # requests carry prompts, not tensors: larger ones are refused

_FINISH = {
    FinishReason.EOS: exec_pb2.EOS,
    FinishReason.STOP_TOKEN: exec_pb2.STOP_TOKEN,
    FinishReason.LENGTH: exec_pb2.LENGTH,
    FinishReason.CONTEXT_LENGTH: exec_pb2.CONTEXT_LENGTH,
}


@dataclass(frozen=True)
class Limits:
    """Per-request caps, checked before anything reaches the engine; reported by GetModelInfo."""

    max_prompt_tokens: int
    max_new_tokens: int
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256
    max_stop_token_ids: int = 64
    max_top_logprobs: int = 20
    max_request_id_bytes: int = 128
    max_message_bytes: int = EXEC_MAX_MESSAGE_BYTES
    max_waiting_requests: int = 256
    max_waiting_prompt_tokens: int = 262_144
    max_chat_messages: int = 256

    def to_proto(self) -> exec_pb2.RequestLimits:
        return exec_pb2.RequestLimits(
            max_prompt_tokens=self.max_prompt_tokens,
            max_new_tokens=self.max_new_tokens,
            max_stop_strings=self.max_stop_strings,
            max_stop_string_bytes=self.max_stop_string_bytes,
            max_stop_token_ids=self.max_stop_token_ids,
            max_top_logprobs=self.max_top_logprobs,
            max_request_id_bytes=self.max_request_id_bytes,
            max_message_bytes=self.max_message_bytes,
            max_waiting_requests=self.max_waiting_requests,
            max_waiting_prompt_tokens=self.max_waiting_prompt_tokens,
        )


class _Invalid(Exception):
    """A request field is invalid (INVALID_ARGUMENT)."""


class _Rejected(Exception):
    """Admission refused (RESOURCE_EXHAUSTED)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


class ExecMetrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.registry = grpc_util.new_metrics_registry()
        r = self.registry
        lat = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = Histogram("neuron_serve_ttft_seconds", "Time to first token", buckets=lat, registry=r)
        self.itl = Histogram(
            "neuron_serve_inter_token_latency_seconds",
            "Time between tokens of one stream",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.e2e = Histogram("neuron_serve_e2e_latency_seconds", "Request latency", buckets=lat, registry=r)
        self.queue = Histogram(
            "neuron_serve_queue_seconds", "Time before the first step", buckets=lat, registry=r
        )
        self.running = Gauge("neuron_serve_running_requests", "Requests holding a KV slot", registry=r)
        self.waiting = Gauge("neuron_serve_waiting_requests", "Requests waiting for a slot", registry=r)
        self.free_slots = Gauge("neuron_serve_free_slots", "Free KV cache slots", registry=r)
        self.prompt_tokens = Counter("neuron_serve_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generated_tokens = Counter("neuron_serve_generated_tokens", "Tokens generated", registry=r)
        self.finished = Counter(
            "neuron_serve_requests_finished", "Finished requests by reason", ["reason"], registry=r
        )
        self.rejected = Counter(
            "neuron_serve_requests_rejected", "Rejected requests by code", ["code"], registry=r
        )
        self.steps = Counter("neuron_serve_engine_steps", "Engine steps", registry=r)


# ---------------------------------------------------------------------------------------------
# The engine loop
# ---------------------------------------------------------------------------------------------


@dataclass
class _Stream:
    """Per-stream bookkeeping for the final message and the latency metrics."""

    rid: str
    n_prompt: int
    arrived: float
    first_at: float | None = None
    last_at: float | None = None
    queue_ms: float = 0.0
    generated: int = 0
    seed: int = 0


@dataclass
class _Item:
    """What the engine loop hands to a stream: an output (with the step's start time) or an error."""

    output: RequestOutput | None = None
    step_started: float = 0.0
    error: BaseException | None = None


class EngineLoop:
    """Runs ``engine.step()`` on its own thread; requests and aborts arrive between steps."""

    def __init__(self, engine: Engine, metrics: ExecMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self._cmds: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sinks: dict[str, Callable[[_Item], None]] = {}
        self.heartbeat = time.monotonic()
        self.error: BaseException | None = None
        # snapshot of the engine's counters, written by the loop thread only
        self.running = 0
        self.waiting = 0
        self.free_slots = engine.config.max_batch_size
        self.waiting_prompt_tokens = 0
        self._pending_tokens: dict[str, int] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, request: Request, sink: Callable[[_Item], None]) -> None:
        with self._lock:
            self._pending_tokens[request.request_id or ""] = len(request.prompt_token_ids)
            self.waiting_prompt_tokens += len(request.prompt_token_ids)
        self._cmds.put(("add", request, sink))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id))
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _admitted(self, rid: str) -> None:
        with self._lock:
            self.waiting_prompt_tokens -= self._pending_tokens.pop(rid, 0)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                self._drain_commands()
                if not self.engine.has_unfinished():
                    self._snapshot()
                    self._wake.wait(0.25)
                    self._wake.clear()
                    continue
                started = time.monotonic()
                outputs = self.engine.step()
                if self.metrics:
                    self.metrics.steps.inc()
                self._snapshot()  # before the streams hear of it: a client then sees freed slots
                for out in outputs:
                    sink = self._sinks.get(out.request_id)
                    if out.finished:
                        self._sinks.pop(out.request_id, None)
                        self._admitted(out.request_id)
                    elif out.new_token_ids:
                        self._admitted(out.request_id)
                    if sink is not None:
                        sink(_Item(out, started))
        except BaseException as e:  # the engine is broken: fail every stream, liveness goes false
            self.error = e
            log.exception("engine loop died")
            for sink in list(self._sinks.values()):
                sink(_Item(error=e))
            self._sinks.clear()
            while True:  # anything submitted meanwhile fails too
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    break
                if cmd[0] == "add":
                    cmd[2](_Item(error=e))

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, request, sink = cmd
                try:
                    rid = self.engine.add_request(request)
                except ValueError as e:
                    self._admitted(request.request_id or "")
                    sink(_Item(error=_Invalid(str(e))))
                    continue
                self._sinks[rid] = sink
            else:
                self.engine.abort(cmd[1])

    def _snapshot(self) -> None:
        self.running = self.engine.num_running
        self.waiting = self.engine.num_waiting
        self.free_slots = self.engine.free_slots
        if self.metrics:
            self.metrics.running.set(self.running)
            self.metrics.waiting.set(self.waiting)
            self.metrics.free_slots.set(self.free_slots)


# ---------------------------------------------------------------------------------------------
# The servicer
# ---------------------------------------------------------------------------------------------


def _gen_default(gen: dict[str, Any], key: str, default: Any) -> Any:
    v = gen.get(key)
    return default if v is None else v


class ExecServicer(exec_pb2_grpc.ExecServiceServicer):
    def __init__(
        self,
        artifact: Artifact,
        loop: EngineLoop,
        tokenizer: Any,
        limits: Limits,
        metrics: ExecMetrics,
        device: str = "cpu",
    ) -> None:
        self.artifact = artifact
        self.loop = loop
        self.tokenizer = tokenizer
        self.limits = limits
        self.metrics = metrics
        self.device = device
        self.draining = False
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        man = artifact.manifest
        self.vocab_size = man.architecture.vocab_size
        self.eos_ids = tuple(sorted(loop.engine.eos_token_ids))
        gen = artifact.generation_config
        # Unset sampling fields fall back to the model's generation_config (HF semantics: without
        # do_sample the model decodes greedily).
        self.default_temperature = (
            float(_gen_default(gen, "temperature", 1.0)) if gen.get("do_sample") else 0.0
        )
        self.default_top_k = int(_gen_default(gen, "top_k", 0)) if gen.get("do_sample") else 0
        self.default_top_p = float(_gen_default(gen, "top_p", 1.0)) if gen.get("do_sample") else 1.0
        self.default_min_p = float(_gen_default(gen, "min_p", 0.0)) if gen.get("do_sample") else 0.0
        self.default_repetition_penalty = float(_gen_default(gen, "repetition_penalty", 1.0))
        self.default_max_new_tokens = gen.get("max_new_tokens")

    # -- helpers -----------------------------------------------------------------------------------

    def _request_id(self, request: exec_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> str:
        rid = request.request_id
        if not rid:
            md = dict(context.invocation_metadata() or ())
            rid = md.get("x-request-id", "")
        if not rid:
            return uuid.uuid4().hex
        if len(rid.encode()) > self.limits.max_request_id_bytes:
            raise _Invalid(f"request_id is longer than {self.limits.max_request_id_bytes} bytes")
        if not rid.isprintable():
            raise _Invalid("request_id must be printable text")
        return rid

    def _chat(self, msgs: exec_pb2.ChatMessages) -> str:
        if not msgs.messages:
            raise _Invalid("messages is empty")
        if len(msgs.messages) > self.limits.max_chat_messages:
            raise _Invalid(f"more than {self.limits.max_chat_messages} chat messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise _Invalid("this model has no chat template; send `prompt` or `prompt_token_ids`")
        conv = []
        for m in msgs.messages:
            if m.role not in ("system", "user", "assistant", "tool"):
                raise _Invalid(f"chat message role must be system, user, assistant or tool, got {m.role!r}")
            conv.append({"role": m.role, "content": m.content})
        try:
            return self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja errors in the model's template (e.g. role order rules)
            raise _Invalid(f"the model's chat template rejected the messages: {e}") from None

    def _prompt_ids(self, request: exec_pb2.GenerateRequest) -> list[int]:
        which = request.WhichOneof("input")
        if which == "prompt_token_ids":
            ids = list(request.prompt_token_ids.ids)
            bad = [i for i in ids if i >= self.vocab_size]
            if bad:
                raise _Invalid(
                    f"prompt_token_ids {bad[:4]} are outside the vocabulary (size {self.vocab_size})"
                )
        elif which == "prompt":
            ids = self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
        elif which == "messages":
            text = self._chat(request.messages)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            raise _Invalid("one of prompt, prompt_token_ids or messages is required")
        if not ids:
            raise _Invalid("the prompt is empty")
        if len(ids) > self.limits.max_prompt_tokens:
            raise _Invalid(
                f"prompt has {len(ids)} tokens; the limit is {self.limits.max_prompt_tokens} "
                f"(max_seq_len {self.loop.engine.config.max_seq_len} minus one generated token)"
            )
        return ids

    def _sampling(self, request: exec_pb2.GenerateRequest) -> SamplingParams:
        s, out = request.sampling, request.output

        def fin(name: str, v: float, lo: float, hi: float) -> float:
            if not math.isfinite(v) or not lo <= v <= hi:
                raise _Invalid(f"sampling.{name} must be a finite number in [{lo}, {hi}], got {v}")
            return v

        temperature = (
            fin("temperature", s.temperature, 0, 100)
            if s.HasField("temperature")
            else self.default_temperature
        )
        top_k = s.top_k if s.HasField("top_k") else self.default_top_k
        if top_k > self.vocab_size:
            raise _Invalid(f"sampling.top_k must be at most the vocabulary size {self.vocab_size}")
        top_p = fin("top_p", s.top_p, 0, 1) if s.HasField("top_p") else self.default_top_p
        if top_p == 0:
            raise _Invalid("sampling.top_p must be in (0, 1]")
        min_p = fin("min_p", s.min_p, 0, 1) if s.HasField("min_p") else self.default_min_p
        rep = (
            fin("repetition_penalty", s.repetition_penalty, 1e-3, 100)
            if s.HasField("repetition_penalty")
            else self.default_repetition_penalty
        )
        pres = fin("presence_penalty", s.presence_penalty, -2, 2) if s.HasField("presence_penalty") else 0.0
        freq = (
            fin("frequency_penalty", s.frequency_penalty, -2, 2) if s.HasField("frequency_penalty") else 0.0
        )
        if out.top_logprobs > self.limits.max_top_logprobs:
            raise _Invalid(f"output.top_logprobs must be at most {self.limits.max_top_logprobs}")
        if out.top_logprobs and not out.logprobs:
            raise _Invalid("output.top_logprobs needs output.logprobs")
        seed = s.seed if s.HasField("seed") else None
        if seed is not None and seed >= 2**63:
            raise _Invalid("sampling.seed must be below 2**63")
        try:
            return SamplingParams(
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                min_p=min_p,
                repetition_penalty=rep,
                presence_penalty=pres,
                frequency_penalty=freq,
                seed=seed,
                logprobs=out.logprobs,
                top_logprobs=out.top_logprobs,
            )
        except ValueError as e:
            raise _Invalid(str(e)) from None

    def _stopping(
        self, request: exec_pb2.GenerateRequest, n_prompt: int
    ) -> tuple[StoppingCriteria, list[str]]:
        st, lim = request.stopping, self.limits
        if st.HasField("max_new_tokens"):
            if not 1 <= st.max_new_tokens <= lim.max_new_tokens:
                raise _Invalid(
                    f"stopping.max_new_tokens must be in [1, {lim.max_new_tokens}], got {st.max_new_tokens}"
                )
            max_new = st.max_new_tokens
        else:
            max_new = self.default_max_new_tokens or lim.max_new_tokens
            max_new = min(int(max_new), lim.max_new_tokens)
        if st.min_new_tokens > max_new:
            raise _Invalid(
                f"stopping.min_new_tokens ({st.min_new_tokens}) exceeds max_new_tokens ({max_new})"
            )
        if len(st.stop) > lim.max_stop_strings:
            raise _Invalid(f"at most {lim.max_stop_strings} stop strings, got {len(st.stop)}")
        for s in st.stop:
            if not s or len(s.encode()) > lim.max_stop_string_bytes:
                raise _Invalid(f"each stop string must be 1..{lim.max_stop_string_bytes} bytes")
        if len(st.stop_token_ids) > lim.max_stop_token_ids:
            raise _Invalid(f"at most {lim.max_stop_token_ids} stop_token_ids, got {len(st.stop_token_ids)}")
        bad = [t for t in st.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise _Invalid(f"stop_token_ids {bad[:4]} are outside the vocabulary (size {self.vocab_size})")
        if st.HasField("time_limit_ms") and st.time_limit_ms == 0:
            raise _Invalid("stopping.time_limit_ms must be > 0 when set")
        crit = StoppingCriteria(
            max_new_tokens=max_new,
            stop_token_ids=tuple(st.stop_token_ids),
            ignore_eos=st.ignore_eos,
            min_new_tokens=st.min_new_tokens,
        )
        return crit, list(st.stop)

    def _admit(self, n_prompt: int) -> None:
        lim = self.limits
        # counted here, in the event loop, when a stream is admitted: the engine loop's own counts
        # lag behind by up to a step
        if self.active >= lim.max_waiting_requests + self.loop.engine.config.max_batch_size:
            raise _Rejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the waiting queue is full ({lim.max_waiting_requests} requests); retry later",
            )
        if self.loop.waiting_prompt_tokens + n_prompt > lim.max_waiting_prompt_tokens:
            raise _Rejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the waiting queue holds too many prompt tokens (limit {lim.max_waiting_prompt_tokens}); retry later",
            )

    def _logprobs(self, out: RequestOutput) -> list[exec_pb2.TokenLogprob]:
        if out.logprobs is None:
            return []
        res = []
        for lp in out.logprobs:
            top = [
                exec_pb2.TopLogprob(
                    token_id=t, logprob=v, token=self.tokenizer.convert_ids_to_tokens(t) or ""
                )
                for t, v in lp.top
            ]
            res.append(exec_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top=top))
        return res

    # -- RPCs ---------------------------------------------------------------------------------------

    async def Generate(
        self, request: exec_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[exec_pb2.GenerateResponse]:
        arrived = time.monotonic()
        if self.draining:
            await _abort(context, self.metrics, grpc.StatusCode.UNAVAILABLE, "the server is draining")
        if not self.loop.alive:
            await _abort(context, self.metrics, grpc.StatusCode.UNAVAILABLE, "the engine is not running")
        try:
            rid = self._request_id(request, context)
            prompt = self._prompt_ids(request)
            sampling = self._sampling(request)
            stopping, stop_strings = self._stopping(request, len(prompt))
            self._admit(len(prompt))
        except _Invalid as e:
            await _abort(context, self.metrics, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except _Rejected as e:
            await _abort(context, self.metrics, e.code, e.message)
        skip_special = (
            request.output.skip_special_tokens if request.output.HasField("skip_special_tokens") else True
        )
        time_limit = (
            request.stopping.time_limit_ms / 1000 if request.stopping.HasField("time_limit_ms") else None
        )

        aio_loop = asyncio.get_running_loop()
        items: asyncio.Queue[_Item] = asyncio.Queue()
        engine_req = Request(tuple(prompt), sampling, stopping, request_id=f"{rid}#{uuid.uuid4().hex[:8]}")
        self.active += 1
        self._idle.clear()
        self.metrics.prompt_tokens.inc(len(prompt))
        self.loop.submit(engine_req, lambda item: aio_loop.call_soon_threadsafe(items.put_nowait, item))
        log.info("request %s: %d prompt tokens, max_new_tokens %s", rid, len(prompt), stopping.max_new_tokens)

        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids=prompt, skip_special_tokens=skip_special)
        stops = StopMatcher(stop_strings, include_stop_in_output=request.stopping.include_stop_in_output)
        st = _Stream(rid, len(prompt), arrived)
        finished = False
        try:
            while not finished:
                timeout = None if time_limit is None else max(0.0, arrived + time_limit - time.monotonic())
                try:
                    first = await asyncio.wait_for(items.get(), timeout)
                except TimeoutError:
                    self.loop.abort(engine_req.request_id)  # frees the slot at the next step
                    text = stops.push(detok.flush()) + stops.flush()
                    finished = True
                    yield self._final(st, text, [], [], exec_pb2.TIME_LIMIT)
                    break
                batch = [first]
                while not items.empty():
                    batch.append(items.get_nowait())
                new_ids: list[int] = []
                lps: list[exec_pb2.TokenLogprob] = []
                finish = None
                for item in batch:
                    if item.error is not None:
                        finished = True
                        if isinstance(item.error, _Invalid):
                            await _abort(
                                context, self.metrics, grpc.StatusCode.INVALID_ARGUMENT, str(item.error)
                            )
                        await _abort(
                            context,
                            self.metrics,
                            grpc.StatusCode.INTERNAL,
                            f"the engine failed: {type(item.error).__name__}: {item.error}",
                        )
                    out = item.output
                    assert out is not None
                    self._observe(st, out, item.step_started)
                    new_ids.extend(out.new_token_ids)
                    lps.extend(self._logprobs(out))
                    if out.finish_reason is not None:
                        finish = out.finish_reason
                        break
                self.metrics.generated_tokens.inc(len(new_ids))
                text = stops.push(detok.push(new_ids))
                if stops.matched is not None:
                    finished = True
                    self.loop.abort(engine_req.request_id)
                    yield self._final(st, text, new_ids, lps, exec_pb2.STOP_SEQUENCE, stops.matched)
                elif finish is not None:
                    finished = True
                    text += stops.push(detok.flush()) + stops.flush()
                    if finish is FinishReason.ABORTED:  # only we abort: a stop string or time limit
                        reason = exec_pb2.TIME_LIMIT
                    else:
                        reason = _FINISH[finish]
                    yield self._final(st, text, new_ids, lps, reason)
                elif text or new_ids:
                    yield exec_pb2.GenerateResponse(
                        request_id=rid, text=text, token_ids=new_ids, logprobs=lps
                    )
        finally:
            if not finished:  # cancelled, deadline exceeded, or the client went away
                self.loop.abort(engine_req.request_id)
                self.metrics.finished.labels("cancelled").inc()
                log.info("request %s: cancelled by the client after %d tokens", rid, st.generated)
            self.metrics.e2e.observe(time.monotonic() - arrived)
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    def _observe(self, st: _Stream, out: RequestOutput, step_started: float) -> None:
        """Timing metrics and the stream's counters for one engine output."""
        now = time.monotonic()
        if out.new_token_ids:
            if st.first_at is None:
                st.first_at = now
                st.queue_ms = (step_started - st.arrived) * 1000
                self.metrics.ttft.observe(now - st.arrived)
                self.metrics.queue.observe(max(step_started - st.arrived, 0.0))
            elif st.last_at is not None:
                self.metrics.itl.observe((now - st.last_at) / len(out.new_token_ids))
            st.last_at = now
        st.seed = out.seed
        st.generated = out.num_generated_tokens

    def _final(
        self, st: _Stream, text: str, ids, lps, reason: int, matched: str = ""
    ) -> exec_pb2.GenerateResponse:
        """The last message of a stream: finish reason, usage, timing."""
        now = time.monotonic()
        name = exec_pb2.FinishReason.Name(reason)
        self.metrics.finished.labels(name.lower()).inc()
        log.info("request %s: finished (%s) after %d tokens", st.rid, name, st.generated)
        return exec_pb2.GenerateResponse(
            request_id=st.rid,
            text=text,
            token_ids=ids,
            logprobs=lps,
            finish_reason=reason,
            matched_stop=matched,
            usage=exec_pb2.Usage(prompt_tokens=st.n_prompt, completion_tokens=st.generated),
            timing=exec_pb2.Timing(
                queue_ms=st.queue_ms,
                ttft_ms=((st.first_at or now) - st.arrived) * 1000,
                total_ms=(now - st.arrived) * 1000,
            ),
            seed=st.seed,
        )

    async def Tokenize(self, request: exec_pb2.TokenizeRequest, context: grpc.aio.ServicerContext):
        try:
            which = request.WhichOneof("input")
            if which == "messages":
                text = self._chat(request.messages)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            elif which == "text":
                ids = self.tokenizer(request.text, add_special_tokens=request.add_special_tokens)["input_ids"]
            else:
                raise _Invalid("one of text or messages is required")
        except _Invalid as e:
            await _abort(context, self.metrics, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return exec_pb2.TokenizeResponse(ids=ids, tokens=self.tokenizer.convert_ids_to_tokens(ids))

    async def GetModelInfo(self, request: exec_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        man = self.artifact.manifest
        cfg = self.loop.engine.config
        return exec_pb2.ModelInfo(
            model=man.name,
            revision=man.source.get("revision") or "",
            family=man.family,
            dtype=man.target.dtype,
            tp_degree=man.target.tp_degree,
            device=self.device,
            max_batch_size=cfg.max_batch_size,
            max_seq_len=cfg.max_seq_len,
            context_buckets=list(cfg.context_buckets),
            kv_buckets=list(cfg.kv_buckets),
            eos_token_ids=list(self.eos_ids),
            vocab_size=self.vocab_size,
            manifest_digest=self.artifact.digest,
            limits=self.limits.to_proto(),
            running_requests=self.loop.running,
            waiting_requests=self.loop.waiting,
            free_slots=self.loop.free_slots,
            quantization=man.target.quantization or "none",
            manifest_uri=self.artifact.uri,
        )

    async def wait_idle(self, timeout: float) -> None:
        """Drain hook: refuse new streams, give in-flight ones up to ``timeout`` to finish."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)


async def _abort(context: grpc.aio.ServicerContext, metrics: ExecMetrics, code: grpc.StatusCode, msg: str):
    """The one place errors become statuses (``context.abort`` raises)."""
    metrics.rejected.labels(code.name).inc()
    await context.abort(code, msg)


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeConfig:
    manifest_uri: str
    host: str = "127.0.0.1"
    port: int = 0
    device: str = "cpu"
    max_batch_size: int = 8
    max_seq_len: int = 2048
    context_buckets: tuple[int, ...] = (128, 512)
    compile: bool = False
    metrics_port: int = 0
    grace_s: float = 30.0
    max_waiting_requests: int = 256
    max_waiting_prompt_tokens: int = 262_144
    security: grpc_util.ServerSecurity | None = None


class ExecServer:
    """Loads the artifact, starts the engine loop and the gRPC server. ``start()`` returns the port;
    readiness turns SERVING once the model is loaded and warmed."""

    def __init__(
        self, cfg: ServeConfig, engine: Engine | None = None, artifact: Artifact | None = None
    ) -> None:
        self.cfg = cfg
        self._engine = engine
        self._artifact = artifact
        self.metrics = ExecMetrics()
        self.loop: EngineLoop | None = None
        self.servicer: ExecServicer | None = None
        self._grpc: grpc_util.GrpcServer | None = None
        self._metrics_httpd = None
        self._liveness_task: asyncio.Task | None = None
        self.load_error: str | None = None

    @property
    def port(self) -> int:
        assert self._grpc is not None
        return self._grpc.port

    @property
    def grpc_server(self) -> grpc_util.GrpcServer:
        assert self._grpc is not None, "server not started"
        return self._grpc

    def _load(self) -> tuple[Artifact, Engine]:
        from exec_service.artifact import open_artifact
        from exec_service.engine import RuntimeConfig

        artifact = self._artifact or open_artifact(self.cfg.manifest_uri)
        engine = self._engine
        if engine is None:
            rc = RuntimeConfig(
                max_batch_size=self.cfg.max_batch_size,
                max_seq_len=self.cfg.max_seq_len,
                context_buckets=self.cfg.context_buckets,
                backend=self.cfg.device,
                compile=self.cfg.compile,
            )
            engine = Engine.from_manifest(artifact.uri, rc, eos_token_ids=_eos_ids(artifact))
        _warm_up(engine)
        return artifact, engine

    async def start(self) -> int:
        """Bind and answer health checks at once (NOT_SERVING), load + warm up, then SERVING."""
        servicer_holder: dict[str, Any] = {}

        def add(server: grpc.aio.Server) -> None:
            grpc_util.add_service(
                server, _Deferred(servicer_holder), exec_pb2.DESCRIPTOR.services_by_name["ExecService"]
            )

        self._grpc = grpc_util.create_server(
            add,
            [SERVICE_NAME],
            host=self.cfg.host,
            port=self.cfg.port,
            security=self.cfg.security,
            max_message_bytes=EXEC_MAX_MESSAGE_BYTES,
        )
        await self._grpc.start(ready=False)
        self._metrics_httpd = grpc_util.start_metrics_server(
            self.cfg.metrics_port, self.cfg.host, self.metrics.registry
        )
        log.info("exec server listening on %s; loading %s", self._grpc.address, self.cfg.manifest_uri)
        try:
            artifact, engine = await asyncio.to_thread(self._load)
            tokenizer = await asyncio.to_thread(artifact.load_tokenizer)
        except Exception as e:  # whatever stops the load (corrupt shard, dead worker rank, bad config)
            # A corrupt or missing artifact is never served: stay up with readiness NOT_SERVING (so
            # the rollout stalls visibly) and answer UNAVAILABLE with the reason.
            self.load_error = f"{type(e).__name__}: {e}"
            servicer_holder["error"] = self.load_error
            log.error("cannot serve %s: %s", self.cfg.manifest_uri, self.load_error)
            return self._grpc.port
        self.loop = EngineLoop(engine, self.metrics)
        self.loop.start()
        limits = Limits(
            max_prompt_tokens=engine.config.max_seq_len - 1,
            max_new_tokens=engine.config.max_seq_len - 1,
            max_top_logprobs=engine.config.num_top_logprobs,
            max_waiting_requests=self.cfg.max_waiting_requests,
            max_waiting_prompt_tokens=self.cfg.max_waiting_prompt_tokens,
        )
        self.servicer = ExecServicer(artifact, self.loop, tokenizer, limits, self.metrics, self.cfg.device)
        servicer_holder["s"] = self.servicer
        self._liveness_task = asyncio.create_task(self._watch_liveness())
        await self._grpc.set_ready(True)
        log.info(
            "exec server ready: %s (%s, tp=%d)",
            artifact.manifest.name,
            self.cfg.device,
            artifact.manifest.target.tp_degree,
        )
        return self._grpc.port

    async def _watch_liveness(self) -> None:
        """Liveness "" mirrors the engine loop: a dead loop (e.g. a TP rank died) makes it
        NOT_SERVING so Kubernetes restarts the pod."""
        while True:
            await asyncio.sleep(0.5)
            if self.loop is not None and not self.loop.alive:
                await self.grpc_server.health.set("", grpc_util.NOT_SERVING)
                await self.grpc_server.set_ready(False)
                return

    async def drain(self) -> None:
        wait_idle = self.servicer.wait_idle if self.servicer else None
        await self.grpc_server.drain(self.cfg.grace_s, wait_idle)
        self._close()

    async def stop(self, grace_s: float | None = 0) -> None:
        if self.servicer is not None:
            self.servicer.draining = True
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
        self._close()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.server.wait_for_termination()

    def _close(self) -> None:
        if self._liveness_task is not None:
            self._liveness_task.cancel()
            self._liveness_task = None
        if self.loop is not None:
            self.loop.stop()
            self.loop.engine.close()
            self.loop = None
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
            self._metrics_httpd = None


class _Deferred(exec_pb2_grpc.ExecServiceServicer):
    """Answers UNAVAILABLE while the model loads, then delegates to the real servicer."""

    def __init__(self, holder: dict[str, Any]) -> None:
        self._h = holder

    async def _get(self, context) -> ExecServicer:
        s = self._h.get("s")
        if s is None:
            err = self._h.get("error")
            msg = f"the model failed to load: {err}" if err else "the model is still loading"
            await context.abort(grpc.StatusCode.UNAVAILABLE, msg)
        return s

    async def Generate(self, request, context):
        s = await self._get(context)
        async for msg in s.Generate(request, context):
            yield msg

    async def Tokenize(self, request, context):
        return await (await self._get(context)).Tokenize(request, context)

    async def GetModelInfo(self, request, context):
        return await (await self._get(context)).GetModelInfo(request, context)


def _eos_ids(artifact: Artifact) -> tuple[int, ...]:
    """EOS ids: the generation_config's (which chat models set to the end-of-turn token), else the
    architecture's."""
    eos = artifact.generation_config.get("eos_token_id")
    if eos is None:
        return tuple(artifact.manifest.architecture.eos_token_ids)
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _warm_up(engine: Engine) -> None:
    """Run every context bucket and a few decode steps once so the first request pays no
    first-call costs (allocation, compilation when enabled)."""
    for bucket in engine.config.context_buckets:
        n = min(bucket, engine.config.max_seq_len - 2)
        engine.generate(
            [Request(tuple([0] * n), stopping=StoppingCriteria(max_new_tokens=2, ignore_eos=True))]
        )


async def serve(cfg: ServeConfig) -> None:
    """Runs the exec server until SIGTERM/SIGINT, then drains gracefully."""
    server = ExecServer(cfg)
    remove = grpc_util.install_signal_handlers(server.drain)
    try:
        await server.start()
        await server.wait_for_termination()
    finally:
        remove()
        server._close()
    log.info("exec server stopped")
