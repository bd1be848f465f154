"""exec_service.requests and exec_service.engine.limits without a server: a GenerateRequest becomes
the engine's Request with the documented defaults, and every out-of-range field is refused with a
message naming the field and its limit (DESIGN §6)."""

from __future__ import annotations

import math

import grpc
import pytest

from exec_service.engine import Request, SamplingParams, StoppingCriteria
from exec_service.engine.limits import EngineLimits, check_request
from exec_service.requests import (
    GenerateParams,
    GenerationDefaults,
    Limits,
    RequestError,
    parse_request,
    to_engine_request,
    tokenize_request,
)
from protos import exec_pb2

LIMITS = Limits(max_prompt_tokens=255, max_new_tokens=255, max_top_logprobs=20)
GREEDY = GenerationDefaults()


class WordTokenizer:
    """A stand-in tokenizer: one id per whitespace-separated word (its length), a chat template that
    joins role: content lines."""

    chat_template = "{role}: {content}"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [len(w) for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def apply_chat_template(self, conv, tokenize: bool, add_generation_prompt: bool) -> str:
        assert not tokenize and add_generation_prompt
        if conv[0]["role"] == "assistant":
            raise ValueError("conversations start with a user or system message")
        return " ".join(f"{m['role']}: {m['content']}" for m in conv) + " assistant:"


TOK = WordTokenizer()


def ids_request(ids=(5, 6, 7), **fields) -> exec_pb2.GenerateRequest:
    req = exec_pb2.GenerateRequest(prompt_token_ids=exec_pb2.TokenIds(ids=list(ids)))
    for path, value in fields.items():
        msg_name, _, name = path.partition("__")
        target = getattr(req, msg_name) if name else req
        if isinstance(value, list):
            getattr(target, name or msg_name).extend(value)
        else:
            setattr(target, name or msg_name, value)
    return req


def refused(req: exec_pb2.GenerateRequest, defaults: GenerationDefaults = GREEDY) -> str:
    with pytest.raises(RequestError) as e:
        to_engine_request(req, TOK, LIMITS, defaults)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return e.value.message


def test_defaults_are_greedy_without_do_sample_and_cap_max_new_tokens() -> None:
    parsed = to_engine_request(ids_request(), TOK, LIMITS, GenerationDefaults.from_generation_config({}))
    req = parsed.engine_request
    assert req.prompt_token_ids == (5, 6, 7)
    assert req.sampling == SamplingParams()  # greedy, neutral
    assert req.stopping == StoppingCriteria(max_new_tokens=255)  # the limit when the model sets none
    gen = {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 0.9, "max_new_tokens": 1000}
    d = GenerationDefaults.from_generation_config(gen)
    req = to_engine_request(ids_request(), TOK, LIMITS, d).engine_request
    assert (req.sampling.temperature, req.sampling.top_k, req.sampling.top_p) == (pytest.approx(0.7), 50, 0.9)
    assert req.stopping.max_new_tokens == 255  # the model's 1000 is capped at the limit
    gen_greedy = {"temperature": 0.7, "top_k": 50, "repetition_penalty": 1.2, "max_new_tokens": 40}
    d = GenerationDefaults.from_generation_config(gen_greedy)
    req = to_engine_request(ids_request(), TOK, LIMITS, d).engine_request
    assert (req.sampling.temperature, req.sampling.top_k) == (0.0, 0)  # no do_sample: greedy
    assert req.sampling.repetition_penalty == pytest.approx(1.2) and req.stopping.max_new_tokens == 40


def test_explicit_fields_override_the_defaults() -> None:
    req = ids_request(
        sampling__temperature=0.5,
        sampling__seed=7,
        stopping__max_new_tokens=9,
        stopping__min_new_tokens=2,
        stopping__stop_token_ids=[11, 12],
        stopping__ignore_eos=True,
        output__logprobs=True,
        output__top_logprobs=3,
    )
    parsed = to_engine_request(req, TOK, LIMITS, GREEDY)
    r = parsed.engine_request
    assert (r.sampling.temperature, r.sampling.seed, r.sampling.top_logprobs) == (0.5, 7, 3)
    assert r.stopping == StoppingCriteria(9, (11, 12), True, 2)
    assert parsed.skip_special_tokens and parsed.time_limit_s is None


def test_prompt_text_and_chat_are_tokenized() -> None:
    p = to_engine_request(exec_pb2.GenerateRequest(prompt="a bb ccc"), TOK, LIMITS, GREEDY)
    assert p.prompt_ids == (1, 1, 2, 3)  # add_special_tokens for a plain prompt
    chat = exec_pb2.GenerateRequest(
        messages=exec_pb2.ChatMessages(messages=[exec_pb2.ChatMessage(role="user", content="hi there")])
    )
    p = to_engine_request(chat, TOK, LIMITS, GREEDY)
    assert p.prompt_ids == (5, 2, 5, 10)  # "user: hi there assistant:", no special tokens
    tok = exec_pb2.TokenizeRequest(text="a bb", add_special_tokens=False)
    assert tokenize_request(tok, TOK, LIMITS) == [1, 2]


def test_request_ids_echo_the_client_and_engine_ids_are_unique() -> None:
    a = to_engine_request(ids_request(request_id="mine"), TOK, LIMITS, GREEDY)
    b = to_engine_request(ids_request(request_id="mine"), TOK, LIMITS, GREEDY)
    assert a.request_id == b.request_id == "mine"
    assert a.engine_request.request_id != b.engine_request.request_id
    assert a.engine_request.request_id.startswith("mine#")
    m = to_engine_request(ids_request(), TOK, LIMITS, GREEDY, metadata_request_id="from-header")
    assert m.request_id == "from-header"
    g = to_engine_request(ids_request(), TOK, LIMITS, GREEDY)
    assert len(g.request_id) == 32  # generated


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (exec_pb2.GenerateRequest(), "one of prompt, prompt_token_ids or messages is required"),
        (ids_request(ids=()), "the prompt is empty"),
        (
            ids_request(sampling__temperature=math.nan),
            "sampling.temperature must be a finite number in [0, 100], got nan",
        ),
        (
            ids_request(sampling__temperature=100.5),
            "sampling.temperature must be a finite number in [0, 100], got 100.5",
        ),
        (ids_request(sampling__top_p=0.0), "sampling.top_p must be in (0, 1]"),
        (ids_request(sampling__top_p=1.5), "sampling.top_p must be a finite number in [0, 1], got 1.5"),
        (ids_request(sampling__min_p=-0.5), "sampling.min_p must be a finite number in [0, 1], got -0.5"),
        (
            ids_request(sampling__repetition_penalty=0.0),
            "sampling.repetition_penalty must be a finite number in [0.001, 100]",
        ),
        (
            ids_request(sampling__presence_penalty=2.5),
            "sampling.presence_penalty must be a finite number in [-2, 2], got 2.5",
        ),
        (
            ids_request(sampling__frequency_penalty=-3.0),
            "sampling.frequency_penalty must be a finite number in [-2, 2]",
        ),
        (ids_request(sampling__seed=2**63), "sampling.seed must be below 2**63"),
        (ids_request(output__top_logprobs=2), "output.top_logprobs needs output.logprobs"),
        (ids_request(stopping__max_new_tokens=0), "stopping.max_new_tokens must be in [1, 255], got 0"),
        (ids_request(stopping__max_new_tokens=256), "stopping.max_new_tokens must be in [1, 255], got 256"),
        (
            ids_request(stopping__max_new_tokens=4, stopping__min_new_tokens=5),
            "stopping.min_new_tokens (5) exceeds max_new_tokens (4)",
        ),
        (ids_request(stopping__stop=["x"] * 17), "at most 16 stop strings, got 17"),
        (ids_request(stopping__stop=[""]), "each stop string must be 1..256 bytes"),
        (ids_request(stopping__stop=["é" * 129]), "each stop string must be 1..256 bytes"),
        (ids_request(stopping__stop_token_ids=list(range(65))), "at most 64 stop_token_ids, got 65"),
        (ids_request(stopping__time_limit_ms=0), "stopping.time_limit_ms must be > 0 when set"),
        (ids_request(request_id="x" * 129), "request_id is longer than 128 bytes"),
        (ids_request(request_id="a\nb"), "request_id must be printable text"),
    ],
)
def test_out_of_range_fields_are_refused_naming_the_limit(req, message) -> None:
    got = refused(req)
    assert got.startswith(message), got


