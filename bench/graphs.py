"""Start time with a graph set: how long an exec-server takes to reach SERVING, in ONE run.

    .venv/bin/python -m bench.graphs [--max-batch-size 8] [--max-seq-len 256] [--context-buckets 128]
                                     [--kv-buckets 256] [--batch-buckets 1,8] [--reps 2]

On SmolLM2-135M-Instruct fp32 (``bench.common.smollm2_manifest()``), the real CLI as a subprocess,
each start with an EMPTY Inductor cache directory of its own (a fresh pod):

* **cold compile**: ``--graphs compile`` against an empty graph store — the server runs
  ``neuron-serve compile`` (every graph of the shape), publishes the graph set and loads it: what
  the first pod of a new model pays (and what every pod paid with JIT compilation);
* **loaded**: ``--graphs required`` against that store: the graph set is fetched (sha256 checked)
  and installed, each graph traced by Dynamo and found in the caches, no compilation
  (``neuron_serve_graph_compiles_at_start`` is read from /metrics and reported);
* **eager**: ``--graphs off``, for reference.

Seconds from process start to readiness SERVING; the ratio cold / loaded is the issue's >= 4x.
Also the graph set's files and sizes and, per graph, the compile time and the compiled / eager step
times recorded in graphs.json. Appends to ``bench/results/graphs.jsonl``. Run it alone
(``flock /tmp/bench.lock …``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import other_load, record, smollm2_manifest, table
from bench.e2e import ServerProcess, free_port


def _start(uri: str, shape: list[str], mode: str, store: str) -> tuple[float, dict]:
    import grpc

    from protos import exec_pb2, exec_pb2_grpc

    port, mport = free_port(), free_port()
    argv = ["exec-server", "--model", uri, "--port", str(port), "--metrics-port", str(mport), *shape]
    argv += ["--graphs", mode, "--graphs-store", store, "--grace-period", "1"]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="bench-graphs-ind-")}
    t0 = time.monotonic()
    server = ServerProcess(argv, env=env)
    try:

        async def ready():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                await server.wait_ready(ch, 3600)
                elapsed = time.monotonic() - t0
                info = await exec_pb2_grpc.ExecServiceStub(ch).GetModelInfo(exec_pb2.GetModelInfoRequest())
                return elapsed, info

        elapsed, info = asyncio.run(ready())
        body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        misses = next(
            float(line.split()[-1])
            for line in body.splitlines()
            if line.startswith("neuron_serve_graph_compiles_at_start")
        )
        return elapsed, {
            "origin": info.graphs.origin,
            "count": info.graphs.count,
            "key": info.graphs.key,
            "compiles_at_start": misses,
        }
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-batch-size", default="8")
    ap.add_argument("--max-seq-len", default="256")
    ap.add_argument("--context-buckets", default="128")
    ap.add_argument("--kv-buckets", default="256")
    ap.add_argument("--batch-buckets", default="1,8")
    ap.add_argument("--reps", type=int, default=2, help="loaded and eager starts (median); cold runs once")
    args = ap.parse_args()
    shape = [
        "--max-batch-size", args.max_batch_size, "--max-seq-len", args.max_seq_len,
        "--context-buckets", args.context_buckets, "--kv-buckets", args.kv_buckets,
        "--batch-buckets", args.batch_buckets,
    ]  # fmt: skip
    load_start = os.getloadavg()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load_start)}", flush=True)
    uri = smollm2_manifest("float32")
    store_dir = Path(tempfile.mkdtemp(prefix="bench-graphs-store-"))
    store = store_dir.as_uri()

    cold_s, cold = _start(uri, shape, "compile", store)
    print(f"cold compile start: {cold_s:.1f} s {cold}", flush=True)
    loaded, eager = [], []
    for _ in range(args.reps):
        s, info = _start(uri, shape, "required", store)
        loaded.append((s, info))
        print(f"loaded start: {s:.1f} s {info}", flush=True)
        s, info = _start(uri, shape, "off", store)
        eager.append((s, info))
        print(f"eager start: {s:.1f} s {info}", flush=True)
    loaded_s = statistics.median(s for s, _ in loaded)
    eager_s = statistics.median(s for s, _ in eager)

    (gjson,) = store_dir.rglob("graphs.json")
    gs = json.loads(gjson.read_text())
    files = [{"path": f["path"], "MB": f["size"] / 1e6} for f in gs["files"]]
    graphs = [
        {k: g[k] for k in ("name", "run", "compile_s", "compiled_ms", "eager_ms")} for g in gs["graphs"]
    ]
    rows = [
        {"start": "cold compile (--graphs compile, empty store)", "seconds": cold_s, **cold},
        {"start": "loaded (--graphs required)", "seconds": loaded_s, **loaded[0][1]},
        {"start": "eager (--graphs off)", "seconds": eager_s, **eager[0][1]},
    ]
    ratio = cold_s / loaded_s
    print()
    print(table(rows, ["start", "seconds", "origin", "count", "compiles_at_start"]))
    print()
    print(table(files))
    print()
    print(table(graphs))
    print()
    print(f"cold / loaded: {ratio:.2f}x (target >= 4: {'met' if ratio >= 4 else 'MISSED'})")
    print(f"graph set build (graphs.json compile_s): {gs['compile_s']:.1f} s for {len(graphs)} graphs")
    path = record(
        "graphs",
        rows,
        {
            "cold_over_loaded": ratio,
            "loaded_all": [s for s, _ in loaded],
            "eager_all": [s for s, _ in eager],
            "files": files,
            "graphs": graphs,
            "shape": shape,
            "load_start": load_start,
            "load_end": os.getloadavg(),
            "other_load": other_load(),
        },
    )
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
