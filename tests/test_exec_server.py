"""ExecService over real grpc.aio servers on 127.0.0.1: streaming, text, limits, cancellation,
health, metrics — against transformers as the reference."""

from __future__ import annotations

import asyncio
import functools
import shutil
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch

from exec_service.server import ExecServer, ServeConfig
from prep_service.api import PrepareRequest
from prep_service.convert import prepare
from protos import exec_pb2, exec_pb2_grpc
from tests.helpers import make_llama, smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 49152  # the SmolLM2 tokenizer's; the tiny random model uses it so text round-trips


@functools.cache
def _tokenizer_dir() -> Path:
    from transformers import AutoTokenizer

    g = smollm2_gguf()
    d = Path(__file__).resolve().parent / ".cache" / "smollm2-tokenizer"
    if not (d / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
        d.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(d)
    return d


def make_served_checkpoint(path: Path, seed: int = 3, **overrides):
    """A tiny random Llama with SmolLM2's tokenizer and chat template, and a generation_config
    that asks for greedy decoding and at most 40 new tokens by default."""
    model = make_llama(
        path, seed=seed, vocab_size=VOCAB, max_position_embeddings=512, eos_token_id=2, **overrides
    )
    for f in _tokenizer_dir().iterdir():
        shutil.copy(f, path / f.name)
    from transformers import GenerationConfig

    GenerationConfig(do_sample=False, max_new_tokens=40, eos_token_id=2, bos_token_id=1).save_pretrained(path)
    return model


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int, eos: int | None = None) -> list[int]:
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=eos,
        pad_token_id=0,
        **({} if eos is not None else {"min_new_tokens": n}),
    )
    return out[0, len(ids) :].tolist()


class Served:
    """An exec server on an event loop thread of its own, for sync tests."""

    def __init__(self, cfg: ServeConfig) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ExecServer(cfg)
        self.port = self.call(self.server.start(), 300)
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.server.stop(0), 60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    model = make_served_checkpoint(d / "ckpt")
    res = prepare(PrepareRequest(source=str(d / "ckpt"), output=f"file://{d}/store"))
    return model, res.manifest_uri


@pytest.fixture(scope="module")
def served(tiny):
    _, uri = tiny
    s = Served(
        ServeConfig(
            manifest_uri=uri,
            max_batch_size=4,
            max_seq_len=256,
            context_buckets=(16, 64),
            max_waiting_requests=64,
        )
    )
    yield s
    s.close()


def _run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _generate(target: str, req: exec_pb2.GenerateRequest, **kw) -> list[exec_pb2.GenerateResponse]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = exec_pb2_grpc.ExecServiceStub(ch)
        return [m async for m in stub.Generate(req, **kw)]


async def _info(target: str) -> exec_pb2.ModelInfo:
    async with grpc.aio.insecure_channel(target) as ch:
        return await exec_pb2_grpc.ExecServiceStub(ch).GetModelInfo(exec_pb2.GetModelInfoRequest())


def _ids_req(ids: list[int], n: int, **stopping) -> exec_pb2.GenerateRequest:
    req = exec_pb2.GenerateRequest(prompt_token_ids=exec_pb2.TokenIds(ids=ids))
    req.stopping.max_new_tokens = n
    req.stopping.ignore_eos = stopping.pop("ignore_eos", True)
    for k, v in stopping.items():
        if isinstance(v, list):
            getattr(req.stopping, k).extend(v)
        else:
            setattr(req.stopping, k, v)
    return req


def _tokens(msgs) -> list[int]:
    return [t for m in msgs for t in m.token_ids]


# -------------------------------------------------------------------------------------------------


