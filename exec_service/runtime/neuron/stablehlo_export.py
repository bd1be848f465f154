"""Every graph of every rank to StableHLO: ``neuron-serve compile MANIFEST --device neuron
--stablehlo DIR`` (no Neuron SDK needed), writing ``DIR/rank-{r:05d}/{graph}.mlir`` and
``DIR/report.json``.

Each rank's model is built from its own shard on cpu with the neuron runtime options (plain
``F.linear``, the ``dequant`` int8 kernel), each graph captured (``capture``) and lowered
(``lowering``), and the lowered module checked (``op_allowlist``). tp > 1: the ranks are traced one
after the other in this process, each under a fake process group of tp ranks (``trace_group``);
since every rank runs the same program, each rank's module must equal rank 0's (``same_as_rank0``
in the report: the one-NEFF-for-all-ranks property, checked).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exec_service.model.collectives import Collectives
from exec_service.model.loading import ShardSource
from exec_service.runtime.graphs import StepGraph, example_inputs
from exec_service.runtime.neuron.capture import CaptureError, capture
from exec_service.runtime.neuron.lowering import LoweringError, lower
from exec_service.runtime.neuron.trace_group import rank_group
from exec_service.runtime.runner import Runner, RuntimeConfig

REPORT = "report.json"
Progress = Callable[[dict[str, Any]], None]


class TraceBackend:
    """The runner's backend while tracing neuron graphs on cpu: graphs run as they are (the lowering
    captures them itself)."""

    name = "neuron"
    warm_up_at_start = False
    compiles_every_graph = False
    device = torch.device("cpu")

    def prepare(self, graph: StepGraph) -> StepGraph:
        return graph

    def place(self, args):
        return tuple(args)

    def serving(self) -> None:
        pass


@dataclass
class GraphResult:
    rank: int
    graph: str
    ok: bool
    seconds: float
    file: str | None = None  # relative to the output directory
    op: str | None = None  # what did not lower
    error: str | None = None
    violations: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    all_reduce: int = 0
    all_gather: int = 0
    mutated: list[dict[str, Any]] = field(default_factory=list)  # {input, output, in_place}
    same_as_rank0: bool | None = None


def neuron_config(config: RuntimeConfig) -> RuntimeConfig:
    """``config`` as the neuron backend runs it (no cpu-only kernels, nothing compiled here)."""
    return dataclasses.replace(config, backend="neuron", compile=False, graphs=None, cpu_linear="aten")


def _versions() -> dict[str, str]:
    import importlib.metadata

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "torch": torch.__version__,
        "torch_mlir": version("torch-mlir"),
        "python": platform.python_version(),
    }


def export(
    source: ShardSource,
    config: RuntimeConfig,
    out: Path,
    progress: Progress | None = None,
    ranks: list[int] | None = None,
) -> dict[str, Any]:
    """Lower every graph of ``config``'s serving shape for every rank of ``source`` (or ``ranks``)
    into ``out``; returns the report (also written to ``out/report.json``). ``report["ok"]``: every
    graph lowered and passed its checks."""
    emit = progress or (lambda event: None)
    cfg = neuron_config(config)
    tp = source.target.tp_degree
    specs = cfg.graph_specs()
    ranks = list(range(tp)) if ranks is None else ranks
    out.mkdir(parents=True, exist_ok=True)
    results: list[GraphResult] = []
    rank0: dict[str, str] = {}
    emit({"event": "start", "graphs": len(specs), "ranks": len(ranks), "tp": tp})
    for rank in ranks:
        rank_dir = out / f"rank-{rank:05d}"
        rank_dir.mkdir(exist_ok=True)
        with rank_group(rank, tp) if tp > 1 else nullcontext() as group:
            comm = Collectives(tp)
            if group is not None:
                comm.bind(group)
            runner = Runner(source.arch, source.target, source.load(rank), cfg, comm, rank, TraceBackend())
            for spec in specs:
                t = time.perf_counter()
                res = GraphResult(rank, spec.name, ok=False, seconds=0.0)
                try:
                    lowered = lower(capture(runner.graphs[spec], example_inputs(spec), spec.name), tp)
                except (CaptureError, LoweringError) as e:
                    res.op = getattr(e, "op", None) or type(e).__name__
                    res.error = str(e)
                except Exception as e:  # a graph that fails in an unforeseen way names itself too
                    res.op = type(e).__name__
                    res.error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
                else:
                    path = rank_dir / f"{spec.name}.mlir"
                    path.write_text(lowered.text)
                    res.file = path.relative_to(out).as_posix()
                    res.violations = lowered.check()
                    res.ok = not res.violations
                    res.ops = lowered.ops
                    res.all_reduce = lowered.collectives.all_reduce
                    res.all_gather = lowered.collectives.all_gather
                    res.mutated = [
                        {
                            "input": lowered.inputs[i].name,
                            "output": o,
                            "in_place": lowered.in_place[lowered.inputs[i].name] is None,
                        }
                        for i, o in lowered.aliases
                    ]
                    if rank == ranks[0]:
                        rank0[spec.name] = lowered.text
                    else:
                        res.same_as_rank0 = lowered.text == rank0.get(spec.name)
                        if not res.same_as_rank0:
                            res.ok = False
                            res.violations.append(f"rank {rank}'s module differs from rank {ranks[0]}'s")
                res.seconds = round(time.perf_counter() - t, 2)
                results.append(res)
                emit(
                    {
                        "event": "graph",
                        **{k: getattr(res, k) for k in ("rank", "graph", "ok", "seconds", "op")},
                    }
                )
    report = {
        "ok": all(r.ok for r in results),
        "tp": tp,
        "ranks": ranks,
        "serving_shape": {
            "max_batch_size": cfg.max_batch_size,
            "max_seq_len": cfg.max_seq_len,
            "context_buckets": list(cfg.context_buckets),
            "kv_buckets": list(cfg.kv_buckets),
            "batch_buckets": list(cfg.batch_buckets),
        },
        "versions": _versions(),
        "graphs": [dataclasses.asdict(r) for r in results],
    }
    (out / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report
