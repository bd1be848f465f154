"""``neuron-serve prepare`` (batch conversion) and ``neuron-serve prep-server`` (the gRPC service).

``prepare`` exit status: 0 success (the manifest URI is the last stdout line), 2 bad input (argument
errors and PrepError, "error: ..." on stderr naming the file or tensor), 130 interrupted by Ctrl-C
(143 by SIGTERM; the pipeline is cancelled and nothing is published), 1 unexpected errors.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
import traceback

from prep_service.api import DTYPES, GQA_STRATEGIES, PrepareRequest, PrepCancelled, PrepError
from prep_service.progress import ProgressPrinter

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="convert a checkpoint into a TP-sharded artifact in a store",
        description="Convert a Hugging Face checkpoint into a TP-sharded artifact and publish it to a "
        "store. Prints the manifest URI as the last line of stdout.",
    )
    p.add_argument(
        "source", metavar="SOURCE", help="HF repo id, local directory, s3://..., file://... or a .gguf file"
    )
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel degree (default 1)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="target dtype (default float32)")
    p.add_argument(
        "--output",
        metavar="STORE_URI",
        default=None,
        help="store URI, file://... or s3://... (default: the local default store)",
    )
    p.add_argument("--revision", metavar="R", default=None, help="branch, tag or commit of a hub source")
    p.add_argument(
        "--gqa-strategy",
        choices=GQA_STRATEGIES,
        default=None,
        help="how KV heads are spread over TP ranks (default: chosen from the head counts)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if a finished artifact exists")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow .bin/.pt checkpoints (loaded with torch.load(weights_only=True))",
    )
    p.add_argument("--name", default=None, help="model name in the store (default: derived from SOURCE)")
    p.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help="weight-only int8 (per output channel) for the attention, MLP and expert weights",
    )
    p.add_argument("--quantize-lm-head", action="store_true", help="with --quantize: also the LM head")
    p.add_argument("--log-level", default="WARNING", help="log level on stderr (default WARNING)")
    p.set_defaults(func=cmd_prepare)

    s = sub.add_parser(
        "prep-server",
        help="run the prep gRPC service",
        description="Run the PrepService gRPC server until SIGTERM/SIGINT, then drain gracefully. "
        "Binds 127.0.0.1 by default; use --host 0.0.0.0 in a container (Kubernetes).",
    )
    s.add_argument("--port", type=int, default=50051, metavar="P", help="gRPC port (default 50051; 0 = any)")
    s.add_argument(
        "--store",
        metavar="STORE_URI",
        default=None,
        help="store for requests that name no output (default: the local default store)",
    )
    s.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 in Kubernetes)"
    )
    s.add_argument(
        "--max-workers", type=int, default=1, metavar="N", help="operations run at once (default 1)"
    )
    s.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        metavar="M",
        help="Prometheus metrics HTTP port (default 0 = off)",
    )
    s.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds running operations get to finish on SIGTERM before they are cancelled (default 30)",
    )
    s.add_argument("--log-level", default="INFO", help="log level on stderr (default INFO)")
    s.add_argument(
        "--allow-output",
        action="append",
        default=[],
        metavar="STORE_URI",
        help="a further store URI prefix requests may publish to (repeatable; the --store is always allowed)",
    )
    s.add_argument(
        "--source-root",
        action="append",
        default=None,
        metavar="DIR",
        help="local directories requests may read checkpoints from (repeatable; default: any — set this in production)",
    )
    s.add_argument(
        "--no-journal",
        action="store_true",
        help="keep operations in memory only (default: journaled under operations/ in the store, so a "
        "restarted server reports them truthfully)",
    )
    from shared.grpc_util import add_security_arguments

    add_security_arguments(s)
    s.set_defaults(func=cmd_prep_server)


# ------------------------------------------------------------------ prepare


class _Terminated(Exception):
    """SIGTERM arrived (raised in the main thread by its handler)."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def cmd_prepare(args: argparse.Namespace) -> int:
    from shared.grpc_util import setup_logging

    setup_logging(args.log_level)
    try:
        req = PrepareRequest(
            source=args.source,
            revision=args.revision,
            output=args.output,
            tp_degree=args.tp,
            dtype=args.dtype,
            gqa_strategy=args.gqa_strategy,
            force=args.force,
            allow_pickle=args.allow_pickle,
            name=args.name,
            quantize=args.quantize,
            quantize_lm_head=args.quantize_lm_head,
        )
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from prep_service.convert import prepare  # heavy (torch): imported only when it runs

    reporter = ProgressPrinter(sys.stderr)
    cancel = threading.Event()
    outcome: dict[str, object] = {}
    finished = threading.Event()

    def work() -> None:
        try:
            outcome["result"] = prepare(req, progress=reporter, cancel=cancel)
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e
        finally:
            finished.set()

    # The pipeline runs in a worker thread so that Ctrl-C (delivered to the main thread) becomes a
    # cancel request the pipeline honours between tensors, instead of an exception at a random point.
    # The main thread waits on an Event, not Thread.join: on Python 3.11 a KeyboardInterrupt inside
    # join() marks a still-running thread as stopped (the bpo-45274 fix releases its lock).
    worker = threading.Thread(target=work, name="prepare", daemon=True)
    interrupted: int | None = None
    old_term = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        try:
            worker.start()
            while not finished.wait(0.2):
                pass
        except (KeyboardInterrupt, _Terminated) as e:
            interrupted = EXIT_SIGINT if isinstance(e, KeyboardInterrupt) else EXIT_SIGTERM
            cancel.set()
        if interrupted is not None:
            try:
                reporter.close()
                print(
                    "interrupted: cancelling, nothing will be published (again to quit at once)",
                    file=sys.stderr,
                )
                while not finished.wait(0.2):
                    if not worker.is_alive():  # the signal came before the thread could start
                        break
            except (KeyboardInterrupt, _Terminated):
                return interrupted
    finally:
        signal.signal(signal.SIGTERM, old_term)
        reporter.close()

    if interrupted is not None and "result" not in outcome:
        # The pipeline raised PrepCancelled (or never started): nothing was published.
        err = outcome.get("error")
        if err is not None and not isinstance(err, PrepCancelled):
            print(f"error while cancelling: {type(err).__name__}: {err}", file=sys.stderr)
        print("cancelled: nothing was published", file=sys.stderr)
        return interrupted
    err = outcome.get("error")
    if err is None:
        result = outcome["result"]
        if result.reused:
            print(f"reused existing artifact {result.artifact_key}", file=sys.stderr)
        # Last stdout line: scripts take it with `| tail -n1`.
        print(result.manifest_uri, flush=True)
        return EXIT_OK
    if isinstance(err, PrepCancelled):  # cancelled by something other than this process's signals
        print("cancelled: nothing was published", file=sys.stderr)
        return EXIT_SIGINT
    if isinstance(err, PrepError):
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    traceback.print_exception(err, file=sys.stderr)
    print(f"error: unexpected {type(err).__name__}: {err}", file=sys.stderr)
    return EXIT_ERROR


# -------------------------------------------------------------- prep-server


def cmd_prep_server(args: argparse.Namespace) -> int:
    from prep_service.server import AccessPolicy, serve
    from shared.grpc_util import ServerSecurity, setup_logging
    from shared.security import SecurityConfigError
    from shared.storage import default_store_uri

    setup_logging(args.log_level)
    try:
        security = ServerSecurity.from_args(args)
    except SecurityConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.max_workers < 1:
        print(f"error: --max-workers must be >= 1, got {args.max_workers}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        asyncio.run(
            serve(
                args.port,
                args.store,
                host=args.host,
                max_workers=args.max_workers,
                metrics_port=args.metrics_port,
                grace_s=args.grace_period,
                security=security,
                access=AccessPolicy(
                    outputs=(args.store or default_store_uri(), *args.allow_output),
                    source_roots=tuple(args.source_root) if args.source_root else None,
                ),
                journal=not args.no_journal,
            )
        )
    except KeyboardInterrupt:  # before the signal handlers were installed
        return EXIT_SIGINT
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK
