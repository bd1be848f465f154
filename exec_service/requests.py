"""A generation request → the engine's ``Request``: validation, defaults, chat — for every front.

Each front states a request in its own schema (gRPC: the ``GenerateRequest`` proto; HTTP: the OpenAI
bodies of ``exec_service.http.schema``) and maps it to ONE protocol-free :class:`GenerateParams`
(plain values, None = unset); :func:`parse_request` validates that and builds the engine request, so
both fronts refuse the same inputs with the same words. :func:`to_engine_request` is the gRPC
mapping (proto → ``GenerateParams`` → ``parse_request``).

Pure functions of the request, the tokenizer, the request limits and the model's generation
defaults — unit-tested without a server. What depends on the model (prompt length, vocabulary
range, top_logprobs cap) is checked once, by the engine
(``exec_service.engine.limits``); the rest (field ranges, stop strings, request ids, chat messages)
is checked here. Errors are ``RequestError`` (INVALID_ARGUMENT) naming the field and its limit;
``RequestError.field`` is the internal field path (``sampling.temperature``), which a front may
translate into its own parameter name.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from exec_service.engine import Request, SamplingParams, StoppingCriteria
from protos import exec_pb2
from shared.rpc_errors import RpcError

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # requests carry prompts, not tensors: larger ones are refused
CHAT_ROLES = ("system", "user", "assistant", "tool")


class RequestError(RpcError):
    """A request field is invalid (INVALID_ARGUMENT unless another code is given). ``field``: the
    internal path of the offending field (``GenerateParams`` grouped as the proto groups it:
    ``sampling.top_p``, ``stopping.stop``, ``output.top_logprobs``, ``messages``), None when no
    single field is at fault."""

    def __init__(
        self,
        message: str,
        code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
        field: str | None = None,
    ) -> None:
        super().__init__(code, message)
        self.field = field


@dataclass(frozen=True)
class Limits:
    """Per-request caps, reported by GetModelInfo. ``max_prompt_tokens`` and ``max_top_logprobs`` are
    the engine's (it enforces them); the rest are checked here or at admission."""

    max_prompt_tokens: int
    max_new_tokens: int
    max_top_logprobs: int = 20
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256
    max_stop_token_ids: int = 64
    max_request_id_bytes: int = 128
    max_message_bytes: int = MAX_MESSAGE_BYTES
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


