"""The OpenAI-compatible HTTP front (``exec-server --http-port``) on a real exec server on 127.0.0.1.

The references are independent of our HTTP code: the official ``openai`` client parses every answer
(its models and its exception classes), the gRPC ``Generate`` of the same server gives the text,
tokens and error messages the HTTP front must equal (and transformers the tokens), plain ``httpx``
reads the SSE bytes, and the engine itself tells whether a disconnect reached it. One server for
the module (auth on); a second one walks the lifecycle with TLS/mTLS (loading → serving → drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
import time

import grpc
import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exec_service.http.mapping import generate_params, openai_param
from exec_service.http.schema import ChatCompletionRequest, CompletionRequest
from exec_service.requests import GenerateParams, RequestError
from exec_service.server import ExecServer, ServeConfig
from protos import exec_pb2
from shared.grpc_util import ServerSecurity
from shared.security import TLSConfig
from tests.test_exec_server import VOCAB, Served, _generate, _tokenizer_dir, _tokens, hf_greedy
from tests.test_exec_server import tiny as tiny  # the module fixture: the tiny served model
from tests.test_security import pki as pki  # the module fixture: a test-made CA

TOKEN = "http-test-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
HEADERS = {"authorization": f"Bearer {TOKEN}"}
SLOTS, WAITING = 4, 2  # the module server: 4 KV slots, 2 waiting → the 7th open stream gets 429


@pytest.fixture(scope="module")
def served(tiny):
    _, uri = tiny
    s = Served(
        ServeConfig(
            manifest_uri=uri,
            max_batch_size=SLOTS,
            max_seq_len=512,
            context_buckets=(16, 64),
            max_waiting_requests=WAITING,
            http_port=0,
            security=ServerSecurity(tokens=(TOKEN.encode(),)),
        )
    )
    s.base = f"http://127.0.0.1:{s.server.http_port}"
    s.model = s.server.gateway.serving.model_name
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base}/v1", api_key=TOKEN, max_retries=0, timeout=120)


def _run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def grpc_generate(served, **fields) -> list[exec_pb2.GenerateResponse]:
    return _run(_generate(served.target, exec_pb2.GenerateRequest(**fields), metadata=AUTH))


def chat_msgs(*pairs: tuple[str, str]) -> exec_pb2.ChatMessages:
    return exec_pb2.ChatMessages(messages=[exec_pb2.ChatMessage(role=r, content=c) for r, c in pairs])


def sample(served, name: str, **labels: str) -> float:
    return served.server.metrics.registry.get_sample_value(name, labels) or 0.0


def sse_events(resp: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking the framing: every event is one ``data:``
    line followed by a blank line."""
    body = resp.read().decode()
    assert body.endswith("\n\n"), body[-50:]
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: ") :] for e in events]


# -- the mapping alone ------------------------------------------------------------------------------


def test_bodies_map_to_the_one_internal_request() -> None:
    chat = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "max_tokens": 5,
            "max_completion_tokens": 7,  # the newer name wins
            "stop": "x",
            "logprobs": True,
            "top_logprobs": 2,
            "min_tokens": 1,
            "ignore_eos": True,
            "top_k": 4,
            "temperature": None,  # null = unset
            "store": False,  # a field this server does not know: ignored
        }
    )
    assert generate_params(chat, "rid") == GenerateParams(
        request_id="rid",
        messages=[("system", "be brief"), ("user", "ab")],
        max_new_tokens=7,
        stop=("x",),
        logprobs=True,
        top_logprobs=2,
        min_new_tokens=1,
        ignore_eos=True,
        top_k=4,
    )
    assert openai_param("stopping.max_new_tokens", chat) == "max_completion_tokens"
    assert openai_param("sampling.top_p", chat) == "top_p" and openai_param("request_id", chat) is None

    p = generate_params(CompletionRequest.model_validate({"model": "m", "prompt": ["one prompt"]}))
    assert p.prompt == "one prompt" and p.max_new_tokens == 16 and not p.logprobs  # OpenAI's default
    body = CompletionRequest.model_validate(
        {"model": "m", "prompt": [[1, 2]], "logprobs": 0, "stop": ["a", "b"]}
    )
    p = generate_params(body)
    assert p.prompt_token_ids == [1, 2] and p.logprobs and p.top_logprobs == 0 and p.stop == ("a", "b")
    assert openai_param("output.top_logprobs", body) == "logprobs"
    assert openai_param("stopping.max_new_tokens", body) == "max_tokens"

    for body, message in [
        ({"prompt": ["a", "b"]}, "one prompt per request is served, got 2"),
        ({"prompt": "a", "echo": True}, "echo is not supported"),
        ({"prompt": "a", "best_of": 3}, "best_of must be 1"),
        ({"prompt": "a", "n": 2}, "n must be 1"),
        ({"prompt": "a", "logit_bias": {"5": 1.0}}, "logit_bias is not supported"),
    ]:
        with pytest.raises(RequestError, match=message):
            generate_params(CompletionRequest.model_validate({"model": "m", **body}))
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    with pytest.raises(RequestError, match="only text content parts"):
        generate_params(ChatCompletionRequest.model_validate({"model": "m", "messages": [image]}))
    with pytest.raises(RequestError, match="response_format 'json_object' is not supported"):
        generate_params(
            ChatCompletionRequest.model_validate(
                {"model": "m", "messages": [], "response_format": {"type": "json_object"}}
            )
        )


