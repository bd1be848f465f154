"""A GenerateRequest (proto) → the engine's ``Request``: protocol validation, defaults, chat.

Pure functions of the message, the tokenizer, the request limits and the model's generation
defaults — unit-tested without a server. What depends on the model (prompt length, vocabulary
range, top_logprobs cap) is checked once, by the engine
(``exec_service.engine.limits``); what only the protocol has (field ranges, stop strings, request ids,
chat messages) is checked here. Errors are ``RequestError`` (INVALID_ARGUMENT) naming the field and
its limit.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

import grpc

from exec_service.engine import Request, SamplingParams, StoppingCriteria
from protos import exec_pb2
from shared.rpc_errors import RpcError

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # requests carry prompts, not tensors: larger ones are refused
CHAT_ROLES = ("system", "user", "assistant", "tool")


class RequestError(RpcError):
    """A request field is invalid (INVALID_ARGUMENT unless another code is given)."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(code, message)


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


def to_engine_request(
    msg: exec_pb2.GenerateRequest,
    tokenizer: Any,
    limits: Limits,
    defaults: GenerationDefaults,
    metadata_request_id: str = "",
) -> ParsedRequest:
    """Raises RequestError for an invalid field."""
    rid = request_id(msg.request_id or metadata_request_id, limits)
    prompt = prompt_ids(msg, tokenizer, limits)
    sampling = sampling_params(msg, defaults)
    stopping, stops = stopping_criteria(msg.stopping, defaults, limits)
    try:
        req = Request(tuple(prompt), sampling, stopping, request_id=f"{rid}#{uuid.uuid4().hex[:8]}")
    except ValueError as e:
        raise RequestError(str(e)) from None
    out, st = msg.output, msg.stopping
    return ParsedRequest(
        request_id=rid,
        engine_request=req,
        stop_strings=stops,
        include_stop_in_output=st.include_stop_in_output,
        skip_special_tokens=out.skip_special_tokens if out.HasField("skip_special_tokens") else True,
        time_limit_s=st.time_limit_ms / 1000 if st.HasField("time_limit_ms") else None,
    )


def request_id(rid: str, limits: Limits) -> str:
    if not rid:
        return uuid.uuid4().hex
    if len(rid.encode()) > limits.max_request_id_bytes:
        raise RequestError(f"request_id is longer than {limits.max_request_id_bytes} bytes")
    if not rid.isprintable():
        raise RequestError("request_id must be printable text")
    return rid


def render_chat(msgs: exec_pb2.ChatMessages, tokenizer: Any, limits: Limits) -> str:
    """The model's chat template applied to the messages, with the generation prompt."""
    if not msgs.messages:
        raise RequestError("messages is empty")
    if len(msgs.messages) > limits.max_chat_messages:
        raise RequestError(f"more than {limits.max_chat_messages} chat messages")
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model has no chat template; send `prompt` or `prompt_token_ids`")
    conv = []
    for m in msgs.messages:
        if m.role not in CHAT_ROLES:
            raise RequestError(f"chat message role must be system, user, assistant or tool, got {m.role!r}")
        conv.append({"role": m.role, "content": m.content})
    try:
        return tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja errors in the model's template (e.g. role order rules)
        raise RequestError(f"the model's chat template rejected the messages: {e}") from None


def prompt_ids(msg: exec_pb2.GenerateRequest, tokenizer: Any, limits: Limits) -> list[int]:
    which = msg.WhichOneof("input")
    if which == "prompt_token_ids":
        ids = list(msg.prompt_token_ids.ids)
    elif which == "prompt":
        ids = tokenizer(msg.prompt, add_special_tokens=True)["input_ids"]
    elif which == "messages":
        text = render_chat(msg.messages, tokenizer, limits)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        raise RequestError("one of prompt, prompt_token_ids or messages is required")
    if not ids:
        raise RequestError("the prompt is empty")
    return ids


