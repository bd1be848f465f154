"""``neuron-serve compile MANIFEST_URI --device D [serving shape] [--output STORE_URI] [--force]``.

Compiles every graph of the serving-shape set and publishes the graph set; the graph set's URI is
the last stdout line, progress per graph goes to stderr (``--progress json``: one JSON object per
line, for the prep service's ``CompileGraphs`` and other batch drivers). Exit 0: published (or
already there); 2: a bad input (named); 1: the compile or the store failed.

``--device neuron`` runs TorchNeuron (a Trn host, or compile-only on a CPU host with the SDK:
``TORCH_NEURONX_COMPILE_ONLY=1 NEURON_PLATFORM_TARGET_OVERRIDE=trn2``) from an empty NEFF cache
directory set before torch is imported. ``--device neuron --stablehlo DIR`` needs no SDK: it lowers
every graph of every rank to StableHLO (``runtime/neuron/stablehlo_export.py``), writes
``DIR/rank-{r:05d}/{graph}.mlir`` and ``DIR/report.json`` (its path is the last stdout line), and
exits 0 only if every graph lowered and passed its checks, else 1 naming each failing graph and op.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT = 0, 1, 2


def register(sub: argparse._SubParsersAction) -> None:
    from exec_service.cli import add_serving_shape_arguments

    c = sub.add_parser(
        "compile",
        help="compile a model's step graphs once and publish them as a graph set",
        description="Compile every step graph of one serving shape (a context graph per context bucket, "
        "the token-generation graphs per batch and KV bucket, their greedy variants, and with --speculation "
        "the verify graphs per batch and KV bucket) and publish "
        "{store}/graphs/{graph_key}/graphs.json with its files, for exec-server --graphs auto|required. "
        "Weights do not enter the graph key: one graph set serves every checkpoint of an architecture.",
    )
    c.add_argument(
        "manifest", metavar="MANIFEST_URI", help="file://… or s3://… manifest.json of a prepared model"
    )
    c.add_argument("--device", choices=("cpu", "cuda", "neuron"), required=True)
    add_serving_shape_arguments(c)
    c.add_argument(
        "--output",
        default=None,
        metavar="STORE_URI",
        help="store to publish to (default: the manifest's store)",
    )
    c.add_argument(
        "--force", action="store_true", help="compile and publish again even if the graph set exists"
    )
    c.add_argument(
        "--prefer",
        choices=("fastest", "compiled"),
        default="fastest",
        help="fastest (default): a graph whose eager path measured faster at build time is recorded to "
        "run eager; compiled: every graph runs compiled",
    )
    c.add_argument("--progress", choices=("text", "json"), default="text", help="stderr progress format")
    c.add_argument(
        "--stablehlo",
        default=None,
        metavar="DIR",
        help="with --device neuron, without the Neuron SDK: lower every graph of every rank to StableHLO "
        "(TorchNeuron's front half: Dynamo, AOTAutograd, torch-mlir) into DIR/rank-NNNNN/GRAPH.mlir and "
        "DIR/report.json instead of compiling and publishing; exit 1 names each graph and op that did not "
        "lower (needs torch-mlir: pip install 'neuron-serve[stablehlo]')",
    )
    c.set_defaults(func=cmd_compile, parser=c)


class _Reporter:
    def __init__(self, fmt: str) -> None:
        self.fmt, self.t0 = fmt, time.monotonic()

    def __call__(self, event: dict) -> None:
        if self.fmt == "json":
            print(json.dumps(event), file=sys.stderr, flush=True)
            return
        kind = event["event"]
        if kind == "start":
            msg = f"graph set {event['key']}: compiling {event['total']} graphs"
        elif kind == "graph" and event["state"] == "compiling":
            msg = f"[{event['index']}/{event['total']}] {event['name']}: compiling…"
        elif kind == "graph":
            msg = (
                f"[{event['index']}/{event['total']}] {event['name']}: compiled in {event['compile_s']:.1f} s"
            )
        elif kind == "timing":
            msg = f"timing the {event['total']} graphs, compiled and eager, in a fresh process…"
        elif kind == "timed":
            msg = (
                f"{event['name']}: step {event['compiled_ms']:.1f} ms compiled, {event['eager_ms']:.1f} ms "
                f"eager -> runs {event['run']}"
            )
        elif kind == "lower-start":
            msg = f"lowering {event['graphs']} graphs x {event['ranks']} rank(s) to StableHLO (tp={event['tp']})"
        elif kind == "lowered":
            state = "ok" if event["ok"] else f"FAILED ({event['op']})"
            msg = f"rank {event['rank']} {event['graph']}: {state} in {event['seconds']:.1f} s"
        elif kind == "exists":
            msg = f"graph set {event['key']} exists: {event['uri']}"
        elif kind == "published":
            msg = f"published {event['uri']} ({event['files']} files, {event['bytes'] / 1e6:.1f} MB)"
        else:
            msg = json.dumps(event)
        print(f"compile [{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def cmd_compile(args: argparse.Namespace) -> int:
    from exec_service.cli import serving_shape_from_args

    parser: argparse.ArgumentParser = args.parser
    shape = serving_shape_from_args(args, parser)  # exit 2 naming the flag
    if args.stablehlo is not None:
        if args.device != "neuron":
            parser.error("--stablehlo: lowers the graphs of --device neuron (TorchNeuron's compiler input)")
        return _cmd_stablehlo(args, shape)
    from exec_service.runtime.compiled import fresh_cache_dir, fresh_neff_cache_dir

    fresh_cache_dir()  # before torch compiles anything here: the build captures all of it
    if args.device == "neuron":  # before torch is imported: TorchNeuron reads its variables then
        from exec_service.runtime.neuron import sdk

        fresh_neff_cache_dir()
        try:
            sdk.apply(sdk.from_environ().for_rank(0, 1, sdk.container_cores()))
        except sdk.NeuronConfigError as e:
            print(f"error: --device neuron: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT

    from exec_service.artifact import ArtifactError, open_artifact
    from exec_service.graph_sets.build import build, config_key
    from exec_service.graph_sets.policy import graph_store_uri
    from exec_service.graph_sets.store import find, graph_set_uri, publish
    from exec_service.runtime.backends import BackendUnavailable, get_backend
    from exec_service.runtime.runner import RuntimeConfig
    from shared.storage import StoreError, open_store

    report = _Reporter(args.progress)
    try:
        get_backend(args.device)
    except (BackendUnavailable, NotImplementedError) as e:
        print(f"error: --device {args.device}: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        artifact = open_artifact(args.manifest)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        config = RuntimeConfig(**shape.fields(), backend=args.device)
        root = graph_store_uri(artifact, args.output)
        store = open_store(root)
    except ValueError as e:
        print(f"error: --output: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        key, _ = config_key(artifact, config)
        if not args.force and find(store, key) is not None:
            uri = graph_set_uri(store, key)
            report({"event": "exists", "key": key, "uri": uri})
            print(uri)
            return EXIT_OK
        built = build(artifact, config, prefer=args.prefer, progress=report)
        uri = publish(store, built.directory, built.manifest, replace=args.force)
    except StoreError as e:
        print(f"error: the store failed: {e}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a graph that does not compile names itself in the progress above
        print(f"error: compile failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    size = sum(f.size for f in built.manifest.files)
    report({"event": "published", "uri": uri, "files": len(built.manifest.files), "bytes": size})
    print(uri)
    return EXIT_OK


def _cmd_stablehlo(args: argparse.Namespace, shape) -> int:
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("torch_mlir") is None:
        print(
            "error: --stablehlo needs torch-mlir (pip install 'neuron-serve[stablehlo]': the torch-mlir "
            "20261001 wheel, Python 3.11)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    from exec_service.artifact import ArtifactError, open_artifact
    from exec_service.runtime.neuron.stablehlo_export import REPORT, export
    from exec_service.runtime.runner import RuntimeConfig

    report = _Reporter(args.progress)
    try:
        artifact = open_artifact(args.manifest)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = Path(args.stablehlo)

    def progress(event: dict) -> None:
        kind = {"start": "lower-start", "graph": "lowered"}[event["event"]]
        report({**event, "event": kind})

    result = export(artifact, RuntimeConfig(**shape.fields(), backend="neuron"), out, progress)
    for g in result["graphs"]:
        if not g["ok"]:
            why = g["error"] or "; ".join(g["violations"])
            print(f"error: rank {g['rank']} graph {g['graph']}: {g['op'] or 'check'}: {why}", file=sys.stderr)
    print(out / REPORT)
    return EXIT_OK if result["ok"] else EXIT_ERROR
