"""OpenAI bodies → ``GenerateParams``; ``GenerateResponse`` messages → OpenAI objects and chunks.

Requests: :func:`generate_params` maps a ``schema`` body to the one protocol-free request both fronts
build (``requests.GenerateParams``): ``max_completion_tokens`` / ``max_tokens`` → max_new_tokens,
``stop`` → stop strings, ``min_tokens`` → min_new_tokens, ``logprobs`` / ``top_logprobs`` → output
logprobs, chat ``developer`` messages → ``system``. It refuses only what this front cannot express
(``n`` > 1, tools, ``logit_bias`` …); every other rule is ``requests.parse_request``'s. Unset
sampling fields fall back to the model's generation_config, as on gRPC; ``/v1/completions`` without
``max_tokens`` generates 16 tokens, OpenAI's documented default for that endpoint.

Responses: an :class:`Output` per request turns the gateway's messages into one response object
(non-streaming) or into SSE chunks. Finish reasons: EOS, a stop token or a stop string → ``stop``;
max_tokens, the context length (or a time limit) → ``length``.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from exec_service.http.schema import ChatCompletionRequest, CompletionRequest
from exec_service.requests import GenerateParams, RequestError
from protos import exec_pb2

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

FINISH_REASONS = {
    exec_pb2.EOS: "stop",
    exec_pb2.STOP_TOKEN: "stop",
    exec_pb2.STOP_SEQUENCE: "stop",
    exec_pb2.LENGTH: "length",
    exec_pb2.CONTEXT_LENGTH: "length",
    exec_pb2.TIME_LIMIT: "length",
}

Body = ChatCompletionRequest | CompletionRequest


# -- requests -----------------------------------------------------------------------------------------


def _refuse(message: str, param: str) -> RequestError:
    return RequestError(message, field=param)


def _unsupported(body: Body) -> None:
    """Known OpenAI parameters this server cannot honour: refused, never silently ignored."""
    if body.n not in (None, 1):
        raise _refuse(f"n must be 1: this server returns one choice per request, got {body.n}", "n")
    if body.logit_bias:
        raise _refuse("logit_bias is not supported by this server", "logit_bias")
    if isinstance(body, ChatCompletionRequest):
        if body.tools or body.functions:
            raise _refuse("tools and functions are not supported by this server", "tools")
        for name in ("tool_choice", "function_call"):
            if getattr(body, name) not in (None, "none"):
                raise _refuse(f"{name} is not supported by this server", name)
        fmt = body.response_format
        if fmt is not None and fmt.get("type") != "text":
            raise _refuse(
                f"response_format {fmt.get('type')!r} is not supported; only 'text'", "response_format"
            )
    else:
        if body.echo:
            raise _refuse("echo is not supported by this server", "echo")
        if body.suffix:
            raise _refuse("suffix is not supported by this server", "suffix")
        if body.best_of not in (None, 1):
            raise _refuse(f"best_of must be 1, got {body.best_of}", "best_of")


def _chat_messages(body: ChatCompletionRequest) -> list[tuple[str, str]]:
    out = []
    for m in body.messages:
        if isinstance(m.content, list):
            kinds = {p.type for p in m.content} - {"text"}
            if kinds:
                raise _refuse(f"only text content parts are supported, got {sorted(kinds)}", "messages")
            content = "".join(p.text or "" for p in m.content)
        else:
            content = m.content or ""
        # OpenAI's "developer" role is its newer name for "system"
        out.append(("system" if m.role == "developer" else m.role, content))
    return out


def _prompt(body: CompletionRequest) -> dict[str, Any]:
    p = body.prompt
    if isinstance(p, str):
        return {"prompt": p}
    if p and isinstance(p[0], list | str):  # a list of prompts: one is served
        if len(p) != 1:
            raise _refuse(f"one prompt per request is served, got {len(p)}", "prompt")
        p = p[0]
        return {"prompt": p} if isinstance(p, str) else {"prompt_token_ids": list(p)}
    return {"prompt_token_ids": list(p)}  # token ids (an empty list: "the prompt is empty")


def generate_params(body: Body, request_id: str = "") -> GenerateParams:
    """The one internal request for ``body``; raises RequestError for what this front cannot serve."""
    _unsupported(body)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    common = dict(
        request_id=request_id,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        min_p=body.min_p,
        seed=body.seed,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        min_new_tokens=body.min_tokens or 0,
        stop=stop,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=bool(body.ignore_eos),
    )
    if isinstance(body, ChatCompletionRequest):
        max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return GenerateParams(
            messages=_chat_messages(body),
            max_new_tokens=max_new,
            logprobs=bool(body.logprobs),
            top_logprobs=body.top_logprobs or 0,
            **common,
        )
    return GenerateParams(
        **_prompt(body),
        max_new_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens,
        logprobs=body.logprobs is not None,
        top_logprobs=body.logprobs or 0,
        **common,
    )


# internal field path (RequestError.field) → the OpenAI parameter, where the names differ
_PARAMS = {
    "prompt_token_ids": "prompt",
    "stopping.min_new_tokens": "min_tokens",
    "request_id": None,  # the X-Request-Id header
}


def openai_param(field: str | None, body: Body | None) -> str | None:
    """The body parameter an error is about (the ``param`` of the OpenAI error object)."""
    if field is None:
        return None
    if field == "stopping.max_new_tokens":
        chat = isinstance(body, ChatCompletionRequest)
        return "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
    if field == "output.top_logprobs" and isinstance(body, CompletionRequest):
        return "logprobs"
    if field in _PARAMS:
        return _PARAMS[field]
    return field.rpartition(".")[2]


# -- responses ----------------------------------------------------------------------------------------


def sse(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def usage(u: exec_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


class TokenTexts:
    """Token id → its text, as logprobs report it (decoded alone; cached: a vocabulary is finite)."""

    def __init__(self, tokenizer: Any) -> None:
        self.text: Callable[[int], str] = functools.lru_cache(maxsize=65536)(
            lambda i: tokenizer.decode([i], skip_special_tokens=False)
        )


class Output:
    """One request's answer: ``chunks(msg)`` per gateway message when streaming, ``response(msgs)``
    otherwise. ``created`` and ``id`` are fixed at the start, as OpenAI keeps them for every chunk."""

    object_name = ""
    id_prefix = ""

    def __init__(
        self, request_id: str, model: str, texts: TokenTexts, *, logprobs: bool, include_usage: bool
    ) -> None:
        self.id = f"{self.id_prefix}{request_id}"
        self.model = model
        self.created = int(time.time())
        self.texts = texts
        self.logprobs = logprobs
        self.include_usage = include_usage
        self._offset = 0  # characters of text sent so far (completions' text_offset)

    def _head(self, obj: str) -> dict[str, Any]:
        head = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        if self.include_usage:
            head["usage"] = None  # every chunk but the last, as OpenAI sends them
        return head

    def start(self) -> bytes:
        """What a stream sends before the first token (nothing, unless the format asks)."""
        return b""

    def chunks(self, msg: exec_pb2.GenerateResponse) -> bytes:
        raise NotImplementedError

    def end(self, last: exec_pb2.GenerateResponse) -> bytes:
        """The usage chunk (``stream_options.include_usage``) and ``[DONE]``."""
        out = b""
        if self.include_usage:
            out = sse({**self._head(self.object_name), "choices": [], "usage": usage(last.usage)})
        return out + SSE_DONE

    def response(self, msgs: Sequence[exec_pb2.GenerateResponse]) -> dict[str, Any]:
        raise NotImplementedError


class ChatOutput(Output):
    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def _content_logprobs(self, msg: exec_pb2.GenerateResponse) -> list[dict[str, Any]]:
        text = self.texts.text

        def entry(token: str, lp: float) -> dict[str, Any]:
            return {"token": token, "logprob": lp, "bytes": list(token.encode())}

        return [
            {
                **entry(text(lp.token_id), lp.logprob),
                "top_logprobs": [entry(text(t.token_id), t.logprob) for t in lp.top],
            }
            for lp in msg.logprobs
        ]

    def start(self) -> bytes:
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return sse({**self._head(self.object_name), "choices": [choice]})

    def chunks(self, msg: exec_pb2.GenerateResponse) -> bytes:
        final = msg.finish_reason != exec_pb2.FINISH_REASON_UNSPECIFIED
        if not (msg.text or final or (self.logprobs and msg.logprobs)):
            return b""  # ids whose text is held back (incomplete UTF-8, a possible stop string)
        choice = {
            "index": 0,
            "delta": {"content": msg.text} if msg.text else {},
            "logprobs": {"content": self._content_logprobs(msg)} if self.logprobs else None,
            "finish_reason": FINISH_REASONS[msg.finish_reason] if final else None,
        }
        return sse({**self._head(self.object_name), "choices": [choice]})

    def response(self, msgs: Sequence[exec_pb2.GenerateResponse]) -> dict[str, Any]:
        last = msgs[-1]
        logprobs = [e for m in msgs for e in self._content_logprobs(m)] if self.logprobs else None
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(m.text for m in msgs)},
                    "logprobs": {"content": logprobs} if logprobs is not None else None,
                    "finish_reason": FINISH_REASONS[last.finish_reason],
                }
            ],
            "usage": usage(last.usage),
        }


class CompletionOutput(Output):
    object_name = "text_completion"
    id_prefix = "cmpl-"

    def _logprobs(self, msg: exec_pb2.GenerateResponse) -> dict[str, Any]:
        text = self.texts.text
        tokens = [text(lp.token_id) for lp in msg.logprobs]
        offsets = []
        for t in tokens:
            offsets.append(self._offset)
            self._offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in msg.logprobs],
            "top_logprobs": [{text(t.token_id): t.logprob for t in lp.top} for lp in msg.logprobs],
            "text_offset": offsets,
        }

    def chunks(self, msg: exec_pb2.GenerateResponse) -> bytes:
        final = msg.finish_reason != exec_pb2.FINISH_REASON_UNSPECIFIED
        if not (msg.text or final or (self.logprobs and msg.logprobs)):
            return b""
        choice = {
            "index": 0,
            "text": msg.text,
            "logprobs": self._logprobs(msg) if self.logprobs else None,
            "finish_reason": FINISH_REASONS[msg.finish_reason] if final else None,
        }
        return sse({**self._head(self.object_name), "choices": [choice]})

    def response(self, msgs: Sequence[exec_pb2.GenerateResponse]) -> dict[str, Any]:
        last = msgs[-1]
        lps = None
        if self.logprobs:
            parts = [self._logprobs(m) for m in msgs]
            lps = {
                k: [x for p in parts for x in p[k]]
                for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
            }
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "text": "".join(m.text for m in msgs),
                    "logprobs": lps,
                    "finish_reason": FINISH_REASONS[last.finish_reason],
                }
            ],
            "usage": usage(last.usage),
        }


def output_for(body: Body, request_id: str, model: str, texts: TokenTexts) -> Output:
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    if isinstance(body, ChatCompletionRequest):
        return ChatOutput(request_id, model, texts, logprobs=bool(body.logprobs), include_usage=include_usage)
    return CompletionOutput(
        request_id, model, texts, logprobs=body.logprobs is not None, include_usage=include_usage
    )