# -- the served model, auth, health --------------------------------------------------------------------


def test_models_auth_and_health(served, client) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [served.model]
    assert client.models.retrieve(served.model).id == served.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")

    bad = openai.OpenAI(base_url=f"{served.base}/v1", api_key="wrong-token-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(f"{served.base}/v1/completions", json={"model": served.model, "prompt": "x"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["message"] == "missing or invalid bearer token"

    assert httpx.get(f"{served.base}/health").json() == {"status": "ok"}  # no token needed
    r = httpx.get(f"{served.base}/v1/nothing-here", headers=HEADERS)
    assert r.status_code == 404 and "error" in r.json()


# -- the same text as gRPC Generate ----------------------------------------------------------------------


def test_chat_equals_grpc_generate(served, client) -> None:
    conv = [("system", "You are terse."), ("user", "What is 2+2?")]
    ref = grpc_generate(served, messages=chat_msgs(*conv))  # generation_config: greedy, 40 tokens
    ref_text = "".join(m.text for m in ref)
    assert ref[-1].usage.completion_tokens == 40

    # no max_tokens, no temperature: the model's generation_config, as on gRPC; "developer" = system
    messages = [{"role": "developer", "content": conv[0][1]}, {"role": "user", "content": conv[1][1]}]
    r = client.chat.completions.create(model=served.model, messages=messages)
    assert r.object == "chat.completion" and r.model == served.model
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref_text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
        ref[-1].usage.prompt_tokens,
        ref[-1].usage.completion_tokens,
    )
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=served.model,
            messages=messages,
            max_completion_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    ref12 = grpc_generate(
        served, messages=chat_msgs(*conv), stopping=exec_pb2.StoppingCriteria(max_new_tokens=12)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(
        m.text for m in ref12
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_equal_grpc_and_transformers(served, client, tiny) -> None:
    model, _ = tiny
    ids = [5, 9, 200, 3000, 17]
    r = client.completions.create(
        model=served.model, prompt=ids, max_tokens=20, extra_body={"ignore_eos": True}
    )
    ref = hf_greedy(model, ids, 20)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_tokenizer_dir())
    assert r.choices[0].text == tok.decode(ref, skip_special_tokens=True)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 20
    assert r.usage.prompt_tokens == len(ids)

    # a text prompt, streamed, and the default max_tokens (16, OpenAI's for this endpoint)
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(model=served.model, prompt="Hello there", stream=True)
    )
    ref = grpc_generate(served, prompt="Hello there", stopping=exec_pb2.StoppingCriteria(max_new_tokens=16))
    assert text == "".join(m.text for m in ref)


