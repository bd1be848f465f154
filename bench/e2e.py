"""End to end, the numbers a user sees: transformers ``generate`` vs our exec-server through gRPC vs
the engine alone, on SmolLM2-135M-Instruct fp32 (the ``bench.common.smollm2_manifest()`` artifact),
at 1 and 8 concurrent requests, in ONE run.

    .venv/bin/python -m bench.e2e [--streams 1,8] [--prompt 128] [--new 128] [--reps 3]
                                  [--max-batch-size 8] [--max-seq-len L] [--server-args "..."]
                                  [--quantize int8]

Each load level S (``--streams``) runs three sides on the same S prompts (``prompt_ids(P, seed=i)``,
as bench.decode), greedy, EOS masked the same way on every side (``min_new_tokens =
max_new_tokens``: EOS cannot be chosen before the last token, so no request stops early and the
tokens stay comparable; ``ignore_eos`` alone would let EOS be chosen, where transformers masks it):

* **transformers** ``generate`` at batch S (built and timed as in bench.decode);
* **served**: the real ``neuron-serve exec-server`` CLI, started once as a subprocess (what a user
  runs: its own process and GIL, the CLI's defaults; nothing of the bench process in its way) with
  ``--max-batch-size 8 --max-seq-len L --context-buckets P``; the client (this process) sends S
  ``Generate`` calls together on one channel (``prompt_token_ids``);
* **engine**: ``Engine`` in this process with the RuntimeConfig the server builds from the same
  exec-server arguments (parsed by the CLI's own parser, through ``ServeConfig.runtime_config()``),
  S requests added at once and ``step()`` until done.

End-to-end tokens/s = S x N / (last token of the last request - the moment the requests were sent /
``generate`` was called): prefill included. TTFT p50 is over the S requests, ITL p50 over every gap
between a request's consecutive tokens (a message of k tokens counts k gaps of 1/k each). Each side
is warmed up (the server also warms its graphs at start), then the sides alternate within the run
(the order rotates each repetition) and every cell is the median of ``--reps`` runs; the ratios
are ratios of those medians. The load average is printed at the start and the end; the run is
appended to ``bench/results/e2e.jsonl``.

Shapes: the context bucket is the prompt length P and max_seq_len defaults to P + N rounded up to a
multiple of P (128 + 128 -> 256), the same for the server and the engine; GetModelInfo's shape is
checked against the engine's config. ``--server-args`` adds exec-server flags (e.g.
``"--batch-buckets 8"``); shape flags among them reach the engine too.

``--quantize int8`` serves (and runs the engine on) the int8 weight-only artifact of the same model;
transformers stays fp32, so its ratios are against transformers fp32 (issue 9's targets) and its
token checks against transformers are informational. The summary also gives the TTFT ratio (with
``--prompt 512 --streams 1``: issue 15's TTFT target).

Token checks: served = transformers at batch 1 (a mismatch is reported, not hidden); served =
engine at every load; served = transformers at batch > 1 is informational (transformers' batched
GEMMs round differently from its batch-1 path, see docs/PERFORMANCE.md a).

Run it alone on an idle machine (``flock /tmp/bench.lock …``): both processes share the 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import ROOT, hf_model, prompt_ids, record, smollm2_manifest, table

SIDES = ("transformers", "served", "engine")
# (ratio name, numerator, denominator, target per load); served/transformers per weight format: fp32
# (issue 15's targets with a loaded graph set) and int8 (issue 9's, against transformers fp32)
RATIOS = (
    ("served/transformers", "served", "transformers", {1: 1.8, 8: 1.9}),
    ("served/engine", "served", "engine", {1: 0.95, 8: 0.95}),
    ("engine/transformers", "engine", "transformers", {}),
)
INT8_TARGETS = {1: 3.5, 8: 2.4}
TTFT_TARGET = 0.8  # served TTFT / transformers TTFT (issue 15: a 512-token prompt, --prompt 512)
SERVICE = "neuronserve.exec.v1.ExecService"


@dataclass
class Run:
    """One timed run of one side at one load: per-request tokens (in prompt order) and timings."""

    tokens: list[list[int]]
    wall: float  # seconds from sending the requests / calling generate to the last token
    ttft: list[float]  # per request
    itl: list[float] = field(default_factory=list)  # per token after each request's first message

    @property
    def tok_s(self) -> float:
        return sum(len(t) for t in self.tokens) / self.wall


# -- shapes -----------------------------------------------------------------------------------------


def default_seq_len(prompt: int, new: int) -> int:
    return -(-(prompt + new) // prompt) * prompt  # a multiple of the context bucket (= the prompt)


def server_argv(uri: str, port: int, args: argparse.Namespace, seq: int) -> list[str]:
    return [
        "exec-server",
        "--model",
        uri,
        "--port",
        str(port),
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-seq-len",
        str(seq),
        "--context-buckets",
        str(args.prompt),
        "--grace-period",
        "1",
        *shlex.split(args.server_args),
    ]


def runtime_config_for(argv: list[str]):
    """The RuntimeConfig an exec-server started with ``argv`` builds: the CLI's own parser and shape
    check, then ``ServeConfig.runtime_config()`` (every ServingShape field ServeConfig also has)."""
    from exec_service import cli as exec_cli
    from exec_service.server import ServeConfig

    parser = argparse.ArgumentParser(prog="neuron-serve")
    exec_cli.register(parser.add_subparsers())
    a = parser.parse_args(argv)
    shape = exec_cli.serving_shape_from_args(a, a.parser)
    names = {f.name for f in dataclasses.fields(ServeConfig)}
    kw = {f.name: getattr(shape, f.name) for f in dataclasses.fields(shape) if f.name in names}
    return ServeConfig(manifest_uri=a.model, device=a.device, **kw).runtime_config(), a


def with_graphs(rc, a, art):
    """The engine side runs the graphs the server runs (``--graphs``, ``--graphs-store``): the same
    graph set, chosen by the same policy."""
    from exec_service.graph_sets.policy import choose

    choice = choose(a.graphs, art, rc, a.graphs_store)
    return dataclasses.replace(rc, graphs=choice.graphs), choice


# -- transformers ---------------------------------------------------------------------------------


class _Stamps:
    """A transformers StoppingCriteria that records when each token was produced."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def __call__(self, input_ids, scores, **kw):
        import torch

        self.t.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def run_transformers(model, prompts: list[list[int]], new: int) -> Run:
    import torch
    from transformers import StoppingCriteriaList

    ids = torch.tensor(prompts)
    st = _Stamps()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,  # EOS ignored
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([st]),
            pad_token_id=0,
        )
    gaps = [b - a for a, b in zip(st.t, st.t[1:], strict=False)]
    return Run(
        tokens=out[:, ids.shape[1] :].tolist(),
        wall=st.t[-1] - t0,
        ttft=[st.t[0] - t0] * len(prompts),
        itl=gaps * len(prompts),
    )


