"""The OpenAI request bodies this server takes, as pydantic models: one per request type.

They check types only. Ranges, limits and everything the gRPC front also refuses are checked once,
after ``mapping`` has turned a body into ``requests.GenerateParams`` (``requests.parse_request``):
a bound written here would be a second, drifting copy of a rule, with other words.

Every field may be ``null`` (clients send that for "unset"). Names no model here declares are
ignored, as OpenAI-compatible servers do, so a client's newer optional fields don't break it;
fields this server knows but cannot honour (``n`` > 1, tools, ``logit_bias`` …) are declared so that
``mapping`` refuses them with a clear 400 instead of ignoring them silently.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Model):
    include_usage: bool | None = None


class TextPart(_Model):
    """A content part; only ``text`` parts can be served (a text-only model)."""

    type: str
    text: str | None = None


class ChatMessage(_Model):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class _Generation(_Model):
    """What both endpoints share: sampling, stopping, streaming, and the documented extensions."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM's names; the openai SDK sends them with ``extra_body``)
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None


class ChatCompletionRequest(_Generation):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_tokens: int | None = None  # deprecated by OpenAI for max_completion_tokens; both accepted
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # known, not served: refused when set (mapping.unsupported)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Generation):
    """``POST /v1/completions``: one prompt, as text or token ids (a list of one is accepted)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = None
    logprobs: int | None = None  # top alternatives per token (0 = the chosen token's logprob only)
    # known, not served: refused when set (mapping.unsupported)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


Endpoint = Literal["chat", "completions"]