def test_stop_strings_min_tokens_and_ignore_eos(served, client) -> None:
    base = grpc_generate(
        served,
        prompt_token_ids=exec_pb2.TokenIds(ids=[7, 8, 9]),
        stopping=exec_pb2.StoppingCriteria(max_new_tokens=30, ignore_eos=True),
    )
    text = "".join(m.text for m in base)
    stop = text[5:9]
    for streamed in (False, True):
        r = client.completions.create(
            model=served.model,
            prompt=[7, 8, 9],
            max_tokens=30,
            stop=["never-in-the-output", stop],
            stream=streamed,
            extra_body={"ignore_eos": True},
        )
        got = "".join(c.choices[0].text for c in r) if streamed else r.choices[0].text
        assert got == text[: text.index(stop)], streamed
    r = client.completions.create(model=served.model, prompt=[7, 8, 9], max_tokens=30, stop=stop)
    assert r.choices[0].finish_reason == "stop"

    # min_tokens + stop_token_ids: the same tokens as gRPC's min_new_tokens
    first = _tokens(base)[0]
    ref = grpc_generate(
        served,
        prompt_token_ids=exec_pb2.TokenIds(ids=[7, 8, 9]),
        stopping=exec_pb2.StoppingCriteria(max_new_tokens=20, min_new_tokens=5, stop_token_ids=[first]),
    )
    r = client.completions.create(
        model=served.model,
        prompt=[7, 8, 9],
        max_tokens=20,
        extra_body={"min_tokens": 5, "stop_token_ids": [first]},
    )
    assert r.choices[0].text == "".join(m.text for m in ref)
    assert r.usage.completion_tokens == ref[-1].usage.completion_tokens >= 5


