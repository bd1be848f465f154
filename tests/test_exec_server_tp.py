"""Greedy parity at tp = 2 through a real exec-server: a tiny random Llama prepared at tp 2 by the
real ``prepare`` into a file:// store, served by ``ExecServer`` on 127.0.0.1 (rank 1 a worker
process), called over gRPC. The streamed token ids equal transformers ``generate`` on the same
model, for prompts sent one at a time and for prompts in flight together (batched)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from exec_service.server import ServeConfig
from prep_service.api import PrepareRequest
from prep_service.convert import prepare
from protos import exec_pb2, exec_pb2_grpc
from tests.test_exec_server import VOCAB, Served, _ids_req, hf_greedy, make_served_checkpoint

N_NEW = 32
MAX_BATCH = 4
PROMPTS: list[list[int]] = [
    [5, 9, 200, 3000],
    list(range(100, 170)),  # longer than the largest context bucket: prefilled in two chunks
    [(i * 7919) % VOCAB for i in range(1, 24)],
    [17],
]


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """(HF model, the served tp = 2 server), one server start for the module."""
    d = tmp_path_factory.mktemp("tp2")
    model = make_served_checkpoint(d / "ckpt", seed=13)
    uri = prepare(
        PrepareRequest(source=str(d / "ckpt"), tp_degree=2, output=f"file://{d}/store")
    ).manifest_uri
    served = Served(
        ServeConfig(manifest_uri=uri, max_batch_size=MAX_BATCH, max_seq_len=256, context_buckets=(16, 64))
    )
    yield model, served
    served.close()


@pytest.fixture(scope="module")
def reference(tp2) -> list[list[int]]:
    model, _ = tp2
    return [hf_greedy(model, p, N_NEW) for p in PROMPTS]


def _greedy_req(ids: list[int], explicit: bool) -> exec_pb2.GenerateRequest:
    req = _ids_req(ids, N_NEW)  # ignore_eos
    if explicit:
        req.sampling.temperature = 0.0
    # else: unset, the served generation_config (do_sample false) makes it greedy
    return req


async def _stream(
    stub, req: exec_pb2.GenerateRequest
) -> tuple[list[int], float, float, exec_pb2.GenerateResponse]:
    """(token ids, time of the first message, time of the last, the last message)."""
    ids: list[int] = []
    first = last = 0.0
    msg = None
    async for msg in stub.Generate(req, timeout=120):
        last = time.monotonic()
        first = first or last
        ids.extend(msg.token_ids)
    assert msg is not None
    return ids, first, last, msg


def test_server_serves_the_tp2_artifact(tp2) -> None:
    _, served = tp2

    async def info():
        async with grpc.aio.insecure_channel(served.target) as ch:
            return await exec_pb2_grpc.ExecServiceStub(ch).GetModelInfo(exec_pb2.GetModelInfoRequest())

    got = served.call(info())
    assert got.tp_degree == 2 and got.max_batch_size == MAX_BATCH


def test_tp2_greedy_one_at_a_time_equals_transformers(tp2, reference) -> None:
    _, served = tp2

    async def run():
        async with grpc.aio.insecure_channel(served.target) as ch:
            stub = exec_pb2_grpc.ExecServiceStub(ch)
            return [await _stream(stub, _greedy_req(p, i % 2 == 0)) for i, p in enumerate(PROMPTS)]

    for (ids, _, _, last), want, prompt in zip(served.call(run()), reference, PROMPTS, strict=True):
        assert ids == want, prompt
        assert last.finish_reason == exec_pb2.LENGTH and last.usage.completion_tokens == N_NEW


def test_tp2_greedy_batched_equals_transformers(tp2, reference) -> None:
    """All prompts in flight together (max_batch_size 4): decoded in one batch, each stream still
    exactly transformers' tokens."""
    _, served = tp2

    async def run():
        async with grpc.aio.insecure_channel(served.target) as ch:
            stub = exec_pb2_grpc.ExecServiceStub(ch)
            return await asyncio.gather(
                *[_stream(stub, _greedy_req(p, i % 2 == 1)) for i, p in enumerate(PROMPTS)]
            )

    results = served.call(run())
    assert [r[0] for r in results] == reference
    # they overlapped: every stream had its first message before any stream had its last
    assert max(r[1] for r in results) < min(r[2] for r in results)
