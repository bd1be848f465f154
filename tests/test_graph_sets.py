"""Graph sets (compiled graphs as artifacts) through the real CLI and real exec-server processes.

One graph set per module, compiled once by `neuron-serve compile` from checkpoint A (seed 3), is
served to checkpoint B (seed 4, same config, other weights): B's server loads A's graphs — the
compiler's own counters say it built none — and is token-exact with transformers on B's weights.
At tp = 2 the same holds through `--graphs compile` (a server that builds and publishes the set)
followed by a `--graphs required` server of the other checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from exec_service.artifact import open_artifact
from exec_service.graph_sets.key import graph_key, key_inputs
from exec_service.graph_sets.manifest import GRAPHS_JSON, GraphSetError, GraphSetManifest
from exec_service.runtime.compiled import CPU_KERNELS, MEGA_CACHE
from exec_service.runtime.runner import RuntimeConfig
from prep_service.api import PrepareRequest
from prep_service.convert import prepare
from protos import exec_pb2, exec_pb2_grpc
from shared.storage import sha256_file
from tests.test_exec_server import hf_greedy, make_served_checkpoint
from tests.test_exec_server_process import _free_port, _log_tail, _wait_ready

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).parent / "neuron-serve"
SHAPE = ("--max-batch-size", "2", "--max-seq-len", "64", "--context-buckets", "16", "--kv-buckets", "64")
CONFIG = RuntimeConfig(max_batch_size=2, max_seq_len=64, context_buckets=(16,), kv_buckets=(64,))
GRAPH_NAMES = sorted(s.name for s in CONFIG.graph_specs())  # ctx b1/b2 s16 k64, tkg b1/b2 (+ greedy)
PROMPTS = [[5, 9, 33, 70, 12, 8, 41], [(i * 7) % 90 + 3 for i in range(23)]]  # 23 > 16: two chunks
N_NEW = 12


def _env(cache_dir: Path | None = None) -> dict[str, str]:
    env = os.environ.copy()
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir or tempfile.mkdtemp(prefix="ind-test-"))
    return env


def _compile(manifest: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(EXE), "compile", manifest, "--device", "cpu", *SHAPE, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=600,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("graphsets")
    out: dict = {"root": d, "store": f"file://{d}/store"}
    for seed in (3, 4):
        out[seed] = make_served_checkpoint(d / f"ckpt{seed}", seed=seed)
        for tp in (1, 2):
            out[seed, tp] = prepare(
                PrepareRequest(source=str(d / f"ckpt{seed}"), tp_degree=tp, output=out["store"])
            ).manifest_uri
    return out


@pytest.fixture(scope="module")
def graph_set(models) -> dict:
    """`neuron-serve compile` of checkpoint A (tp 1), every graph recorded to run compiled."""
    t = time.monotonic()
    proc = _compile(models[3, 1], "--prefer", "compiled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    uri = proc.stdout.strip().splitlines()[-1]
    path = Path(uri.removeprefix("file://"))
    return {"uri": uri, "dir": path.parent, "stderr": proc.stderr, "seconds": time.monotonic() - t}


def _serve(
    manifest: str, *flags: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, int, int]:
    port, mport = _free_port(), _free_port()
    log = tempfile.NamedTemporaryFile(prefix="exec-server-", suffix=".log", delete=False)  # noqa: SIM115
    cmd = [str(EXE), "exec-server", "--model", manifest, "--port", str(port), "--metrics-port", str(mport)]
    proc = subprocess.Popen(
        [*cmd, *SHAPE, *flags], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env or _env()
    )
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc, port, mport


def _generate_all(port: int, proc: subprocess.Popen) -> tuple[exec_pb2.ModelInfo, list[list[int]]]:
    async def one(stub, ids):
        req = exec_pb2.GenerateRequest()
        req.prompt_token_ids.ids.extend(ids)
        req.stopping.max_new_tokens = N_NEW
        req.stopping.ignore_eos = True
        return [t async for m in stub.Generate(req) for t in m.token_ids]

    async def main():
        await _wait_ready(port, proc, timeout=400)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = exec_pb2_grpc.ExecServiceStub(ch)
            info = await stub.GetModelInfo(exec_pb2.GetModelInfoRequest())
            tokens = await asyncio.gather(*(one(stub, p) for p in PROMPTS))  # batched together
            return info, tokens

    return asyncio.run(asyncio.wait_for(main(), 500))


def _metric(mport: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
    values = [float(line.split()[-1]) for line in body.splitlines() if line.startswith(name)]
    assert values, f"no {name} in /metrics"
    return values[0]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the key ---------------------------------------------------------------------------------------


def test_graph_key_ignores_weights_and_tracks_what_changes_code(models) -> None:
    a, b = open_artifact(models[3, 1]), open_artifact(models[4, 1])
    assert a.manifest.artifact_key != b.manifest.artifact_key  # different weights ...
    ka, kb = key_inputs(a.arch, a.target, CONFIG), key_inputs(b.arch, b.target, CONFIG)
    assert ka == kb and graph_key(ka) == graph_key(kb)  # ... one graph key
    base = graph_key(ka)

    def changed(path: tuple[str, ...], value) -> str:
        d = json.loads(json.dumps(ka))
        node = d
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        return graph_key(d)

    assert changed(("versions", "torch"), "2.14.0+cpu") != base
    assert changed(("device_target", "inductor_vec_isa"), "avx512") != base
    assert changed(("target", "tp_degree"), 2) != base
    assert changed(("serving_shape", "kv_buckets"), [32, 64]) != base
    assert changed(("backend", "options", "cpu_linear"), "aten") != base
    tp2 = open_artifact(models[3, 2])
    assert graph_key(key_inputs(tp2.arch, tp2.target, CONFIG)) != base


# -- compile ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_publishes_a_complete_graph_set(models, graph_set) -> None:
    m = GraphSetManifest.from_json((graph_set["dir"] / GRAPHS_JSON).read_bytes())
    a = open_artifact(models[3, 1])
    assert m.graph_key == graph_set["dir"].name == graph_key(key_inputs(a.arch, a.target, CONFIG))
    assert m.key_inputs["versions"]["torch"].startswith("2.13")
    assert sorted(g.name for g in m.graphs) == GRAPH_NAMES
    assert all(g.run == "compiled" and g.compile_s > 0 for g in m.graphs)  # --prefer compiled: not timed
    ctx = next(g for g in m.graphs if g.name == "ctx_b2_s16_k64")
    assert ctx.inputs[0] == {"name": "input_ids", "dtype": "int64", "shape": [2, 16]}
    assert {f.path for f in m.files} == {MEGA_CACHE, CPU_KERNELS}
    for f in m.files:  # every file as graphs.json says
        assert sha256_file(graph_set["dir"] / f.path) == f.sha256
        assert (graph_set["dir"] / f.path).stat().st_size == f.size
    for name in GRAPH_NAMES:  # progress per graph on stderr
        assert f"] {name}: " in graph_set["stderr"]

    # the same request again is answered at once with the same URI (nothing compiled)
    t = time.monotonic()
    again = _compile(models[4, 1])  # the other checkpoint: the same key
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip().splitlines()[-1] == graph_set["uri"]
    assert "exists" in again.stderr and "compiling" not in again.stderr
    assert time.monotonic() - t < graph_set["seconds"] / 2


@pytest.mark.slow
def test_graphs_are_timed_in_a_fresh_process(models, graph_set) -> None:
    """What `--prefer fastest` decides from: every graph's compiled and eager step time, measured in
    a new process that loads the graph set's files (no compilation there either)."""
    from exec_service.graph_sets.build import _config_json

    key = graph_set["dir"].name
    job = {
        "manifest_uri": models[4, 1],
        "config": _config_json(CONFIG),
        "key": key,
        "directory": str(graph_set["dir"]),
        "graphs": GRAPH_NAMES,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "exec_service.graph_sets.timing"],
        input=json.dumps(job), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(times) == GRAPH_NAMES
    assert all(c > 0 and e > 0 for c, e in times.values())


