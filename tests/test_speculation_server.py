"""Speculation through the real exec server (grpc.aio on 127.0.0.1): a draft model (the int8 artifact
of the served model) — streams equal transformers, stop strings, max_new_tokens and cancellation
with several tokens per step, ModelInfo.speculation, the Prometheus counters; a draft model with
another tokenizer is refused at load with the reason; the CLI's speculation flags."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import grpc
import pytest

from exec_service.server import ExecServer, LoadFailed, ServeConfig
from prep_service.api import PrepareRequest
from prep_service.convert import prepare
from protos import exec_pb2, exec_pb2_grpc
from shared.shapes import ServingShape
from tests.test_exec_server import Served, _generate, _ids_req, _run, _tokenizer_dir, _tokens, hf_greedy
from tests.test_exec_server import make_served_checkpoint as make_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The served model (fp32), its int8 artifact (the draft), and a draft whose tokenizer has one
    token more."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("spec-served")
    model = make_checkpoint(d / "ckpt")
    store = f"file://{d}/store"
    target = prepare(PrepareRequest(source=str(d / "ckpt"), output=store)).manifest_uri
    draft = prepare(PrepareRequest(source=str(d / "ckpt"), output=store, quantize="int8")).manifest_uri
    make_checkpoint(d / "other", seed=4)
    tok = AutoTokenizer.from_pretrained(_tokenizer_dir())
    tok.add_tokens(["<not-in-the-target>"])
    tok.save_pretrained(d / "other")
    other = prepare(PrepareRequest(source=str(d / "other"), output=store)).manifest_uri
    return model, target, draft, other


@pytest.fixture(scope="module")
def served(artifacts):
    _, target, draft, _ = artifacts
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        mport = sock.getsockname()[1]
    s = Served(
        ServeConfig(
            manifest_uri=target,
            max_batch_size=4,
            max_seq_len=256,
            context_buckets=(16, 64),
            speculation="draft",
            num_speculative_tokens=4,
            draft_model=draft,
            metrics_port=mport,
        )
    )
    s.metrics_port = mport
    yield s
    s.close()


def test_streams_equal_transformers_with_a_draft_model(served, artifacts) -> None:
    model = artifacts[0]
    for ids in ([5, 9, 200, 3000], list(range(100, 170))):
        for n in (24, 7):  # max_new_tokens honoured exactly, whatever a step accepts
            msgs = _run(_generate(served.target, _ids_req(ids, n)))
            assert _tokens(msgs) == hf_greedy(model, ids, n)
            assert msgs[-1].usage.completion_tokens == n and msgs[-1].finish_reason == exec_pb2.LENGTH
    # stop strings cut inside a multi-token step, never leaking
    base = _run(_generate(served.target, _ids_req([7, 8, 9], 30)))
    text = "".join(m.text for m in base)
    stop = text[9:13]
    msgs = _run(_generate(served.target, _ids_req([7, 8, 9], 30, stop=[stop])))
    assert "".join(m.text for m in msgs) == text[: text.index(stop)]
    assert msgs[-1].finish_reason == exec_pb2.STOP_SEQUENCE


def test_model_info_metrics_and_cancel(served, artifacts) -> None:
    _, _, draft, _ = artifacts

    async def main():
        async with grpc.aio.insecure_channel(served.target) as ch:
            stub = exec_pb2_grpc.ExecServiceStub(ch)
            call = stub.Generate(_ids_req([1, 2, 3], 200))
            got = 0
            async for _ in call:
                got += 1
                if got == 3:
                    call.cancel()
                    break
            for _ in range(100):
                info = await stub.GetModelInfo(exec_pb2.GetModelInfoRequest())
                if info.free_slots == 4 and info.running_requests == 0:
                    return info
                await asyncio.sleep(0.05)
            raise AssertionError(f"slots not freed: {info}")

    info = _run(main())
    assert (info.speculation.method, info.speculation.num_speculative_tokens) == ("draft", 4)
    assert info.speculation.draft_model == draft
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=10).read().decode()
    )
    values = {
        line.split()[0]: float(line.split()[1])
        for line in body.splitlines()
        if line.startswith("neuron_serve_speculation_")
    }
    drafted = values["neuron_serve_speculation_draft_tokens_total"]
    accepted = values["neuron_serve_speculation_accepted_tokens_total"]
    assert drafted > 0 and accepted > 0.5 * drafted  # the int8 self-draft: most drafts accepted
    rows = values["neuron_serve_speculation_verified_rows_total"]
    assert values["neuron_serve_speculation_mean_accepted_length"] == pytest.approx(1 + accepted / rows)


def test_a_draft_model_with_another_tokenizer_is_refused(artifacts) -> None:
    _, target, _, other = artifacts
    cfg = ServeConfig(
        manifest_uri=target,
        max_batch_size=1,
        max_seq_len=64,
        context_buckets=(16,),
        speculation="draft",
        draft_model=other,
    )
    with pytest.raises(LoadFailed, match="has another tokenizer"):
        _run(ExecServer(cfg).start())  # stops itself on a failed load


def test_cli_speculation_flags() -> None:
    from exec_service.cli import serving_shape_from_args
    from shared.cli import build_parser

    parser = build_parser()
    ns = parser.parse_args(["exec-server", "--model", "m", "--max-seq-len", "256", "--speculation", "ngram"])
    shape = serving_shape_from_args(ns, parser)
    assert (shape.speculation, shape.num_speculative_tokens) == ("ngram", 4)
    bad = [
        ["exec-server", "--model", "m", "--speculation", "ngram", "--num-speculative-tokens", "40"],
        ["exec-server", "--model", "m", "--speculation", "draft"],  # no --draft-model
        ["exec-server", "--model", "m", "--draft-model", "file:///d.json"],  # not --speculation draft
    ]
    for argv in bad:
        ns = parser.parse_args(argv)
        with pytest.raises(SystemExit) as e:
            ns.func(ns)
        assert e.value.code == 2
    with pytest.raises(ValueError, match="go together"):
        ServeConfig(manifest_uri="m", speculation="draft")
    # PrepService.CompileGraphs: the speculation shape reaches its `neuron-serve compile` child
    from prep_service.compile_job import CompileRequest
    from protos import prep_pb2

    msg = prep_pb2.CompileGraphsRequest(
        manifest_uri="file:///s/models/a/k/manifest.json",
        max_seq_len=256,
        speculation="ngram",
        num_speculative_tokens=3,
    )
    argv = CompileRequest.from_proto(msg).argv()
    ns = parser.parse_args(argv[argv.index("compile") :])
    assert serving_shape_from_args(ns, parser) == ServingShape(
        max_seq_len=256, speculation="ngram", num_speculative_tokens=3
    )
