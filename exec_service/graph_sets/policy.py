"""The exec server's ``--graphs`` modes: which graphs a starting server runs, and from where.

* ``auto`` (default): the graph set of this model's key when the store has it, else eager (cpu,
  cuda; logged, with the command that builds one) — neuron has no eager path: each graph is
  compiled at start;
* ``required``: the graph set or nothing — a missing one is a permanent load failure naming the key
  and the ``neuron-serve compile`` command (the production setting: no pod compiles);
* ``compile``: on a miss, build it (``neuron-serve compile`` as a child process: a fresh compiler
  cache, the same code path as a batch job), publish it for the next pod, and load it;
* ``off``: eager.

Whatever the mode, a found graph set is fetched with every file verified; a damaged one is refused
with the reason (never silently replaced by eager).
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from dataclasses import dataclass

from exec_service.artifact import Artifact
from exec_service.graph_sets.build import config_key
from exec_service.graph_sets.store import fetch, find, graph_set_uri
from exec_service.runtime.compiled import CompiledGraphs
from exec_service.runtime.runner import RuntimeConfig
from shared.manifest import store_root_uri
from shared.shapes import SHAPE_FIELDS, ServingShape
from shared.storage import open_store

log = logging.getLogger("neuron_serve.graphs")

MODES = ("auto", "required", "compile", "off")
LOADED, COMPILED_HERE, EAGER = "loaded", "compiled", "eager"  # GraphSetInfo.origin


class GraphSetMissing(RuntimeError):
    """``--graphs required`` and the store has no graph set of this key."""


@dataclass(frozen=True)
class GraphChoice:
    """What a server runs: ``ModelInfo.graphs`` and the runtime's ``RuntimeConfig.graphs``."""

    key: str
    origin: str  # LOADED | COMPILED_HERE | EAGER
    count: int  # graphs that run compiled
    graphs: CompiledGraphs | None = None
    uri: str = ""


EAGER_GRAPHS = GraphChoice("", EAGER, 0)  # an engine built by the caller (bench): nothing known


def compile_command(manifest_uri: str, config: RuntimeConfig, store_uri: str) -> list[str]:
    """``neuron-serve compile`` for exactly this serving shape (what ``required`` tells the user)."""
    shape = ServingShape(**{f: getattr(config, f) for f in SHAPE_FIELDS})
    return [
        "neuron-serve",
        "compile",
        manifest_uri,
        "--device",
        config.backend,
        *shape.cli_flags(),
        "--output",
        store_uri,
    ]


def graph_store_uri(artifact: Artifact, override: str | None = None) -> str:
    """Where graph sets are looked up and published: ``override``, else the manifest's own store."""
    if override:
        return override
    root = store_root_uri(artifact.uri, artifact.manifest)
    if root is None:
        raise ValueError(
            f"{artifact.uri} is not inside a store's models/ layout: name the graph store (--graphs-store)"
        )
    return root


def choose(mode: str, artifact: Artifact, config: RuntimeConfig, store_uri: str | None = None) -> GraphChoice:
    if mode not in MODES:
        raise ValueError(f"--graphs must be one of {', '.join(MODES)}, got {mode!r}")
    key, _ = config_key(artifact, config)
    if mode == "off":
        return GraphChoice(key, EAGER, 0)
    try:
        root = graph_store_uri(artifact, store_uri)
    except ValueError as e:
        if mode != "auto":
            raise
        log.info("not looking for a graph set: %s; running eager", e)
        return GraphChoice(key, EAGER, 0)
    store = open_store(root)
    manifest = find(store, key)
    origin = LOADED
    if manifest is None:
        command = compile_command(artifact.uri, config, root)
        if mode == "required":
            raise GraphSetMissing(
                f"--graphs required: no graph set {key} in {root} for this model and serving shape; "
                f"build it with: {shlex.join(command)}"
            )
        if mode == "auto":
            if config.backend == "neuron":  # no eager path: TorchNeuron compiles each graph at start
                log.info(
                    "no graph set %s in %s: every graph compiles at start (build one with: %s)",
                    key,
                    root,
                    shlex.join(command),
                )
                return GraphChoice(key, COMPILED_HERE, len(config.graph_specs()))
            log.info(
                "no graph set %s in %s: running eager (build one with: %s)", key, root, shlex.join(command)
            )
            return GraphChoice(key, EAGER, 0)
        log.info("no graph set %s in %s: compiling it (%s)", key, root, shlex.join(command))
        _run_compile(command)
        manifest = find(store, key)
        if manifest is None:
            raise RuntimeError(f"neuron-serve compile finished but {graph_set_uri(store, key)} is not there")
        origin = COMPILED_HERE
    directory = fetch(store, manifest)
    # neuron: a graph the set does not hold would compile at start (minutes per graph): ``required``
    # refuses that too, naming the graph (``CompiledGraphs.check_loaded``)
    graphs = CompiledGraphs(
        key, str(directory), manifest.compiled_names, manifest.backend, strict=mode == "required"
    )
    log.info(
        "graph set %s (%s): %d graphs, %d compiled", key, origin, len(manifest.graphs), len(graphs.compiled)
    )
    return GraphChoice(key, origin, len(graphs.compiled), graphs, graph_set_uri(store, key))


def _run_compile(command: list[str]) -> None:
    argv = [sys.executable, "-m", "shared.cli", *command[1:]]
    # its progress (stderr) goes to this process's log as it happens
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"neuron-serve compile failed (exit {proc.returncode}; its output is above)")