def test_compile_refuses_bad_input(tmp_path) -> None:
    proc = _compile(f"file://{tmp_path}/nope/manifest.json")
    assert proc.returncode == 2
    assert "no manifest there" in proc.stderr
    proc = subprocess.run(
        [str(EXE), "compile", "file:///x/manifest.json", "--device", "cpu", "--max-seq-len", "100",
         "--context-buckets", "64"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "--context-buckets" in proc.stderr


def test_graphs_json_is_checked() -> None:
    good = {
        "schema_version": 1,
        "key_inputs": {"a": 1},
        "graph_key": graph_key({"a": 1}),
        "graphs": [],
        "files": [
            {"path": MEGA_CACHE, "size": 1, "sha256": "0" * 64},
            {"path": CPU_KERNELS, "size": 1, "sha256": "0" * 64},
        ],
    }
    GraphSetManifest.from_json(json.dumps(good))
    with pytest.raises(GraphSetError, match="not the hash of its key_inputs"):
        GraphSetManifest.from_json(json.dumps({**good, "key_inputs": {"a": 2}}))
    with pytest.raises(GraphSetError, match="schema_version 7"):
        GraphSetManifest.from_json(json.dumps({**good, "schema_version": 7}))
    with pytest.raises(GraphSetError, match=f"lists no {CPU_KERNELS}"):
        GraphSetManifest.from_json(json.dumps({**good, "files": good["files"][:1]}))


# -- serving ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_other_checkpoint_loads_the_graph_set_and_is_token_exact(models, graph_set) -> None:
    """Checkpoint B's server with --graphs required and an empty compiler cache: every graph comes
    from A's graph set (the compiler built none: Inductor FX-graph cache misses 0) and B's own
    weights give transformers' tokens."""
    proc, port, mport = _serve(models[4, 1], "--graphs", "required")
    try:
        info, tokens = _generate_all(port, proc)
        assert (info.graphs.key, info.graphs.origin, info.graphs.count) == (
            graph_set["dir"].name,
            "loaded",
            len(GRAPH_NAMES),
        )
        assert _metric(mport, "neuron_serve_graph_compiles_at_start") == 0
        assert "(0 built by the compiler here)" in _log_tail(proc)
        expected = [hf_greedy(models[4], p, N_NEW) for p in PROMPTS]
        assert tokens == expected
        assert expected != [hf_greedy(models[3], p, N_NEW) for p in PROMPTS]  # the weights matter
    finally:
        _stop(proc)


def test_required_without_a_graph_set_exits_naming_the_key_and_the_command(models, tmp_path) -> None:
    proc, _, _ = _serve(models[4, 1], "--graphs", "required", "--graphs-store", f"file://{tmp_path}/empty")
    try:
        assert proc.wait(timeout=180) == 1
    finally:
        _stop(proc)
    log = _log_tail(proc)
    assert "--graphs required: no graph set" in log
    assert f"build it with: neuron-serve compile {models[4, 1]} --device cpu --max-batch-size 2" in log


@pytest.mark.slow
def test_a_damaged_graph_set_is_refused(graph_set, models, tmp_path) -> None:
    store = tmp_path / "copy"
    shutil.copytree(graph_set["dir"].parent.parent, store)
    target = store / "graphs" / graph_set["dir"].name / MEGA_CACHE
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    proc, _, _ = _serve(models[4, 1], "--graphs", "auto", "--graphs-store", f"file://{store}")
    try:
        assert proc.wait(timeout=180) == 1
    finally:
        _stop(proc)
    assert f"{MEGA_CACHE}: sha256" in _log_tail(proc) and "does not match graphs.json" in _log_tail(proc)


def test_auto_without_a_graph_set_runs_eager(models, tmp_path) -> None:
    proc, port, _ = _serve(models[4, 1], "--graphs-store", f"file://{tmp_path}/empty")
    try:
        info, tokens = _generate_all(port, proc)
        assert info.graphs.origin == "eager" and info.graphs.count == 0 and len(info.graphs.key) == 32
        assert tokens == [hf_greedy(models[4], p, N_NEW) for p in PROMPTS]
        assert "running eager (build one with: neuron-serve compile" in _log_tail(proc)
    finally:
        _stop(proc)


@pytest.mark.slow
def test_tp2_compile_on_a_miss_then_another_checkpoint_requires_it(models, tmp_path) -> None:
    """tp = 2: A's server compiles the graph set (functional collectives inside the graphs) and
    publishes it; B's server loads it on both ranks and is token-exact with transformers."""
    store = f"file://{tmp_path}/tp2-graphs"
    t = time.monotonic()
    proc, port, _ = _serve(models[3, 2], "--graphs", "compile", "--graphs-store", store)
    try:
        info, tokens = _generate_all(port, proc)
        assert info.graphs.origin == "compiled" and info.tp_degree == 2
        assert tokens == [hf_greedy(models[3], p, N_NEW) for p in PROMPTS]
    finally:
        _stop(proc)
    compiling_s, t = time.monotonic() - t, time.monotonic()
    proc, port, mport = _serve(models[4, 2], "--graphs", "required", "--graphs-store", store)
    try:
        info, tokens = _generate_all(port, proc)
        assert (info.graphs.origin, info.graphs.count) == ("loaded", len(GRAPH_NAMES))
        assert _metric(mport, "neuron_serve_graph_compiles_at_start") == 0
        assert tokens == [hf_greedy(models[4], p, N_NEW) for p in PROMPTS]
    finally:
        _stop(proc)
    # rank 1 loaded too (its own compiles would take about as long as the compiling server's)
    assert time.monotonic() - t < 0.75 * compiling_s
