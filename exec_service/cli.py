"""``neuron-serve exec-server`` and ``generate``."""

from __future__ import annotations

import argparse
import asyncio
import sys

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_SIGINT = 0, 1, 2, 130


def _buckets(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(sorted({int(x) for x in text.replace(",", " ").split()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"buckets must be integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("at least one bucket is needed")
    return vals


# ServingShape field -> the flag that sets it (errors name the flag)
SHAPE_FLAGS = {
    "max_batch_size": "--max-batch-size",
    "max_seq_len": "--max-seq-len",
    "context_buckets": "--context-buckets",
    "kv_buckets": "--kv-buckets",
    "batch_buckets": "--batch-buckets",
    "speculation": "--speculation",
    "num_speculative_tokens": "--num-speculative-tokens",
}


def add_serving_shape_arguments(p: argparse.ArgumentParser) -> None:
    """The static serving shape (exec-server, and any command that builds the same graphs)."""
    g = p.add_argument_group("serving shape (static: one graph per bucket)")
    g.add_argument("--max-batch-size", type=int, default=8, metavar="B", help="KV cache slots (default 8)")
    g.add_argument(
        "--max-seq-len", type=int, default=2048, metavar="L", help="prompt + output (default 2048)"
    )
    g.add_argument(
        "--context-buckets",
        type=_buckets,
        default=(),
        metavar="N[,N…]",
        help="prefill bucket lengths; the largest must divide --max-seq-len (default: derived from "
        "--max-seq-len: 2048 -> 128,512; 256 -> 64,256)",
    )
    g.add_argument(
        "--kv-buckets",
        type=_buckets,
        default=(),
        metavar="N[,N…]",
        help="attention-length buckets; the largest must equal --max-seq-len (default: powers of two "
        "from the smallest context bucket)",
    )
    g.add_argument(
        "--batch-buckets",
        type=_buckets,
        default=(),
        metavar="N[,N…]",
        help="rows per step (decode, batched prefill); the largest must equal --max-batch-size; each "
        "step runs in the smallest that holds its rows (default: powers of two: 8 -> 1,2,4,8)",
    )
    g.add_argument(
        "--speculation",
        choices=("off", "ngram", "draft"),
        default="off",
        help="speculative decoding: ngram = drafts by prompt lookup (no model), draft = a draft model "
        "(--draft-model); each step verifies up to --num-speculative-tokens drafts per sequence in one "
        "graph, greedy output identical and sampling exact (default off)",
    )
    g.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=0,
        metavar="K",
        help="drafts per sequence and step with --speculation (1..16; default 4)",
    )


def serving_shape_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The validated shape, or exit 2 (``parser.error``) naming the flag and the rule."""
    from shared.shapes import ServingShape, ShapeError

    try:
        return ServingShape(
            args.max_batch_size,
            args.max_seq_len,
            args.context_buckets,
            args.kv_buckets,
            args.batch_buckets,
            args.speculation,
            args.num_speculative_tokens,
        )
    except ShapeError as e:
        parser.error(f"{SHAPE_FLAGS.get(e.field, e.field)}: {e}")


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "exec-server",
        help="serve a prepared model over gRPC (and the OpenAI HTTP API with --http-port)",
        description="Load a manifest's shards and serve ExecService (streaming Generate with continuous "
        "batching) until SIGTERM/SIGINT, then drain. A tp>1 manifest starts its worker rank processes. "
        "--http-port adds an OpenAI-compatible HTTP API on the same engine.",
    )
    s.add_argument("--model", required=True, metavar="MANIFEST_URI", help="file://… or s3://… manifest.json")
    s.add_argument("--port", type=int, default=50052, metavar="P", help="gRPC port (default 50052; 0 = any)")
    s.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 in Kubernetes)"
    )
    s.add_argument("--device", choices=("cpu", "cuda", "neuron"), default="cpu")
    add_serving_shape_arguments(s)
    s.add_argument(
        "--graphs",
        choices=("auto", "required", "compile", "off"),
        default="auto",
        help="compiled step graphs: auto (default) = load this model's graph set from the store if it has "
        "one, else run eager; required = refuse to start without it (production); compile = build and "
        "publish it on a miss (neuron-serve compile), then load it; off = eager",
    )
    s.add_argument(
        "--draft-model",
        default=None,
        metavar="MANIFEST_URI",
        help="the draft model of --speculation draft: a prepared tp-1 artifact with this model's "
        "tokenizer (e.g. its int8 artifact), served in this process with its own KV cache",
    )
    s.add_argument(
        "--graphs-store",
        default=None,
        metavar="STORE_URI",
        help="store holding graph sets (default: the manifest's store)",
    )
    s.add_argument("--metrics-port", type=int, default=0, metavar="M", help="Prometheus port (0 = off)")
    s.add_argument(
        "--http-port",
        type=int,
        default=0,
        metavar="P",
        help="OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models) on this port, "
        "beside gRPC, with the same TLS and bearer tokens (0 = off, the default)",
    )
    s.add_argument("--grace-period", type=float, default=30.0, metavar="S", help="drain timeout on SIGTERM")
    s.add_argument("--max-waiting-requests", type=int, default=256, metavar="N")
    s.add_argument(
        "--load-attempts",
        type=int,
        default=5,
        metavar="N",
        help="tries when the store fails while loading, with backoff (default 5); a missing or damaged "
        "artifact is not retried: the process exits 1 with the reason",
    )
    s.add_argument("--log-level", default="INFO")
    from shared.grpc_util import add_security_arguments

    add_security_arguments(s)
    s.set_defaults(func=cmd_exec_server, parser=s)

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

    from exec_service.graph_sets.cli import register as register_compile

    register_compile(sub)


def cmd_exec_server(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    shape = serving_shape_from_args(args, parser)  # exits 2 before anything binds a port
    for flag, value, lo in (
        ("--port", args.port, 0),
        ("--metrics-port", args.metrics_port, 0),
        ("--http-port", args.http_port, 0),
        ("--max-waiting-requests", args.max_waiting_requests, 0),
        ("--load-attempts", args.load_attempts, 1),
    ):
        if value < lo or (flag.endswith("port") and value > 65535):
            parser.error(f"{flag}: {value} is out of range")
    if args.grace_period < 0:
        parser.error(f"--grace-period: must be >= 0, got {args.grace_period}")
    if (shape.speculation == "draft") != bool(args.draft_model):
        parser.error("--draft-model: needed by --speculation draft, and only by it")
    if args.device == "neuron":  # rank 0's NeuronCore and caches, before anything imports torch
        from exec_service.runtime.neuron import sdk

        try:
            sdk.apply(sdk.from_environ().for_rank(0, 1, sdk.container_cores()))
        except sdk.NeuronConfigError as e:
            print(f"error: --device neuron: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT

    from exec_service.server import LoadFailed, ServeConfig, serve
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
        max_batch_size=shape.max_batch_size,
        max_seq_len=shape.max_seq_len,
        context_buckets=shape.context_buckets,
        kv_buckets=shape.kv_buckets,
        batch_buckets=shape.batch_buckets,
        speculation=shape.speculation,
        num_speculative_tokens=shape.num_speculative_tokens,
        draft_model=args.draft_model,
        graphs=args.graphs,
        graphs_store=args.graphs_store,
        metrics_port=args.metrics_port,
        http_port=args.http_port or None,  # 0 = off
        grace_s=args.grace_period,
        max_waiting_requests=args.max_waiting_requests,
        load_attempts=args.load_attempts,
    )
    try:
        asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except LoadFailed as e:  # permanent: the pod crash-loops with the cause in its log
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # e.g. the port is taken
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