def test_greedy_stream_matches_transformers(served, tiny) -> None:
    model, _ = tiny
    for ids in ([5, 9, 200, 3000], list(range(100, 170))):  # one prompt longer than the largest bucket
        msgs = _run(_generate(served.target, _ids_req(ids, 24)))
        assert _tokens(msgs) == hf_greedy(model, ids, 24)
        last = msgs[-1]
        assert last.finish_reason == exec_pb2.LENGTH and last.usage.completion_tokens == 24
        assert last.usage.prompt_tokens == len(ids)
        assert all(m.finish_reason == exec_pb2.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
        assert last.timing.total_ms >= last.timing.ttft_ms > 0


def test_text_prompt_and_chat_messages(served, tiny) -> None:
    from transformers import AutoTokenizer

    model, _ = tiny
    tok = AutoTokenizer.from_pretrained(_tokenizer_dir())
    req = exec_pb2.GenerateRequest(prompt="Hello there, general")
    req.stopping.max_new_tokens = 12
    msgs = _run(_generate(served.target, req))
    ids = tok("Hello there, general")["input_ids"]
    ref = hf_greedy(model, ids, 12, eos=2)
    assert _tokens(msgs) == ref
    assert "".join(m.text for m in msgs) == tok.decode(ref, skip_special_tokens=True)

    chat = exec_pb2.GenerateRequest()
    chat.messages.messages.append(exec_pb2.ChatMessage(role="user", content="What is 2+2?"))
    chat.stopping.max_new_tokens = 10
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    cids = tok(text, add_special_tokens=False)["input_ids"]
    msgs = _run(_generate(served.target, chat))
    assert msgs[-1].usage.prompt_tokens == len(cids)
    assert _tokens(msgs) == hf_greedy(model, cids, 10, eos=2)


def test_generation_config_defaults(served) -> None:
    # no max_new_tokens, no temperature: generation_config says greedy, 40 tokens
    req = exec_pb2.GenerateRequest(prompt_token_ids=exec_pb2.TokenIds(ids=[10, 11, 12]))
    req.stopping.ignore_eos = True
    msgs = _run(_generate(served.target, req))
    assert msgs[-1].usage.completion_tokens == 40 and msgs[-1].finish_reason == exec_pb2.LENGTH
    again = _run(_generate(served.target, req))
    assert _tokens(again) == _tokens(msgs)  # greedy: deterministic


def test_stop_strings_never_leak(served) -> None:
    base = _run(_generate(served.target, _ids_req([7, 8, 9], 30)))
    text = "".join(m.text for m in base)
    assert len(text) > 12
    stop = text[5:9]  # a stop string that spans tokens somewhere in the output
    cut = text.index(stop)
    msgs = _run(_generate(served.target, _ids_req([7, 8, 9], 30, stop=[stop])))
    assert "".join(m.text for m in msgs) == text[:cut]
    assert msgs[-1].finish_reason == exec_pb2.STOP_SEQUENCE and msgs[-1].matched_stop == stop
    incl = _run(_generate(served.target, _ids_req([7, 8, 9], 30, stop=[stop], include_stop_in_output=True)))
    assert "".join(m.text for m in incl) == text[: cut + len(stop)]


def test_stop_token_ids_and_eos(served) -> None:
    base = _tokens(_run(_generate(served.target, _ids_req([7, 8, 9], 20))))
    stop_id = base[6]
    msgs = _run(_generate(served.target, _ids_req([7, 8, 9], 20, stop_token_ids=[stop_id])))
    assert _tokens(msgs) == base[: base.index(stop_id) + 1] and msgs[-1].finish_reason == exec_pb2.STOP_TOKEN


def test_min_new_tokens_suppresses_stop_tokens(served) -> None:
    base = _tokens(_run(_generate(served.target, _ids_req([7, 8, 9], 20))))
    first = base[0]
    msgs = _run(_generate(served.target, _ids_req([7, 8, 9], 20, stop_token_ids=[first], min_new_tokens=5)))
    toks = _tokens(msgs)
    assert len(toks) >= 5 and first not in toks[:5]


def test_logprobs(served, tiny) -> None:
    model, _ = tiny
    req = _ids_req([4, 5, 6], 3)
    req.output.logprobs = True
    req.output.top_logprobs = 3
    msgs = _run(_generate(served.target, req))
    lps = [lp for m in msgs for lp in m.logprobs]
    assert len(lps) == 3
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([[4, 5, 6]])).logits[0, -1], -1)
    assert lps[0].token_id == int(ref.argmax()) and abs(lps[0].logprob - float(ref.max())) < 1e-4
    assert [t.token_id for t in lps[0].top] == ref.topk(3).indices.tolist()


