"""Compile every graph of one serving-shape set in this process and write the graph set's files.

Run in a process of its own (``neuron-serve compile``): it must start from an empty Inductor cache
directory (``compiled.fresh_cache_dir``), so that what it captures is complete — every kernel
library built — and belongs to these graphs only. Every rank compiles (tp > 1: the worker ranks run
the same graphs, meeting the same collectives); rank 0's caches are captured, which serve every
rank because every rank's graph is the same program (DESIGN §5: the rank is a tensor).

neuron: the same loop on TorchNeuron (every rank process on its NeuronCore, or compile-only on a
CPU host with the SDK), from an empty NEFF cache directory, whose NEFFs the graph set carries.

With ``prefer="fastest"`` (tp = 1, cpu) every graph is then timed, compiled and eager interleaved, in a
fresh process that loads the captured files as a server would (``timing``), and ``run = "eager"``
is recorded for a graph whose eager path measured clearly faster (by more than ``1 -
EAGER_MARGIN``), so loading a graph set does not make a step slower.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exec_service.artifact import Artifact
from exec_service.graph_sets.key import graph_key, key_inputs
from exec_service.graph_sets.manifest import GraphEntry, GraphSetManifest
from exec_service.graph_sets.store import file_entries
from exec_service.runtime.compiled import (
    COMPILED,
    EAGER,
    capture,
    inductor_cache_dir,
    neff_cache_dir,
    neff_files,
)
from exec_service.runtime.executor import LocalExecutor, TPExecutor
from exec_service.runtime.graphs import GraphSpec, example_step
from exec_service.runtime.runner import RuntimeConfig

PREFER = ("fastest", "compiled")
# "fastest" keeps a graph eager only when eager measured clearly faster: step times on a shared
# 2-core host swing by several percent between two timings of one graph
EAGER_MARGIN = 0.95
Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Built:
    directory: Path
    manifest: GraphSetManifest


def config_key(artifact: Artifact, config: RuntimeConfig) -> tuple[str, dict[str, Any]]:
    inputs = key_inputs(artifact.arch, artifact.target, config)
    return graph_key(inputs), inputs


def build(
    artifact: Artifact,
    config: RuntimeConfig,
    prefer: str = "fastest",
    progress: Progress | None = None,
    directory: Path | None = None,
) -> Built:
    if prefer not in PREFER:
        raise ValueError(f"prefer must be one of {', '.join(PREFER)}, got {prefer!r}")
    if config.backend == "neuron":
        if neff_files():
            raise RuntimeError(
                f"neuron graph sets are compiled from an empty NEFF cache directory, and {neff_cache_dir()} "
                "already holds NEFFs (run the build as its own process: neuron-serve compile)"
            )
    else:
        cache = inductor_cache_dir()
        if any((cache / d).exists() for d in ("fxgraph", "aotautograd")):  # (ISA probes may be there)
            raise RuntimeError(
                f"graph sets are compiled from an empty Inductor cache directory, and {cache} already "
                "holds compiled graphs (run the build as its own process: neuron-serve compile)"
            )
    emit = progress or (lambda event: None)
    cfg = dataclasses.replace(config, compile=True, graphs=None)
    key, inputs = config_key(artifact, cfg)
    specs = cfg.graph_specs()
    emit({"event": "start", "key": key, "total": len(specs)})
    started = time.perf_counter()
    executor = TPExecutor(artifact, cfg) if artifact.target.tp_degree > 1 else LocalExecutor(artifact, cfg)
    compile_s: dict[str, float] = {}
    try:
        for i, spec in enumerate(specs, start=1):
            emit({"event": "graph", "index": i, "total": len(specs), "name": spec.name, "state": "compiling"})
            t = time.perf_counter()
            executor.run(spec, example_step(spec))  # compiles (every rank)
            # neuron: the runner compiled every graph at its start (warm-up); count that time
            warm = executor.runner.warm_up_s.get(spec.name, 0.0)
            compile_s[spec.name] = round(time.perf_counter() - t + warm, 2)
            emit(
                {
                    "event": "graph",
                    "index": i,
                    "total": len(specs),
                    "name": spec.name,
                    "state": "done",
                    "compile_s": compile_s[spec.name],
                }
            )
        out = Path(directory or tempfile.mkdtemp(prefix=f"neuron-serve-graphset-{key[:8]}-"))
        out.mkdir(parents=True, exist_ok=True)
        capture(out, cfg.backend)
    finally:
        executor.close()
    files = file_entries(out)
    times: dict[str, tuple[float, float]] = {}
    # eager vs compiled timing is a cpu question (neuron has no eager serving path)
    if prefer == "fastest" and artifact.target.tp_degree == 1 and cfg.backend == "cpu":
        emit({"event": "timing", "total": len(specs)})
        times = _time_in_fresh_process(artifact, cfg, key, out, specs)
    entries = []
    for spec in specs:
        compiled_ms, eager_ms = times.get(spec.name, (None, None))
        eager_faster = (
            eager_ms is not None and compiled_ms is not None and eager_ms < EAGER_MARGIN * compiled_ms
        )
        run = EAGER if eager_faster else COMPILED
        entries.append(
            GraphEntry.of(
                spec, run=run, compile_s=compile_s[spec.name], compiled_ms=compiled_ms, eager_ms=eager_ms
            )
        )
        if times:
            emit(
                {
                    "event": "timed",
                    "name": spec.name,
                    "compiled_ms": compiled_ms,
                    "eager_ms": eager_ms,
                    "run": run,
                }
            )
    manifest = GraphSetManifest(
        graph_key=key,
        key_inputs=inputs,
        graphs=tuple(entries),
        files=files,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        compile_s=round(time.perf_counter() - started, 2),
        extra={"prefer": prefer, "built_from": artifact.uri},
    )
    return Built(out, manifest)


def _time_in_fresh_process(
    artifact: Artifact, cfg: RuntimeConfig, key: str, directory: Path, specs: list[GraphSpec]
) -> dict[str, tuple[float, float]]:
    """Step times of every graph, compiled (loaded from the files just captured) and eager,
    measured in a new process as a server would run them: the compiling process itself is no place
    to time (its compiler threads leave OpenMP pools behind that slow every step, eager too: a
    SmolLM2 greedy decode step 52-65 ms there against 45-48 ms in a fresh process)."""
    job = {
        "manifest_uri": artifact.uri,
        "config": _config_json(cfg),
        "key": key,
        "directory": str(directory),
        "graphs": [spec.name for spec in specs],
    }
    proc = subprocess.run(
        [sys.executable, "-m", "exec_service.graph_sets.timing"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="neuron-serve-timing-")},
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"timing the graphs failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    return {name: (c, e) for name, (c, e) in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def _config_json(cfg: RuntimeConfig) -> dict[str, Any]:
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("graphs", "compile")}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
