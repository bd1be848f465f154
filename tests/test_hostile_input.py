"""Hostile input, property-based: whatever a client sends, each call ends with the right status,
the servers stay healthy, and nothing is written outside the store root."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from exec_service.server import ServeConfig
from prep_service.server import AccessPolicy, PrepServer
from protos import exec_pb2, exec_pb2_grpc, prep_pb2, prep_pb2_grpc
from tests.helpers import make_llama
from tests.test_exec_server import Served, make_served_checkpoint

OK_OR_REJECTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
SETTINGS = settings(
    derandomize=True,  # the same examples on every CI run
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -1.0, 1e-45, 3.4e38, float("nan"), float("inf"), 0.5, 1.0]),
)
texts = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), max_size=30),
    st.just(""),
    st.just("\x00" * 50),
)


@st.composite
def generate_requests(draw) -> exec_pb2.GenerateRequest:
    req = exec_pb2.GenerateRequest()
    which = draw(st.sampled_from(["prompt", "ids", "messages", "none"]))
    if which == "prompt":
        req.prompt = draw(texts)
    elif which == "ids":
        req.prompt_token_ids.ids.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=300)))
    elif which == "messages":
        for _ in range(draw(st.integers(0, 4))):
            req.messages.messages.append(
                exec_pb2.ChatMessage(
                    role=draw(st.sampled_from(["user", "system", "assistant", "robot", ""])),
                    content=draw(texts),
                )
            )
    if draw(st.booleans()):
        req.request_id = draw(st.one_of(st.text(max_size=20), st.just("r" * 10_000), st.just("\n\t")))
    s = req.sampling
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
    ):
        if draw(st.booleans()):
            setattr(s, name, draw(floats))
    if draw(st.booleans()):
        s.top_k = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    t = req.stopping
    t.max_new_tokens = draw(st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1)))
    t.min_new_tokens = draw(st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1)))
    t.stop.extend(
        draw(st.one_of(st.lists(texts, max_size=4), st.just(["x"] * 5000), st.just(["y" * 100_000])))
    )
    t.stop_token_ids.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=3)))
    t.ignore_eos = draw(st.booleans())
    if draw(st.booleans()):
        t.time_limit_ms = draw(st.integers(0, 2**32 - 1))
    req.output.logprobs = draw(st.booleans())
    req.output.top_logprobs = draw(st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1)))
    return req


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from prep_service.api import PrepareRequest
    from prep_service.convert import prepare

    d = tmp_path_factory.mktemp("hostile")
    make_served_checkpoint(d / "ckpt", seed=4)
    uri = prepare(PrepareRequest(source=str(d / "ckpt"), output=f"file://{d}/store")).manifest_uri
    s = Served(ServeConfig(manifest_uri=uri, max_batch_size=2, max_seq_len=128, context_buckets=(16, 64)))
    yield s
    s.close()


async def _call(target: str, req: exec_pb2.GenerateRequest) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as ch:
        try:
            async for _ in exec_pb2_grpc.ExecServiceStub(ch).Generate(req, timeout=60):
                pass
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            return e.code()


async def _healthy(target: str) -> bool:
    async with grpc.aio.insecure_channel(target) as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return r.status == health_pb2.HealthCheckResponse.SERVING


@SETTINGS
@given(req=generate_requests())
def test_generate_never_fails_badly(served, req: exec_pb2.GenerateRequest) -> None:
    code = served.call(_call(served.target, req), 120)
    assert code in OK_OR_REJECTED, (code, req)
    assert served.call(_healthy(served.target))


def test_undecodable_and_oversized_messages(served) -> None:
    """Invalid UTF-8 in a string field and a message over the size limit, sent as raw bytes."""

    async def raw(payload: bytes) -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(served.target) as ch:
            call = ch.unary_stream(
                "/neuronserve.exec.v1.ExecService/Generate",
                request_serializer=lambda b: b,
                response_deserializer=exec_pb2.GenerateResponse.FromString,
            )
            try:
                async for _ in call(payload, timeout=30):
                    pass
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                return e.code()

    bad_utf8 = b"\x12\x04\xff\xfe\xfa\x80"  # field 2 (prompt), 4 bytes that are not UTF-8
    from exec_service.server import EXEC_MAX_MESSAGE_BYTES

    big = exec_pb2.GenerateRequest(prompt="a" * (EXEC_MAX_MESSAGE_BYTES + 1024)).SerializeToString()
    assert served.call(raw(bad_utf8)) == grpc.StatusCode.INVALID_ARGUMENT
    assert served.call(raw(big)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served.call(_healthy(served.target))
    ok = exec_pb2.GenerateRequest(prompt_token_ids=exec_pb2.TokenIds(ids=[1, 2, 3]))
    ok.stopping.max_new_tokens = 2
    assert served.call(_call(served.target, ok)) == grpc.StatusCode.OK


# -------------------------------------------------------------------------------------------------
# PrepareModel
# -------------------------------------------------------------------------------------------------

paths = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        [
            "../../etc",
            "/etc/passwd",
            "..",
            "file:///etc",
            "file://../x",
            "s3://b/../../x",
            "s3://",
            "s3://b/a/./c",
            "~/x",
            "a/../../b",
            "\x00",
            "http://example.invalid/x",
            "x" * 5000,
            "./src/../../outside",
        ]
    ),
)


@st.composite
def prepare_requests(draw, src_root: Path, store: str) -> prep_pb2.PrepareModelRequest:
    source = draw(
        st.one_of(paths, st.just(str(src_root / "ckpt")), st.just(str(src_root / "ckpt" / ".." / "..")))
    )
    output = draw(st.one_of(st.just(""), st.just(store), st.just(store + "/../escape"), paths))
    return prep_pb2.PrepareModelRequest(
        source=source,
        output=output,
        tp_degree=draw(st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1))),
        dtype=draw(st.one_of(st.sampled_from(["", "float32", "bfloat16", "int4"]), st.text(max_size=10))),
        revision=draw(st.one_of(st.just(""), st.text(max_size=10), st.just("r" * 1000))),
        name=draw(
            st.one_of(
                st.just(""), st.sampled_from(["../../x", "a/b", ".hidden", "ok-name"]), st.text(max_size=10)
            )
        ),
        allow_pickle=draw(st.booleans()),
    )


def test_prepare_model_never_fails_badly_and_never_writes_outside(tmp_path: Path) -> None:
    src_root = tmp_path / "sources"
    make_llama(src_root / "ckpt")
    store = f"file://{tmp_path}/store"
    before = {p for p in tmp_path.rglob("*")}
    cwd_before = set(os.listdir(os.getcwd()))
    statuses: list[grpc.StatusCode] = []

    async def main():
        server = PrepServer(
            store_uri=store,
            access=AccessPolicy(outputs=(store,), source_roots=(str(src_root),)),
            max_workers=1,
        )
        port = await server.start()
        ops: list[str] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = prep_pb2_grpc.PrepServiceStub(ch)

                @SETTINGS
                @given(req=prepare_requests(src_root, store))
                @example(
                    req=prep_pb2.PrepareModelRequest(source=str(src_root / "ckpt"), tp_degree=1)
                )  # valid
                @example(req=prep_pb2.PrepareModelRequest(source="/etc", tp_degree=1))  # outside the roots
                @example(
                    req=prep_pb2.PrepareModelRequest(
                        source=str(src_root / "ckpt"), tp_degree=1, name="../../x"
                    )
                )
                def one(req):
                    async def call():
                        return await stub.PrepareModel(req, timeout=30)

                    fut = asyncio.run_coroutine_threadsafe(call(), loop)
                    try:
                        ops.append(fut.result(60).operation_id)
                        statuses.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as e:
                        statuses.append(e.code())

                loop = asyncio.get_running_loop()
                await asyncio.to_thread(one)
                for op_id in ops:  # every accepted operation reaches a terminal state
                    last = None
                    async for o in stub.WatchOperation(
                        prep_pb2.WatchOperationRequest(operation_id=op_id), timeout=120
                    ):
                        last = o
                    assert last is not None and last.state in (
                        prep_pb2.Operation.SUCCEEDED,
                        prep_pb2.Operation.FAILED,
                    )
                h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
                assert h.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 600))
    assert set(statuses) <= {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
    }
    assert grpc.StatusCode.OK in statuses and grpc.StatusCode.PERMISSION_DENIED in statuses
    new = {p for p in tmp_path.rglob("*")} - before
    outside = [p for p in new if not p.is_relative_to(tmp_path / "store")]
    assert outside == [], outside
    assert set(os.listdir(os.getcwd())) == cwd_before