def test_seeded_sampling_is_reproducible(served) -> None:
    req = _ids_req([3, 4, 5], 16)
    req.sampling.temperature = 0.9
    req.sampling.top_p = 0.95
    req.sampling.seed = 1234
    a = _run(_generate(served.target, req))
    b = _run(_generate(served.target, req))
    assert _tokens(a) == _tokens(b) and a[-1].seed == 1234


def test_tokenize_and_model_info(served) -> None:
    async def main():
        async with grpc.aio.insecure_channel(served.target) as ch:
            stub = exec_pb2_grpc.ExecServiceStub(ch)
            tok = await stub.Tokenize(exec_pb2.TokenizeRequest(text="Hello world"))
            info = await stub.GetModelInfo(exec_pb2.GetModelInfoRequest())
            return tok, info

    tok, info = _run(main())
    assert list(tok.ids) and len(tok.tokens) == len(tok.ids)
    assert info.family == "llama" and info.max_seq_len == 256 and info.max_batch_size == 4
    assert (
        info.vocab_size == VOCAB
        and info.limits.max_prompt_tokens == 255
        and list(info.context_buckets) == [16, 64]
        and list(info.batch_buckets) == [1, 2, 4]
    )
    assert info.free_slots == 4 and len(info.manifest_digest) == 64 and info.tp_degree == 1
    assert 2 in info.eos_token_ids


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda r: r.ClearField("prompt_token_ids"), "one of prompt"),
        (lambda r: r.prompt_token_ids.ids.extend([0] * 300), "the limit is 255"),
        (lambda r: r.prompt_token_ids.ids.append(VOCAB + 5), "outside the vocabulary"),
        (lambda r: setattr(r.sampling, "temperature", float("nan")), "temperature"),
        (lambda r: setattr(r.sampling, "top_p", 1.5), "top_p"),
        (lambda r: setattr(r.stopping, "max_new_tokens", 100000), "max_new_tokens must be in [1, 255]"),
        (lambda r: r.stopping.stop.extend(["x"] * 17), "at most 16 stop strings"),
        (lambda r: setattr(r.output, "top_logprobs", 3), "needs output.logprobs"),
        (lambda r: setattr(r, "request_id", "x" * 500), "request_id is longer"),
    ],
)
def test_invalid_requests(served, mutate, fragment) -> None:
    req = _ids_req([1, 2, 3], 4)
    mutate(req)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        _run(_generate(served.target, req))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in e.value.details()


def test_request_id_from_metadata(served) -> None:
    msgs = _run(_generate(served.target, _ids_req([1, 2], 2), metadata=(("x-request-id", "abc-123"),)))
    assert {m.request_id for m in msgs} == {"abc-123"}
    req = _ids_req([1, 2], 2)
    req.request_id = "mine"
    assert _run(_generate(served.target, req))[0].request_id == "mine"


def test_cancel_and_deadline_free_the_slot(served) -> None:
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
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in stub.Generate(_ids_req([1, 2, 3], 250), timeout=0.3):
                    pass
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(100):
                info = await stub.GetModelInfo(exec_pb2.GetModelInfoRequest())
                if info.free_slots == 4 and info.running_requests == 0:
                    return info
                await asyncio.sleep(0.05)
            raise AssertionError(f"slots not freed: {info}")

    _run(main())


def test_time_limit(served) -> None:
    req = _ids_req([1, 2, 3], 250, time_limit_ms=150)
    msgs = _run(_generate(served.target, req))
    assert msgs[-1].finish_reason == exec_pb2.TIME_LIMIT and msgs[-1].usage.completion_tokens < 250


def test_concurrent_streams_mixed(served, tiny) -> None:
    """32 concurrent streams (4 slots): greedy ones equal transformers; seeded sampled ones equal
    the same request run alone."""
    model, _ = tiny
    prompts = [[(i * 31 + j * 7) % 4000 + 5 for j in range(3 + (i * 5) % 50)] for i in range(32)]
    reqs = []
    for i, p in enumerate(prompts):
        r = _ids_req(p, 6 + i % 7)
        if i % 2:
            r.sampling.temperature = 0.7 + 0.1 * (i % 3)
            r.sampling.top_k = 50
            r.sampling.seed = 1000 + i
        reqs.append(r)

    async def main():
        return await asyncio.gather(*[_generate(served.target, r) for r in reqs])

    results = _run(main(), 300)
    for i, (p, r, msgs) in enumerate(zip(prompts, reqs, results, strict=True)):
        assert msgs[-1].finish_reason == exec_pb2.LENGTH
        if i % 2 == 0:
            assert _tokens(msgs) == hf_greedy(model, p, r.stopping.max_new_tokens), i
    for i in (1, 7, 13):  # sampled: batch-invariant
        alone = _run(_generate(served.target, reqs[i]))
        assert _tokens(alone) == _tokens(results[i])
    assert _run(_info(served.target)).free_slots == 4