def test_every_front_shares_one_validation() -> None:
    """The gRPC proto and a protocol-free GenerateParams (what the HTTP front builds) stating the same
    request give the same engine request; errors name their field; negative values, which the
    proto's unsigned fields cannot carry but JSON can, are refused too."""
    proto = ids_request(
        sampling__temperature=0.5,
        sampling__seed=3,
        stopping__max_new_tokens=9,
        stopping__min_new_tokens=2,
        stopping__stop=["x"],
        stopping__ignore_eos=True,
        output__logprobs=True,
        output__top_logprobs=2,
    )
    params = GenerateParams(
        prompt_token_ids=[5, 6, 7],
        temperature=0.5,
        seed=3,
        max_new_tokens=9,
        min_new_tokens=2,
        stop=("x",),
        ignore_eos=True,
        logprobs=True,
        top_logprobs=2,
    )
    a = to_engine_request(proto, TOK, LIMITS, GREEDY)
    b = parse_request(params, TOK, LIMITS, GREEDY)
    assert (a.engine_request.sampling, a.engine_request.stopping) == (
        b.engine_request.sampling,
        b.engine_request.stopping,
    )
    assert a.prompt_ids == b.prompt_ids and a.stop_strings == b.stop_strings == ("x",)

    def refused_params(**fields) -> RequestError:
        with pytest.raises(RequestError) as e:
            parse_request(GenerateParams(prompt="a b", **fields), TOK, LIMITS, GREEDY)
        return e.value

    e = refused_params(temperature=500.0)
    assert e.field == "sampling.temperature" and e.message.startswith("sampling.temperature must be")
    assert refused_params(max_new_tokens=999).field == "stopping.max_new_tokens"
    assert refused_params(stop=["x"] * 17).field == "stopping.stop"
    assert refused_params(top_logprobs=2).field == "output.top_logprobs"
    for fields, message in [
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"seed": -1}, "seed must be in [0, 2**63)"),
        ({"min_new_tokens": -1}, "min_new_tokens must be >= 0"),
        ({"stop_token_ids": [-1]}, "stop_token_ids must be >= 0"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs must be >= 0"),
    ]:
        assert refused_params(**fields).message.startswith(message), fields
    with pytest.raises(RequestError, match="prompt_token_ids must be >= 0"):
        parse_request(GenerateParams(prompt_token_ids=[3, -1]), TOK, LIMITS, GREEDY)


