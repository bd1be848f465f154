"""``python -m exec_service.graph_sets.timing`` (JSON job on stdin): the step time of every graph of
a freshly captured graph set, compiled and eager, interleaved, in this new process — what
``build(prefer="fastest")`` decides each graph's ``run`` from. Prints ``{name: [compiled_ms,
eager_ms]}`` as its last stdout line."""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from exec_service.artifact import open_artifact
from exec_service.runtime.compiled import CompiledGraphs
from exec_service.runtime.graphs import CONTEXT, example_step
from exec_service.runtime.runner import Runner, RuntimeConfig


def _median_ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1000, 3)


def main() -> int:
    job = json.loads(sys.stdin.read())
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in job["config"].items()}
    names = frozenset(job["graphs"])
    graphs = CompiledGraphs(job["key"], job["directory"], names)
    artifact = open_artifact(job["manifest_uri"])
    runner = Runner(artifact.arch, artifact.target, artifact.load(0), RuntimeConfig(**cfg, graphs=graphs))
    out: dict[str, list[float]] = {}
    with torch.no_grad():
        for spec in runner.config.graph_specs():
            if spec.name not in names:
                continue
            args = example_step(spec).args(spec)
            compiled, eager = runner.fn(spec), runner.graphs[spec]
            compiled(*args)  # the load (Dynamo trace) and first-call costs
            eager(*args)
            tc: list[float] = []
            te: list[float] = []
            for _ in range(3 if spec.kind == CONTEXT else 15):
                for fn, times in ((compiled, tc), (eager, te)):
                    t = time.perf_counter()
                    fn(*args)
                    times.append(time.perf_counter() - t)
            out[spec.name] = [_median_ms(tc), _median_ms(te)]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