def test_the_loader_thread_is_gone_once_serving(served) -> None:
    """Torch ran on the loader thread (load, warm-up), then only on the engine loop's."""
    import threading

    names = [t.name for t in threading.enumerate()]
    assert "exec-load" not in names and "engine-loop" in names


def test_slow_readers_get_every_token_in_order(served) -> None:
    """Streams whose clients read slowly, next to fast ones: each gets exactly the tokens and text
    of a run on its own, in order (what piled up comes in fewer, larger messages)."""
    prompts = [[7, 8, 9], [40, 41], [300, 301, 302, 303], [9, 9]]
    alone = [_run(_generate(served.target, _ids_req(p, 48))) for p in prompts]

    async def read(p: list[int], delay: float) -> list[exec_pb2.GenerateResponse]:
        async with grpc.aio.insecure_channel(served.target) as ch:
            msgs = []
            async for m in exec_pb2_grpc.ExecServiceStub(ch).Generate(_ids_req(p, 48)):
                msgs.append(m)
                await asyncio.sleep(delay)
            return msgs

    async def main():
        return await asyncio.gather(*(read(p, 0.03 if i % 2 else 0.0) for i, p in enumerate(prompts)))

    for got, ref in zip(_run(main()), alone, strict=True):
        assert _tokens(got) == _tokens(ref)
        assert "".join(m.text for m in got) == "".join(m.text for m in ref)
        assert got[-1].finish_reason == exec_pb2.LENGTH and got[-1].usage.completion_tokens == 48
        assert all(m.token_ids or m.text or m is got[-1] for m in got)


def test_queue_overflow_is_resource_exhausted(tiny) -> None:
    _, uri = tiny
    s = Served(
        ServeConfig(
            manifest_uri=uri,
            max_batch_size=1,
            max_seq_len=256,
            context_buckets=(16, 64),
            max_waiting_requests=2,
        )
    )
    try:

        async def main():
            async with grpc.aio.insecure_channel(s.target) as ch:
                stub = exec_pb2_grpc.ExecServiceStub(ch)

                async def one():
                    try:
                        return [m async for m in stub.Generate(_ids_req([1, 2, 3], 60))]
                    except grpc.aio.AioRpcError as e:
                        return e.code()

                return await asyncio.gather(*[one() for _ in range(8)])

        res = _run(main(), 300)
        codes = [r for r in res if isinstance(r, grpc.StatusCode)]
        assert codes and set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert any(isinstance(r, list) for r in res)
    finally:
        s.close()


def test_health_reflection_and_metrics(tiny) -> None:
    import socket

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        mport = sock.getsockname()[1]
    _, uri = tiny
    s = Served(
        ServeConfig(
            manifest_uri=uri, max_batch_size=2, max_seq_len=128, context_buckets=(16,), metrics_port=mport
        )
    )
    try:

        async def main():
            async with grpc.aio.insecure_channel(s.target) as ch:
                h = health_pb2_grpc.HealthStub(ch)
                live = await h.Check(health_pb2.HealthCheckRequest(service=""))
                ready = await h.Check(
                    health_pb2.HealthCheckRequest(service="neuronserve.exec.v1.ExecService")
                )
                await exec_pb2_grpc.ExecServiceStub(ch).Generate(_ids_req([1, 2], 3)).read()
                return live.status, ready.status

        live, ready = _run(main())
        assert live == ready == health_pb2.HealthCheckResponse.SERVING
        body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        for name in (
            "neuron_serve_ttft_seconds_count",
            "neuron_serve_inter_token_latency_seconds",
            "neuron_serve_e2e_latency_seconds",
            "neuron_serve_queue_seconds",
            "neuron_serve_running_requests",
            "neuron_serve_waiting_requests",
            "neuron_serve_prompt_tokens_total",
            "neuron_serve_generated_tokens_total",
            "neuron_serve_requests_finished_total",
        ):
            assert name in body, name
    finally:
        s.close()