@dataclass(frozen=True)
class GenerationDefaults:
    """What unset sampling / stopping fields fall back to: the model's generation_config.json with
    transformers' semantics (without ``do_sample`` the model decodes greedily)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None

    @classmethod
    def from_generation_config(cls, gen: dict[str, Any]) -> GenerationDefaults:
        def value(key: str, default: Any) -> Any:
            v = gen.get(key)
            return default if v is None else v

        sample = bool(gen.get("do_sample"))
        max_new = gen.get("max_new_tokens")
        return cls(
            temperature=float(value("temperature", 1.0)) if sample else 0.0,
            top_k=int(value("top_k", 0)) if sample else 0,
            top_p=float(value("top_p", 1.0)) if sample else 1.0,
            min_p=float(value("min_p", 0.0)) if sample else 0.0,
            repetition_penalty=float(value("repetition_penalty", 1.0)),
            max_new_tokens=int(max_new) if max_new is not None else None,
        )


@dataclass(frozen=True)
class ParsedRequest:
    """Everything a stream needs: the engine request and what the text side does with its tokens."""

    request_id: str  # the client's (echoed in every message)
    engine_request: Request  # its request_id is ``request_id`` + a unique suffix
    stop_strings: tuple[str, ...] = ()
    include_stop_in_output: bool = False
    skip_special_tokens: bool = True
    time_limit_s: float | None = None

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.engine_request.prompt_token_ids


@dataclass(frozen=True)
class GenerateParams:
    """One generation request as any front states it, protocol-free: plain values, None = unset (the
    model's generation defaults apply). Exactly one of ``prompt``, ``prompt_token_ids`` and
    ``messages`` is the input. Nothing here is checked yet: :func:`parse_request` does that."""

    request_id: str = ""
    prompt: str | None = None
    prompt_token_ids: Sequence[int] | None = None
    messages: Sequence[tuple[str, str]] | None = None  # (role, content), rendered by the chat template
    # sampling
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # stopping
    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    include_stop_in_output: bool = False
    time_limit_ms: int | None = None
    # output
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool | None = None  # None = True


def params_from_proto(msg: exec_pb2.GenerateRequest, metadata_request_id: str = "") -> GenerateParams:
    """The gRPC schema → ``GenerateParams`` (proto3 ``optional`` fields: unset = None)."""
    s, st, out = msg.sampling, msg.stopping, msg.output

    def opt(m: Any, name: str) -> Any:
        return getattr(m, name) if m.HasField(name) else None

    which = msg.WhichOneof("input")
    return GenerateParams(
        request_id=msg.request_id or metadata_request_id,
        prompt=msg.prompt if which == "prompt" else None,
        prompt_token_ids=list(msg.prompt_token_ids.ids) if which == "prompt_token_ids" else None,
        messages=[(m.role, m.content) for m in msg.messages.messages] if which == "messages" else None,
        temperature=opt(s, "temperature"),
        top_k=opt(s, "top_k"),
        top_p=opt(s, "top_p"),
        min_p=opt(s, "min_p"),
        seed=opt(s, "seed"),
        repetition_penalty=opt(s, "repetition_penalty"),
        presence_penalty=opt(s, "presence_penalty"),
        frequency_penalty=opt(s, "frequency_penalty"),
        max_new_tokens=opt(st, "max_new_tokens"),
        min_new_tokens=st.min_new_tokens,
        stop=tuple(st.stop),
        stop_token_ids=tuple(st.stop_token_ids),
        ignore_eos=st.ignore_eos,
        include_stop_in_output=st.include_stop_in_output,
        time_limit_ms=opt(st, "time_limit_ms"),
        logprobs=out.logprobs,
        top_logprobs=out.top_logprobs,
        skip_special_tokens=opt(out, "skip_special_tokens"),
    )


def to_engine_request(
    msg: exec_pb2.GenerateRequest,
    tokenizer: Any,
    limits: Limits,
    defaults: GenerationDefaults,
    metadata_request_id: str = "",
) -> ParsedRequest:
    """The gRPC front's mapping; raises RequestError for an invalid field."""
    return parse_request(params_from_proto(msg, metadata_request_id), tokenizer, limits, defaults)


def parse_request(
    p: GenerateParams, tokenizer: Any, limits: Limits, defaults: GenerationDefaults
) -> ParsedRequest:
    """The one validation of every front; raises RequestError for an invalid field."""
    rid = request_id(p.request_id, limits)
    prompt = prompt_ids(p, tokenizer, limits)
    sampling = sampling_params(p, defaults)
    stopping, stops = stopping_criteria(p, defaults, limits)
    try:
        req = Request(tuple(prompt), sampling, stopping, request_id=f"{rid}#{uuid.uuid4().hex[:8]}")
    except ValueError as e:
        raise RequestError(str(e)) from None
    return ParsedRequest(
        request_id=rid,
        engine_request=req,
        stop_strings=stops,
        include_stop_in_output=p.include_stop_in_output,
        skip_special_tokens=True if p.skip_special_tokens is None else p.skip_special_tokens,
        time_limit_s=p.time_limit_ms / 1000 if p.time_limit_ms is not None else None,
    )


def request_id(rid: str, limits: Limits) -> str:
    if not rid:
        return uuid.uuid4().hex
    if len(rid.encode()) > limits.max_request_id_bytes:
        raise RequestError(
            f"request_id is longer than {limits.max_request_id_bytes} bytes", field="request_id"
        )
    if not rid.isprintable():
        raise RequestError("request_id must be printable text", field="request_id")
    return rid


def render_chat(msgs: Sequence[tuple[str, str]], tokenizer: Any, limits: Limits) -> str:
    """The model's chat template applied to (role, content) messages, with the generation prompt."""
    if not msgs:
        raise RequestError("messages is empty", field="messages")
    if len(msgs) > limits.max_chat_messages:
        raise RequestError(f"more than {limits.max_chat_messages} chat messages", field="messages")
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError(
            "this model has no chat template; send `prompt` or `prompt_token_ids`", field="messages"
        )
    conv = []
    for role, content in msgs:
        if role not in CHAT_ROLES:
            raise RequestError(
                f"chat message role must be system, user, assistant or tool, got {role!r}", field="messages"
            )
        conv.append({"role": role, "content": content})
    try:
        return tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja errors in the model's template (e.g. role order rules)
        raise RequestError(
            f"the model's chat template rejected the messages: {e}", field="messages"
        ) from None


def prompt_ids(p: GenerateParams, tokenizer: Any, limits: Limits) -> list[int]:
    if p.prompt_token_ids is not None:
        ids, field = list(p.prompt_token_ids), "prompt_token_ids"
    elif p.prompt is not None:
        ids, field = tokenizer(p.prompt, add_special_tokens=True)["input_ids"], "prompt"
    elif p.messages is not None:
        text = render_chat(p.messages, tokenizer, limits)
        ids, field = tokenizer(text, add_special_tokens=False)["input_ids"], "messages"
    else:
        raise RequestError("one of prompt, prompt_token_ids or messages is required")
    if not ids:
        raise RequestError("the prompt is empty", field=field)
    return ids


def tokenize_request(msg: exec_pb2.TokenizeRequest, tokenizer: Any, limits: Limits) -> list[int]:
    which = msg.WhichOneof("input")
    if which == "messages":
        text = render_chat([(m.role, m.content) for m in msg.messages.messages], tokenizer, limits)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if which == "text":
        return tokenizer(msg.text, add_special_tokens=msg.add_special_tokens)["input_ids"]
    raise RequestError("one of text or messages is required")


def _in_range(name: str, v: float, lo: float, hi: float) -> float:
    if not math.isfinite(v) or not lo <= v <= hi:
        raise RequestError(
            f"sampling.{name} must be a finite number in [{lo}, {hi}], got {v}", field=f"sampling.{name}"
        )
    return v


def sampling_params(p: GenerateParams, defaults: GenerationDefaults) -> SamplingParams:
    def field(name: str, lo: float, hi: float, default: float) -> float:
        v = getattr(p, name)
        return default if v is None else _in_range(name, v, lo, hi)

    top_p = field("top_p", 0, 1, defaults.top_p)
    if top_p == 0:
        raise RequestError("sampling.top_p must be in (0, 1]", field="sampling.top_p")
    if p.top_logprobs and not p.logprobs:
        raise RequestError("output.top_logprobs needs output.logprobs", field="output.top_logprobs")
    if p.seed is not None and p.seed >= 2**63:
        raise RequestError("sampling.seed must be below 2**63", field="sampling.seed")
    try:
        return SamplingParams(
            temperature=field("temperature", 0, 100, defaults.temperature),
            top_k=defaults.top_k if p.top_k is None else p.top_k,
            top_p=top_p,
            min_p=field("min_p", 0, 1, defaults.min_p),
            repetition_penalty=field("repetition_penalty", 1e-3, 100, defaults.repetition_penalty),
            presence_penalty=field("presence_penalty", -2, 2, 0.0),
            frequency_penalty=field("frequency_penalty", -2, 2, 0.0),
            seed=p.seed,
            logprobs=p.logprobs,
            top_logprobs=p.top_logprobs,
        )
    except ValueError as e:
        raise RequestError(str(e)) from None


def stopping_criteria(
    p: GenerateParams, defaults: GenerationDefaults, limits: Limits
) -> tuple[StoppingCriteria, tuple[str, ...]]:
    if p.max_new_tokens is not None:
        if not 1 <= p.max_new_tokens <= limits.max_new_tokens:
            raise RequestError(
                f"stopping.max_new_tokens must be in [1, {limits.max_new_tokens}], got {p.max_new_tokens}",
                field="stopping.max_new_tokens",
            )
        max_new = p.max_new_tokens
    else:
        max_new = min(int(defaults.max_new_tokens or limits.max_new_tokens), limits.max_new_tokens)
    if p.min_new_tokens > max_new:
        raise RequestError(
            f"stopping.min_new_tokens ({p.min_new_tokens}) exceeds max_new_tokens ({max_new})",
            field="stopping.min_new_tokens",
        )
    if len(p.stop) > limits.max_stop_strings:
        raise RequestError(
            f"at most {limits.max_stop_strings} stop strings, got {len(p.stop)}", field="stopping.stop"
        )
    for s in p.stop:
        if not s or len(s.encode()) > limits.max_stop_string_bytes:
            raise RequestError(
                f"each stop string must be 1..{limits.max_stop_string_bytes} bytes", field="stopping.stop"
            )
    if len(p.stop_token_ids) > limits.max_stop_token_ids:
        raise RequestError(
            f"at most {limits.max_stop_token_ids} stop_token_ids, got {len(p.stop_token_ids)}",
            field="stopping.stop_token_ids",
        )
    if p.time_limit_ms is not None and p.time_limit_ms <= 0:
        raise RequestError("stopping.time_limit_ms must be > 0 when set", field="stopping.time_limit_ms")
    try:
        crit = StoppingCriteria(
            max_new_tokens=max_new,
            stop_token_ids=tuple(p.stop_token_ids),
            ignore_eos=p.ignore_eos,
            min_new_tokens=p.min_new_tokens,
        )
    except ValueError as e:  # negative values, which the proto's unsigned fields cannot carry
        raise RequestError(str(e)) from None
    return crit, tuple(p.stop)