# -- the engine alone -------------------------------------------------------------------------------


def run_engine(engine, prompts: list[list[int]], new: int) -> Run:
    from exec_service.engine import Request, SamplingParams, StoppingCriteria

    stop = StoppingCriteria(max_new_tokens=new, min_new_tokens=new)  # EOS masked (not stopped at)
    t0 = time.perf_counter()
    rids = [engine.add_request(Request(tuple(p), SamplingParams(temperature=0.0), stop)) for p in prompts]
    tokens: dict[str, list[int]] = {r: [] for r in rids}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    itl: list[float] = []
    end = t0
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            k = len(o.new_token_ids)
            if not k:
                continue
            if o.request_id in last:
                itl += [(now - last[o.request_id]) / k] * k
            else:
                first[o.request_id] = now
            last[o.request_id] = now
            tokens[o.request_id].extend(o.new_token_ids)
            end = now
    return Run([tokens[r] for r in rids], end - t0, [first[r] - t0 for r in rids], itl)


# -- the server -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``neuron-serve exec-server …`` as a subprocess; its output goes to a log file."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        exe = Path(sys.executable).with_name("neuron-serve")
        self.cmd = ([str(exe)] if exe.exists() else [sys.executable, "-m", "shared.cli"]) + argv
        fd, self.log_path = tempfile.mkstemp(prefix="bench-e2e-server-", suffix=".log")
        self._log = os.fdopen(fd, "w")
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=env or os.environ.copy()
        )

    def log_tail(self, n: int = 30) -> str:
        self._log.flush()
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])

    async def wait_ready(self, channel, timeout: float) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"exec-server exited with {self.proc.returncode} while loading:\n{self.log_tail()}"
                )
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except Exception:  # not bound yet / still loading
                pass
            await asyncio.sleep(0.5)
        raise RuntimeError(f"exec-server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: drain (nothing in flight) and exit
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


async def run_served(stub, pb, prompts: list[list[int]], new: int) -> Run:
    reqs = [
        pb.GenerateRequest(
            prompt_token_ids=pb.TokenIds(ids=p),
            sampling=pb.SamplingParams(temperature=0.0),
            stopping=pb.StoppingCriteria(max_new_tokens=new, min_new_tokens=new),
        )
        for p in prompts
    ]

    async def one(req, t0: float) -> tuple[list[int], float, float, list[float]]:
        toks: list[int] = []
        first = last = None
        itl: list[float] = []
        async for msg in stub.Generate(req):
            k = len(msg.token_ids)
            if not k:
                continue
            now = time.perf_counter()
            if last is None:
                first = now
            else:
                itl += [(now - last) / k] * k
            last = now
            toks.extend(msg.token_ids)
        assert first is not None and last is not None, "a stream without tokens"
        return toks, first - t0, last, itl

    t0 = time.perf_counter()
    res = await asyncio.gather(*(one(r, t0) for r in reqs))
    return Run(
        tokens=[r[0] for r in res],
        wall=max(r[2] for r in res) - t0,
        ttft=[r[1] for r in res],
        itl=[x for r in res for x in r[3]],
    )


SHAPE_FIELDS = ("max_batch_size", "max_seq_len", "context_buckets", "kv_buckets", "batch_buckets")


def served_shape(info) -> dict:
    """The serving-shape fields GetModelInfo reports (those this proto has)."""
    have = info.DESCRIPTOR.fields_by_name
    return {
        k: (getattr(info, k) if isinstance(getattr(info, k), int) else list(getattr(info, k)))
        for k in SHAPE_FIELDS
        if k in have
    }


def shape_diffs(served: dict, rc) -> list[str]:
    """Differences between the server's shape (GetModelInfo) and the engine's RuntimeConfig."""
    diffs = []
    for k in SHAPE_FIELDS:
        if not hasattr(rc, k):
            continue
        mine = getattr(rc, k)
        mine = mine if isinstance(mine, int) else list(mine)
        if k not in served:
            diffs.append(f"{k}: not in ModelInfo (engine: {mine})")
        elif served[k] != mine:
            diffs.append(f"{k}: server {served[k]} vs engine {mine}")
    return diffs


# -- summary ----------------------------------------------------------------------------------------


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _row(side: str, streams: int, runs: list[Run]) -> dict:
    return {
        "side": side,
        "streams": streams,
        "tok_s": _median([r.tok_s for r in runs]),
        "wall_s": _median([r.wall for r in runs]),
        "ttft_p50_ms": 1e3 * _median([_median(r.ttft) for r in runs]),
        "itl_p50_ms": 1e3 * _median([_median(r.itl) for r in runs]),
        "runs_tok_s": [round(r.tok_s, 3) for r in runs],
    }


def _same(a: list[Run], b: list[Run]) -> bool:
    return all(x.tokens == y.tokens for x in a for y in b)


def _first_diff(a: list[list[int]], b: list[list[int]]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        for j, (u, v) in enumerate(zip(x, y, strict=False)):
            if u != v:
                return f"request {i}, token {j}: {u} vs {v}"
        if len(x) != len(y):
            return f"request {i}: {len(x)} vs {len(y)} tokens"
    return "equal"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="1,8", help="load levels: concurrent requests (default 1,8)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens = the context bucket")
    ap.add_argument("--new", type=int, default=128, help="new tokens per request (EOS ignored)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per side and load (median)")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument(
        "--max-seq-len", type=int, default=0, help="default: prompt + new rounded up to a multiple of prompt"
    )
    ap.add_argument("--server-args", default="", help='more exec-server flags, e.g. "--batch-buckets 8"')
    ap.add_argument("--ready-timeout", type=float, default=900.0, help="seconds for the server to load")
    ap.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="serve the int8 weight-only artifact (prepare --quantize int8); transformers stays fp32",
    )
    args = ap.parse_args()
    loads = [int(x) for x in args.streams.split(",")]
    if args.prompt < 2 or args.new < 1 or args.reps < 1 or min(loads) < 1:
        ap.error("--prompt >= 2, --new >= 1, --reps >= 1 and every --streams >= 1")
    seq = args.max_seq_len or default_seq_len(args.prompt, args.new)
    if seq < args.prompt + args.new:
        ap.error(f"--max-seq-len {seq} < prompt + new ({args.prompt + args.new})")

    load_start = os.getloadavg()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load_start)}", flush=True)

    uri = smollm2_manifest("float32", quantize=None if args.quantize == "none" else args.quantize)
    argv = server_argv(uri, free_port(), args, seq)
    rc, served_args = runtime_config_for(argv)  # a bad shape exits 2 here, naming the flag, first
    server = ServerProcess(argv)
    print(f"server: {shlex.join(server.cmd)}  (log: {server.log_path})", flush=True)
    try:
        runs, served_info, rc = _measure(args, loads, uri, argv, rc, served_args, server)
    finally:
        server.stop()  # before record(): its "busy" list should not show our own server
    _report(args, loads, runs, served_info, rc, shlex.join(server.cmd), load_start)


