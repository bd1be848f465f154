"""The routes of the OpenAI-compatible front: thin — authenticate, parse, map, delegate to the gateway.

    GET  /v1/models, /v1/models/{id}   the served model (id = the manifest's model name)
    POST /v1/chat/completions          chat, through the model's chat template
    POST /v1/completions               one prompt (text or token ids)
    GET  /health                       200 when serving, 503 while loading or draining (no auth)

A generation request goes: bearer token (401) → ``Gateway.ready`` (503) → the body (pydantic types;
413 past the request size limit) → the model (404) → ``mapping.generate_params`` →
``requests.parse_request`` (the gRPC front's validation: 400 with the same words) →
``Gateway.open`` (the engine's check 400, the queue 429) — all before the status line is sent. Then
the gateway's messages become one JSON object, or server-sent events (``data: {chunk}`` … ``data:
[DONE]``). Either way the request is watched for the client going away: a disconnect cancels the
engine request, whose slot is freed at the next engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from exec_service.gateway import Gateway, Generation, Serving
from exec_service.http.errors import HttpError, error_object, error_response
from exec_service.http.mapping import Body, Output, TokenTexts, generate_params, openai_param, output_for, sse
from exec_service.http.schema import ChatCompletionRequest, CompletionRequest
from exec_service.metrics import ProtocolMetrics
from exec_service.requests import RequestError, parse_request
from protos import exec_pb2
from shared.rpc_errors import RpcError
from shared.security import bearer_token_valid

log = logging.getLogger("neuron_serve.exec.http")

Handler = Callable[[Request], Awaitable[Response]]


class OpenAIFront:
    """The ASGI app (``.app``) of one exec server: its gateway, its HTTP metrics, its bearer tokens."""

    def __init__(self, gateway: Gateway, metrics: ProtocolMetrics, tokens: tuple[bytes, ...] = ()) -> None:
        self.gateway, self.metrics, self.tokens = gateway, metrics, tokens
        self.started = int(time.time())
        self._texts: tuple[Any, TokenTexts] | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/models", self._endpoint(self.list_models), methods=["GET"]),
                Route("/v1/models/{model:path}", self._endpoint(self.get_model), methods=["GET"]),
                Route("/v1/chat/completions", self._endpoint(self.chat), methods=["POST"]),
                Route("/v1/completions", self._endpoint(self.completions), methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_exception},
        )

    # -- plumbing: auth and the error map, in one place for every route ------------------------------

    def _endpoint(self, fn: Handler) -> Handler:
        async def handle(request: Request) -> Response:
            if self.tokens and not bearer_token_valid(request.headers.get("authorization"), self.tokens):
                status, body, _ = error_object(
                    RpcError(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
                )
                return error_response(status, body, {"www-authenticate": "Bearer"})
            try:
                return await fn(request)
            except Exception as e:
                return self._error(e)

        return handle

    def _error(self, exc: BaseException, param: str | None = None) -> Response:
        status, body, code = error_object(exc, param)
        if code is not None:
            self.metrics.reject(code)
        return error_response(status, body)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        """Starlette's own refusals (no such route, wrong method) as OpenAI error objects too."""
        assert isinstance(exc, HTTPException)
        return error_response(exc.status_code, error_object(HttpError(exc.status_code, exc.detail))[1])

    # -- routes ------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        try:
            self.gateway.ready()
        except RpcError as e:
            return self._error(e)
        return JSONResponse({"status": "ok"})

    def _model_object(self, s: Serving) -> dict[str, Any]:
        return {
            "id": s.model_name,
            "object": "model",
            "created": self.started,
            "owned_by": "neuron-serve",
            "max_model_len": s.loop.engine.config.max_seq_len,
        }

    async def list_models(self, request: Request) -> Response:
        s = self.gateway.ready()
        return JSONResponse({"object": "list", "data": [self._model_object(s)]})

    async def get_model(self, request: Request) -> Response:
        s = self.gateway.ready()
        _check_model(request.path_params["model"], s)
        return JSONResponse(self._model_object(s))

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, ChatCompletionRequest)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, CompletionRequest)

    async def _generate(self, request: Request, kind: type[Body]) -> Response:
        arrived = time.monotonic()
        s = self.gateway.ready()
        try:
            body = await _read_body(request, kind, s.limits.max_message_bytes)
        except RequestError as e:  # a type error: its field is the body's own parameter name
            return self._error(e, e.field)
        _check_model(body.model, s)
        try:
            params = generate_params(body, request.headers.get("x-request-id", ""))
            parsed = parse_request(params, s.tokenizer, s.limits, s.defaults)
        except RequestError as e:
            return self._error(e, openai_param(e.field, body))
        generation = self.gateway.open(s, parsed, self.metrics, arrived)
        output = output_for(body, generation.request_id, s.model_name, self._token_texts(s))
        headers = {"x-request-id": generation.request_id}
        if body.stream:
            return EventStream(generation, output, self, headers)
        return await self._complete(request, generation, output, headers)

    def _token_texts(self, s: Serving) -> TokenTexts:
        if self._texts is None or self._texts[0] is not s.tokenizer:
            self._texts = (s.tokenizer, TokenTexts(s.tokenizer))
        return self._texts[1]

    async def _complete(
        self, request: Request, generation: Generation, output: Output, headers: dict[str, str]
    ) -> Response:
        """The whole answer as one object; a client that goes away meanwhile cancels the request."""
        with generation:
            collect = asyncio.ensure_future(_collect(generation))
            if not await _unless_disconnected(collect, request.receive):
                return Response(status_code=499)  # nobody reads it: the connection is gone
            msgs = collect.result()  # EngineFailed → the error map (500)
        return JSONResponse(output.response(msgs), headers=headers)