def test_chat_messages_are_checked() -> None:
    def chat(*msgs) -> exec_pb2.GenerateRequest:
        return exec_pb2.GenerateRequest(
            messages=exec_pb2.ChatMessages(
                messages=[exec_pb2.ChatMessage(role=r, content=c) for r, c in msgs]
            )
        )

    assert refused(chat()) == "messages is empty"
    assert (
        refused(chat(("robot", "hi")))
        == "chat message role must be system, user, assistant or tool, got 'robot'"
    )
    assert refused(chat(*[("user", "x")] * 257)) == "more than 256 chat messages"
    assert refused(chat(("assistant", "hi"))).startswith("the model's chat template rejected the messages: ")

    class NoTemplate(WordTokenizer):
        chat_template = None

    with pytest.raises(RequestError, match="this model has no chat template"):
        to_engine_request(chat(("user", "hi")), NoTemplate(), LIMITS, GREEDY)


ENGINE = EngineLimits(
    max_seq_len=256, vocab_size=100, max_top_logprobs=20, max_suppressed_ids=4, eos_token_ids=frozenset({2})
)


def test_model_dependent_rules_are_the_engines_and_name_the_limit() -> None:
    """The protocol layer passes these through; the engine's one check refuses them."""
    too_long = ids_request(ids=[5] * 300)
    assert len(to_engine_request(too_long, TOK, LIMITS, GREEDY).prompt_ids) == 300  # not checked here
    cases = [
        (Request((5,) * 256), "prompt has 256 tokens; the limit is 255"),
        (Request((5, 100)), "prompt_token_ids [100] are outside the vocabulary (size 100)"),
        (Request((5,), SamplingParams(top_k=101)), "sampling.top_k must be at most the vocabulary size 100"),
        (
            Request((5,), SamplingParams(logprobs=True, top_logprobs=21)),
            "output.top_logprobs must be at most 20",
        ),
        (
            Request((5,), stopping=StoppingCriteria(stop_token_ids=(100,))),
            "stop_token_ids [100] are outside the vocabulary",
        ),
        (
            Request((5,), stopping=StoppingCriteria(min_new_tokens=1, stop_token_ids=(3, 4, 5, 6))),
            "min_new_tokens with 5 stop/EOS ids: at most 4 supported",
        ),
    ]
    for req, message in cases:
        with pytest.raises(ValueError) as e:
            check_request(req, ENGINE)
        assert str(e.value).startswith(message), str(e.value)
    check_request(Request((5,) * 255, stopping=StoppingCriteria(max_new_tokens=255)), ENGINE)  # at the limits
    # a longer max_new_tokens is the protocol's to refuse: the engine stops at the context length
    check_request(Request((5,), stopping=StoppingCriteria(max_new_tokens=1000)), ENGINE)
    # ignore_eos: EOS is not suppressed, so 4 stop ids fit
    check_request(Request((5,), stopping=StoppingCriteria(1, (3, 4, 5, 6), True, 1)), ENGINE)