# -------------------------------------------------------------------------------------------------
# End to end: prep-server + SeaweedFS + exec-server, a client built only from the .proto files.
# -------------------------------------------------------------------------------------------------


_PROTO_ONLY_CLIENT = r"""
import json, sys, grpc
from grpc_tools import protoc
tmp, proto, target, ids, n = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
assert protoc.main(["protoc", f"-I{tmp}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", proto]) == 0
sys.path.insert(0, tmp)
import exec_pb2, exec_pb2_grpc  # generated just now from the .proto file alone
assert "protos" not in sys.modules
req = exec_pb2.GenerateRequest(prompt_token_ids=exec_pb2.TokenIds(ids=ids))
req.stopping.max_new_tokens = n
req.stopping.ignore_eos = True
with grpc.insecure_channel(target) as ch:
    msgs = list(exec_pb2_grpc.ExecServiceStub(ch).Generate(req, timeout=120))
print(json.dumps({"tokens": [t for m in msgs for t in m.token_ids],
                  "finish": exec_pb2.FinishReason.Name(msgs[-1].finish_reason)}))
"""


def _proto_only_generate(tmp: Path, target: str, ids: list[int], n: int) -> dict:
    """A client in a fresh process, built only from exec.proto (never imports the committed code)."""
    import json
    import subprocess

    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "protos" / "exec.proto", tmp / "exec.proto")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _PROTO_ONLY_CLIENT,
            str(tmp),
            str(tmp / "exec.proto"),
            target,
            json.dumps(ids),
            str(n),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_end_to_end_prep_server_s3_exec_server(tmp_path: Path, s3_env: str, tp: int) -> None:
    from prep_service.server import PrepServer
    from protos import prep_pb2, prep_pb2_grpc

    model = make_served_checkpoint(tmp_path / "ckpt", seed=5)

    async def do_prepare() -> str:
        server = PrepServer(store_uri=f"{s3_env}/store")
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = prep_pb2_grpc.PrepServiceStub(ch)
                op = await stub.PrepareModel(
                    prep_pb2.PrepareModelRequest(source=str(tmp_path / "ckpt"), tp_degree=tp)
                )
                ops = [
                    o
                    async for o in stub.WatchOperation(
                        prep_pb2.WatchOperationRequest(operation_id=op.operation_id)
                    )
                ]
                assert ops[-1].state == prep_pb2.Operation.SUCCEEDED, ops[-1].error
                return ops[-1].manifest_uri
        finally:
            await server.stop()

    manifest_uri = _run(do_prepare())
    assert manifest_uri.startswith("s3://")
    s = Served(
        ServeConfig(manifest_uri=manifest_uri, max_batch_size=2, max_seq_len=128, context_buckets=(16, 32))
    )
    try:
        for ids in ([9, 8, 7, 6], list(range(300, 340))):
            got = _proto_only_generate(tmp_path / "client", s.target, ids, 20)
            assert got == {"tokens": hf_greedy(model, ids, 20), "finish": "LENGTH"}
        info = _run(_info(s.target))
        assert info.tp_degree == tp and info.manifest_uri == manifest_uri
    finally:
        s.close()


def test_generate_cli_streams_to_the_terminal(served, tiny) -> None:
    """`neuron-serve generate` prints the streamed text on stdout and a summary on stderr."""
    import subprocess

    from transformers import AutoTokenizer

    model, _ = tiny
    tok = AutoTokenizer.from_pretrained(_tokenizer_dir())
    exe = Path(sys.executable).parent / "neuron-serve"
    out = subprocess.run(
        [str(exe), "generate", "--target", served.target, "Once upon a time", "--max-new-tokens", "10"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    ref = hf_greedy(model, tok("Once upon a time")["input_ids"], 10, eos=2)
    assert out.stdout == tok.decode(ref, skip_special_tokens=True) + "\n"
    assert "generated tokens" in out.stderr
    bad = subprocess.run(
        [str(exe), "generate", "--target", served.target, "x", "--temperature", "nan"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr
