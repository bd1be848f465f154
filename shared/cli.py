"""``neuron-serve``: one command line, subcommands contributed by the service packages.

Each module in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its subcommands and
sets ``func`` (``func(args) -> int`` exit status) on each. Adding a module is one line here; a module
that is not installed (yet) is skipped. Heavy imports (torch, transformers) belong inside the
``func``s so that ``--help`` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
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
    return parser


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