def _measure(args, loads, uri, argv, rc, served_args, server: ServerProcess):
    """Every side at every load, warmed up, then ``--reps`` alternating timed runs each."""
    import grpc

    from exec_service.artifact import open_artifact
    from exec_service.engine import Engine
    from protos import exec_pb2 as pb
    from protos import exec_pb2_grpc

    prompts = [prompt_ids(args.prompt, seed=i) for i in range(max(loads))]
    # load the in-process sides while the server loads (untimed)
    hf = hf_model("float32")
    art = open_artifact(uri)
    rc, graphs = with_graphs(rc, served_args, art)
    print(f"graphs: {graphs.origin} ({graphs.count} compiled, key {graphs.key})", flush=True)
    engine = Engine(art, rc, eos_token_ids=art.eos_token_ids)  # as the server builds its engine
    engine.warm_up_compiled()
    aio = asyncio.new_event_loop()
    port = int(argv[argv.index("--port") + 1])
    channel = None
    try:

        async def connect():
            ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            await server.wait_ready(ch, args.ready_timeout)
            stub = exec_pb2_grpc.ExecServiceStub(ch)
            return ch, stub, await stub.GetModelInfo(pb.GetModelInfoRequest())

        channel, stub, info = aio.run_until_complete(connect())
        model_info = served_shape(info)
        model_info["graphs"] = {
            "key": info.graphs.key,
            "origin": info.graphs.origin,
            "count": info.graphs.count,
        }
        diffs = shape_diffs(model_info, rc)
        for d in diffs:
            print(f"WARNING: server and engine shapes differ: {d}", flush=True)
        print(f"server shape (GetModelInfo): {model_info}", flush=True)

        def side_run(side: str, n: int, new: int) -> Run:
            ps = prompts[:n]
            if side == "transformers":
                return run_transformers(hf, ps, new)
            if side == "engine":
                return run_engine(engine, ps, new)
            return aio.run_until_complete(run_served(stub, pb, ps, new))

        warm_new = min(4, args.new)
        for n in loads:  # warm-up: every side at every load, untimed
            for side in SIDES:
                side_run(side, n, warm_new)

        runs: dict[tuple[str, int], list[Run]] = {(s, n): [] for s in SIDES for n in loads}
        for rep in range(args.reps):
            for n in loads:
                order = SIDES[rep % 3 :] + SIDES[: rep % 3]  # alternate, rotating who goes first
                for side in order:
                    r = side_run(side, n, args.new)
                    runs[(side, n)].append(r)
                    print(
                        f"rep {rep + 1}/{args.reps} streams {n:>2} {side:<12} {r.tok_s:8.2f} tok/s  "
                        f"wall {r.wall:6.2f} s  ttft p50 {1e3 * _median(r.ttft):7.0f} ms  "
                        f"itl p50 {1e3 * _median(r.itl):6.1f} ms",
                        flush=True,
                    )
    finally:
        if channel is not None:
            aio.run_until_complete(channel.close())
        aio.close()
        engine.close()
    return runs, model_info, rc


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    return sorted(d) if isinstance(d, (set, frozenset)) else d