def test_logprobs_equal_grpc(served, client) -> None:
    tok_text = served.server.gateway.serving.tokenizer
    ref = grpc_generate(
        served,
        messages=chat_msgs(("user", "Name a colour.")),
        stopping=exec_pb2.StoppingCriteria(max_new_tokens=4),
        output=exec_pb2.OutputOptions(logprobs=True, top_logprobs=3),
    )
    lps = [lp for m in ref for lp in m.logprobs]
    r = client.chat.completions.create(
        model=served.model,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == len(lps) == 4
    for got, want in zip(content, lps, strict=True):
        assert got.token == tok_text.decode([want.token_id]) and got.bytes == list(got.token.encode())
        assert got.logprob == pytest.approx(want.logprob, abs=1e-6)
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([t.logprob for t in want.top], abs=1e-6)
    assert "".join(c.token for c in content) == r.choices[0].message.content

    r = client.completions.create(model=served.model, prompt=[4, 5, 6], max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(
        len(t) <= 2 and max(t.values()) == pytest.approx(v)
        for t, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(3)]


# -- SSE framing, errors ------------------------------------------------------------------------------


def test_sse_framing(served) -> None:
    body = {
        "model": served.model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{served.base}/v1/chat/completions", json=body, headers=HEADERS) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        rid = r.headers["x-request-id"]
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {f"chatcmpl-{rid}"}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"

    # completions without include_usage: no usage key at all; X-Request-Id is the client's
    body = {"model": served.model, "prompt": "abc", "max_tokens": 3, "stream": True}
    headers = {**HEADERS, "x-request-id": "my-id-1"}
    with httpx.stream("POST", f"{served.base}/v1/completions", json=body, headers=headers) as r:
        assert r.headers["x-request-id"] == "my-id-1"
        events = sse_events(r)
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and all("usage" not in c for c in chunks)
    assert {c["id"] for c in chunks} == {"cmpl-my-id-1"} and chunks[-1]["choices"][0][
        "finish_reason"
    ] == "length"


# each: the gRPC request, the OpenAI completions body (beyond model), the OpenAI param the error names
INVALID = [
    ({"sampling": {"temperature": 500.0}}, {"temperature": 500.0}, "temperature"),
    ({"sampling": {"top_p": 1.5}}, {"top_p": 1.5}, "top_p"),
    ({"sampling": {"presence_penalty": 2.5}}, {"presence_penalty": 2.5}, "presence_penalty"),
    ({"sampling": {"seed": 2**63}}, {"seed": 2**63}, "seed"),
    ({"stopping": {"max_new_tokens": 100000}}, {"max_tokens": 100000}, "max_tokens"),
    (
        {"stopping": {"max_new_tokens": 4, "min_new_tokens": 5}},
        {"max_tokens": 4, "min_tokens": 5},
        "min_tokens",
    ),
    ({"stopping": {"stop": ["x"] * 17}}, {"stop": ["x"] * 17}, "stop"),
    ({"stopping": {"stop_token_ids": [VOCAB + 1]}}, {"stop_token_ids": [VOCAB + 1]}, None),
    ({"output": {"logprobs": True, "top_logprobs": 50}}, {"logprobs": 50}, None),
    ({"prompt_token_ids": {"ids": [0] * 600}}, {"prompt": [0] * 600}, None),  # the engine's limit
    ({"prompt_token_ids": {"ids": [VOCAB + 5]}}, {"prompt": [VOCAB + 5]}, None),
]


@pytest.mark.parametrize(("grpc_fields", "body", "param"), INVALID)
def test_invalid_requests_are_refused_with_the_grpc_words(served, client, grpc_fields, body, param) -> None:
    from google.protobuf import json_format

    req = json_format.ParseDict(
        {"prompt_token_ids": {"ids": [1, 2, 3]}, **grpc_fields}, exec_pb2.GenerateRequest()
    )
    with pytest.raises(grpc.aio.AioRpcError) as g:
        _run(_generate(served.target, req, metadata=AUTH))
    assert g.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=served.model, prompt=body.pop("prompt", [1, 2, 3]), extra_body=body)
    assert e.value.status_code == 400
    assert e.value.body["message"] == g.value.details()
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["code"] == "invalid_argument"
    if param is not None:
        assert e.value.body["param"] == param


def test_what_only_http_refuses(served, client) -> None:
    def refused(**kw) -> dict:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=served.model, **kw)
        return e.value.body

    hi = [{"role": "user", "content": "hi"}]
    assert refused(messages=hi, n=2)["message"].startswith("n must be 1")
    assert refused(messages=hi, tools=[{"type": "function", "function": {"name": "f"}}])["param"] == "tools"
    assert refused(messages=hi, temperature="hot")["param"] == "temperature"  # a type error (pydantic)
    assert refused(messages=[{"role": "robot", "content": "hi"}])["message"] == (
        "chat message role must be system, user, assistant or tool, got 'robot'"
    )
    assert refused(messages=hi, top_logprobs=2)["message"] == "output.top_logprobs needs output.logprobs"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=hi)
    assert e.value.body["param"] is None and "'gpt-4o' is not served here" in e.value.body["message"]

    r = httpx.post(f"{served.base}/v1/chat/completions", content=b"{not json", headers=HEADERS)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    big = b'{"model": "x", "prompt": "' + b"a" * (4 * 1024 * 1024) + b'"}'
    r = httpx.post(f"{served.base}/v1/completions", content=big, headers=HEADERS)
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]["message"]


# Hostile bodies: any JSON value in any known field (and unknown ones). Every answer is a documented
# status with an OpenAI error object (or a completion), never a 500; the server serves on afterwards.
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_INT = st.integers(min_value=-(2**70), max_value=2**70)
_NUM = st.floats() | _INT
_TEXT = st.text(max_size=300)
# each known field gets values of its JSON type but out of every range (so that most bodies pass the
# type check and reach the shared validation and the engine's check), or now and then any JSON
_TYPED = {
    "prompt": _TEXT
    | st.lists(st.integers(min_value=-5, max_value=2**40), max_size=6)
    | st.lists(_TEXT, max_size=3),
    "max_tokens": _INT,
    "temperature": _NUM,
    "top_p": _NUM,
    "seed": _INT,
    "stop": _TEXT | st.lists(_TEXT, max_size=20),
    "presence_penalty": _NUM,
    "frequency_penalty": _NUM,
    "n": _INT,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logit_bias": st.dictionaries(st.text(max_size=5), st.floats(), max_size=2),
    "logprobs": _INT,
    "echo": st.booleans(),
    "suffix": st.text(max_size=5),
    "best_of": _INT,
    "min_tokens": _INT,
    "ignore_eos": st.booleans(),
    "top_k": _INT,
    "min_p": _NUM,
    "repetition_penalty": _NUM,
    "stop_token_ids": st.lists(_INT, max_size=5),
    "unknown": _JSON,
}
_BODIES = st.lists(st.sampled_from(sorted(_TYPED)), unique=True, max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: _TYPED[k] | _TYPED[k] | _TYPED[k] | _JSON for k in keys})
)