def _check_model(name: str, s: Serving) -> None:
    if name != s.model_name:
        raise RpcError(
            grpc.StatusCode.NOT_FOUND,
            f"the model {name!r} is not served here; this server serves {s.model_name!r} (GET /v1/models)",
        )


async def _read_body(request: Request, kind: type[BaseModel], limit: int) -> Any:
    """The body parsed as ``kind``, refused past ``limit`` bytes (413) or when it is not that type (400)."""
    declared = request.headers.get("content-length", "")
    too_large = HttpError(413, f"the request body is larger than the limit of {limit} bytes")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    parts, n = [], 0
    async for part in request.stream():
        n += len(part)
        if n > limit:
            raise too_large
        parts.append(part)
    try:
        return kind.model_validate_json(b"".join(parts))
    except ValidationError as e:
        errs = e.errors(include_url=False)
        first = errs[0]
        loc = ".".join(str(x) for x in first["loc"])
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        message = f"{loc}: {first['msg']}{more}" if loc else f"{first['msg']}{more}"
        raise RequestError(message, field=str(first["loc"][0]) if first["loc"] else None) from None


async def _collect(generation: Generation) -> list[exec_pb2.GenerateResponse]:
    return [m async for m in generation.messages()]


async def _wait_disconnect(receive: Receive) -> None:
    """Returns when the client has gone (the request body was read before: what comes next on
    ``receive`` is ``http.disconnect``, when the connection closes or the response completes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(work: asyncio.Future, receive: Receive) -> bool:
    """Waits for ``work``; False (``work`` cancelled) if the client disconnects first."""
    gone = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    return work.done() and not work.cancelled()


class EventStream(Response):
    """Server-sent events for one generation: ``output``'s chunks as the gateway's messages come,
    then the usage chunk (when asked) and ``data: [DONE]``. An error after the status line is sent
    as an ``{"error": …}`` event (what the OpenAI SDKs raise from); a client disconnect cancels."""

    media_type = "text/event-stream"

    def __init__(
        self, generation: Generation, output: Output, front: OpenAIFront, headers: dict[str, str]
    ) -> None:
        self.generation, self.output, self.front = generation, output, front
        self.status_code = 200
        self.background = None
        self.init_headers({**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self.generation:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            pump = asyncio.ensure_future(self._pump(send))
            if await _unless_disconnected(pump, receive) and pump.exception() is not None:
                log.error("event stream %s failed", self.generation.request_id, exc_info=pump.exception())

    async def _pump(self, send: Send) -> None:
        out = self.output

        async def emit(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        first = out.start()
        if first:
            await emit(first)
        try:
            last = None
            async for msg in self.generation.messages():
                data = out.chunks(msg)
                if data:
                    await emit(data)
                last = msg
            assert last is not None, "a generation ends with a final message"
            tail = out.end(last)
        except Exception as e:  # the status line is out: the error goes in-band
            _, body, code = error_object(e)
            if code is not None:
                self.front.metrics.reject(code)
            tail = sse(body)
        with contextlib.suppress(OSError):
            await emit(tail, more=False)