def _report(args, loads, runs, model_info: dict, rc, server_cmd: str, load_start) -> None:
    diffs = shape_diffs(model_info, rc)
    rows = [_row(s, n, runs[(s, n)]) for n in loads for s in SIDES]
    by = {(r["side"], r["streams"]): r for r in rows}
    summary, checks = [], {}
    for n in loads:
        s = {"streams": n}
        for side in SIDES:
            s[f"{side}_tok_s"] = by[(side, n)]["tok_s"]
        for name, a, b, targets in RATIOS:
            s[name] = by[(a, n)]["tok_s"] / by[(b, n)]["tok_s"]
            if args.quantize == "int8" and name == "served/transformers":
                targets = INT8_TARGETS
            if n in targets:
                s[f"{name} target"] = f">= {targets[n]} {'met' if s[name] >= targets[n] else 'MISSED'}"
        s["ttft served/transformers"] = (
            by[("served", n)]["ttft_p50_ms"] / by[("transformers", n)]["ttft_p50_ms"]
        )
        if n == 1 and args.prompt >= 512:
            met = s["ttft served/transformers"] <= TTFT_TARGET
            s["ttft target"] = f"<= {TTFT_TARGET} {'met' if met else 'MISSED'}"
        summary.append(s)
        sv, tf, en = runs[("served", n)], runs[("transformers", n)], runs[("engine", n)]
        checks[f"served==transformers b{n}"] = (
            "same" if _same(sv, tf) else "DIFFER: " + _first_diff(sv[0].tokens, tf[0].tokens)
        )
        checks[f"served==engine b{n}"] = (
            "same" if _same(sv, en) else "DIFFER: " + _first_diff(sv[0].tokens, en[0].tokens)
        )
    load_end = os.getloadavg()

    cols = ["side", "streams", "tok_s", "wall_s", "ttft_p50_ms", "itl_p50_ms"]
    print()
    print(table(rows, cols))
    print()
    print(table(summary))
    print()
    for k, v in checks.items():
        if v == "same":
            note = ""
        elif k.startswith("served==transformers b") and args.quantize != "none":
            note = "  (informational: int8 weights against transformers fp32)"
        elif k.startswith("served==transformers b") and k != "served==transformers b1":
            note = "  (informational: transformers' batched GEMMs round differently from batch 1)"
        else:
            note = "  <-- MISMATCH"
        print(f"tokens {k}: {v}{note}")
    if diffs:
        print(f"WARNING: shapes differ: {diffs}")
    print(
        f"load average at start: {' '.join(f'{x:.2f}' for x in load_start)}; "
        f"at end: {' '.join(f'{x:.2f}' for x in load_end)}"
    )
    path = record(
        "e2e",
        rows,
        {
            "summary": summary,
            "tokens": checks,
            "args": vars(args),
            "server_cmd": server_cmd,
            "server_shape": model_info,
            "shape_diffs": diffs,
            "runtime_config": _jsonable(dataclasses.asdict(rc)),
            "load_start": load_start,
            "load_end": load_end,
        },
    )
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