@settings(
    derandomize=True,  # the same bodies on every CI run
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(fields=_BODIES)
def test_hostile_bodies_get_documented_answers(served, fields) -> None:
    body = {"model": served.model, "prompt": [1, 2, 3], "max_tokens": 2, **fields}
    if isinstance(body["max_tokens"], int) and 4 < body["max_tokens"] < 10**6:
        body["max_tokens"] = 4  # a valid length: kept short (the test is about the answers)
    r = httpx.post(
        f"{served.base}/v1/completions",
        content=json.dumps(body).encode(),  # NaN / Infinity as Python writes them, too
        headers={**HEADERS, "content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code in (200, 400, 404), (r.status_code, r.text, body)
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        assert sse_events(r)[-1] == "[DONE]"
    elif r.status_code == 200:
        assert r.json()["object"] == "text_completion"
    else:
        err = r.json()["error"]
        assert err["message"] and err["type"] in ("invalid_request_error", "not_found_error")


# -- disconnect, queue, metrics -----------------------------------------------------------------------


@contextlib.contextmanager
def aborts_seen(served, step_s: float = 0.005):
    """Records the engine's ``abort`` calls (on the engine thread) and whether each stopped a live
    request (True) or came after it had finished (False). Each engine step takes at least
    ``step_s`` meanwhile, so that a 500-token request outlives what the test does to it on any
    machine (the tiny model's steps take well under a millisecond on a fast one)."""
    engine = served.server.loop.engine
    seen: list[tuple[str, bool]] = []
    real_abort, real_step = engine.abort, engine.step

    def abort(rid: str) -> bool:
        ok = real_abort(rid)
        seen.append((rid, ok))
        return ok

    def step():
        time.sleep(step_s)
        return real_step()

    engine.abort, engine.step = abort, step
    try:
        yield seen
    finally:
        engine.abort, engine.step = real_abort, real_step


def wait_idle(served, aborts: list, n_aborts: int, timeout: float = 60.0) -> None:
    """Until the engine has taken ``n_aborts`` aborts (the engine thread takes commands between
    steps: on a busy machine it may not have seen the requests yet when the client gives up) and
    every slot is free again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = served.server.loop.counts
        idle = c.running == 0 and c.waiting == 0 and c.free_slots == SLOTS
        if len(aborts) >= n_aborts and idle and served.server.gateway.active == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"slots not freed: {served.server.loop.counts}, aborts {aborts}")


def test_client_disconnect_cancels_the_request(served) -> None:
    cancelled = sample(served, "neuron_serve_requests_finished_total", reason="cancelled", protocol="http")
    body = {"model": served.model, "prompt": [1, 2, 3], "max_tokens": 500, "ignore_eos": True}
    with aborts_seen(served) as aborts:
        with httpx.stream(
            "POST", f"{served.base}/v1/completions", json={**body, "stream": True}, headers=HEADERS
        ) as r:
            rid = r.headers["x-request-id"]
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # a first chunk: then the client goes away
        # non-streaming: the client gives up (timeout) while the answer is being generated
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{served.base}/v1/completions",
                json=body,
                headers={**HEADERS, "x-request-id": "given-up"},
                timeout=httpx.Timeout(30, read=0.3),
            )
        wait_idle(served, aborts, 2)
    # the abort reached the engine while each request was still running there (it freed the slot)
    assert [(a.split("#")[0], ok) for a, ok in aborts] == [(rid, True), ("given-up", True)]
    got = sample(served, "neuron_serve_requests_finished_total", reason="cancelled", protocol="http")
    assert got == cancelled + 2


def test_queue_full_is_429_and_streams_free_their_slots(served, client) -> None:
    body = {"model": served.model, "prompt": [1, 2, 3], "max_tokens": 500, "ignore_eos": True, "stream": True}
    with aborts_seen(served) as aborts:
        with contextlib.ExitStack() as stack, httpx.Client(headers=HEADERS, timeout=60) as http:
            for _ in range(SLOTS + WAITING):  # each admitted once its status line is back
                r = stack.enter_context(http.stream("POST", f"{served.base}/v1/completions", json=body))
                assert r.status_code == 200
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model=served.model, prompt="x", max_tokens=1)
            assert "the waiting queue is full" in e.value.body["message"]
        wait_idle(served, aborts, SLOTS + WAITING)
    assert [ok for _, ok in aborts] == [True] * (SLOTS + WAITING)  # every one cancelled, none finished
    assert (
        sample(served, "neuron_serve_requests_rejected_total", code="RESOURCE_EXHAUSTED", protocol="http")
        >= 1
    )


def test_metrics_carry_the_protocol(served, client) -> None:
    before = {p: sample(served, "neuron_serve_ttft_seconds_count", protocol=p) for p in ("grpc", "http")}
    client.completions.create(model=served.model, prompt=[1, 2], max_tokens=2)
    grpc_generate(served, prompt_token_ids=exec_pb2.TokenIds(ids=[1, 2]))
    for p in ("grpc", "http"):
        assert sample(served, "neuron_serve_ttft_seconds_count", protocol=p) == before[p] + 1
    assert (
        sample(served, "neuron_serve_requests_rejected_total", code="INVALID_ARGUMENT", protocol="http") > 0
    )
    assert sample(served, "neuron_serve_generated_tokens_total", protocol="http") > 0


# -- lifecycle over TLS + mTLS: loading (503) → serving → draining (503, in-flight stream finishes) ------


class GatedServer(ExecServer):
    """An exec server whose model load waits for ``release`` (the loading window, deterministic)."""

    def __init__(self, cfg: ServeConfig) -> None:
        super().__init__(cfg)
        self.release = threading.Event()

    def _load(self):
        assert self.release.wait(120)
        return super()._load()


def test_lifecycle_over_mtls(tiny, pki) -> None:
    _, uri = tiny
    tls = TLSConfig(pki["server_cert"], pki["server_key"], pki["ca"])
    cfg = ServeConfig(
        manifest_uri=uri,
        max_batch_size=2,
        max_seq_len=128,
        context_buckets=(16,),
        http_port=0,
        grace_s=60,
        security=ServerSecurity(tls=tls),
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = GatedServer(cfg)
    started = asyncio.run_coroutine_threadsafe(server.start(), loop)
    try:
        deadline = time.monotonic() + 60
        while server.http_port is None and time.monotonic() < deadline:
            time.sleep(0.01)
        base = f"https://127.0.0.1:{server.http_port}"
        mtls_ctx = ssl.create_default_context(cafile=pki["ca"])
        mtls_ctx.load_cert_chain(pki["client_cert"], pki["client_key"])
        mtls = httpx.Client(verify=mtls_ctx, timeout=60)
        with pytest.raises(httpx.HTTPError):  # no client certificate: the TLS handshake refuses it
            httpx.get(f"{base}/health", verify=ssl.create_default_context(cafile=pki["ca"]), timeout=10)
        r = mtls.get(f"{base}/health")
        assert r.status_code == 503 and r.json()["error"]["message"] == "the model is still loading"
        r = mtls.post(f"{base}/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"

        server.release.set()
        started.result(120)
        model = server.gateway.serving.model_name
        assert mtls.get(f"{base}/health").status_code == 200
        body = {"model": model, "prompt": [1, 2, 3], "max_tokens": 60, "ignore_eos": True, "stream": True}
        with mtls.stream("POST", f"{base}/v1/completions", json=body) as r:
            drain = asyncio.run_coroutine_threadsafe(server.drain(), loop)
            deadline = time.monotonic() + 30
            while not server.gateway.draining and time.monotonic() < deadline:
                time.sleep(0.01)
            refused = httpx.post(f"{base}/v1/completions", json={**body, "stream": False}, verify=mtls_ctx)
            assert (
                refused.status_code == 503 and refused.json()["error"]["message"] == "the server is draining"
            )
            events = sse_events(r)  # the in-flight stream is given the grace period: it ends whole
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        drain.result(60)
        mtls.close()
    finally:
        server.release.set()
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