def tokenize_request(msg: exec_pb2.TokenizeRequest, tokenizer: Any, limits: Limits) -> list[int]:
    which = msg.WhichOneof("input")
    if which == "messages":
        text = render_chat(msg.messages, tokenizer, limits)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if which == "text":
        return tokenizer(msg.text, add_special_tokens=msg.add_special_tokens)["input_ids"]
    raise RequestError("one of text or messages is required")


def _in_range(name: str, v: float, lo: float, hi: float) -> float:
    if not math.isfinite(v) or not lo <= v <= hi:
        raise RequestError(f"sampling.{name} must be a finite number in [{lo}, {hi}], got {v}")
    return v


def sampling_params(msg: exec_pb2.GenerateRequest, defaults: GenerationDefaults) -> SamplingParams:
    s, out = msg.sampling, msg.output

    def field(name: str, lo: float, hi: float, default: float) -> float:
        return _in_range(name, getattr(s, name), lo, hi) if s.HasField(name) else default

    top_p = field("top_p", 0, 1, defaults.top_p)
    if top_p == 0:
        raise RequestError("sampling.top_p must be in (0, 1]")
    if out.top_logprobs and not out.logprobs:
        raise RequestError("output.top_logprobs needs output.logprobs")
    seed = s.seed if s.HasField("seed") else None
    if seed is not None and seed >= 2**63:
        raise RequestError("sampling.seed must be below 2**63")
    try:
        return SamplingParams(
            temperature=field("temperature", 0, 100, defaults.temperature),
            top_k=s.top_k if s.HasField("top_k") else defaults.top_k,
            top_p=top_p,
            min_p=field("min_p", 0, 1, defaults.min_p),
            repetition_penalty=field("repetition_penalty", 1e-3, 100, defaults.repetition_penalty),
            presence_penalty=field("presence_penalty", -2, 2, 0.0),
            frequency_penalty=field("frequency_penalty", -2, 2, 0.0),
            seed=seed,
            logprobs=out.logprobs,
            top_logprobs=out.top_logprobs,
        )
    except ValueError as e:
        raise RequestError(str(e)) from None


def stopping_criteria(
    st: exec_pb2.StoppingCriteria, defaults: GenerationDefaults, limits: Limits
) -> tuple[StoppingCriteria, tuple[str, ...]]:
    if st.HasField("max_new_tokens"):
        if not 1 <= st.max_new_tokens <= limits.max_new_tokens:
            raise RequestError(
                f"stopping.max_new_tokens must be in [1, {limits.max_new_tokens}], got {st.max_new_tokens}"
            )
        max_new = st.max_new_tokens
    else:
        max_new = min(int(defaults.max_new_tokens or limits.max_new_tokens), limits.max_new_tokens)
    if st.min_new_tokens > max_new:
        raise RequestError(
            f"stopping.min_new_tokens ({st.min_new_tokens}) exceeds max_new_tokens ({max_new})"
        )
    if len(st.stop) > limits.max_stop_strings:
        raise RequestError(f"at most {limits.max_stop_strings} stop strings, got {len(st.stop)}")
    for s in st.stop:
        if not s or len(s.encode()) > limits.max_stop_string_bytes:
            raise RequestError(f"each stop string must be 1..{limits.max_stop_string_bytes} bytes")
    if len(st.stop_token_ids) > limits.max_stop_token_ids:
        raise RequestError(
            f"at most {limits.max_stop_token_ids} stop_token_ids, got {len(st.stop_token_ids)}"
        )
    if st.HasField("time_limit_ms") and st.time_limit_ms == 0:
        raise RequestError("stopping.time_limit_ms must be > 0 when set")
    crit = StoppingCriteria(
        max_new_tokens=max_new,
        stop_token_ids=tuple(st.stop_token_ids),
        ignore_eos=st.ignore_eos,
        min_new_tokens=st.min_new_tokens,
    )
    return crit, tuple(st.stop)
