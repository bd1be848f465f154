"""The neuron backend's parts that need no Neuron SDK: the refusal without it, each rank's
environment, the int32 check, the graph key's Neuron fields, neuron graph sets (the NEFF cache as a
file, restored, and the strict check that refuses a graph compiled at start), and the runner's
warm-up. What needs hardware is in bench/neuron_acceptance.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from exec_service.runtime.backends import BackendUnavailable, CpuBackend, get_backend
from exec_service.runtime.compiled import (
    NEFF_CACHE,
    CompiledGraphs,
    GraphSetMiss,
    capture,
    graph_files,
    install,
)
from exec_service.runtime.neuron import sdk
from exec_service.runtime.neuron.backend import check_int32
from exec_service.runtime.runner import Runner, RuntimeConfig
from exec_service.runtime.step_io import StepIOError
from tests.hf_reference import source_from_hf, tiny_hf

EXE = Path(sys.executable).parent / "neuron-serve"
HAVE_SDK = importlib.util.find_spec("torch_neuronx") is not None


@pytest.mark.skipif(HAVE_SDK, reason="torch_neuronx is installed here")
def test_without_the_sdk_the_backend_names_it() -> None:
    with pytest.raises(BackendUnavailable) as e:
        get_backend("neuron")
    assert "torch_neuronx" in str(e.value) and "torch-neuronx 2.13.3" in str(e.value)


def test_cores_per_rank() -> None:
    assert sdk.parse_cores("4-7") == [4, 5, 6, 7]
    assert sdk.parse_cores("0,2, 5-6") == [0, 2, 5, 6]
    for bad in ("a", "3-1", "1,1"):
        with pytest.raises(sdk.NeuronConfigError, match="NEURON_RT_VISIBLE_CORES"):
            sdk.parse_cores(bad)
    assert [sdk.rank_core(r, 2, "4-7") for r in range(2)] == [4, 5]
    assert [sdk.rank_core(r, 2, None) for r in range(2)] == [0, 1]
    with pytest.raises(sdk.NeuronConfigError, match="tp=4 needs one NeuronCore per rank"):
        sdk.rank_core(0, 4, "4-5")


def test_rank_environment() -> None:
    env = sdk.NeuronEnv(neff_cache_dir="/cache/neff", cc_flags="--lnc 1")
    rank1 = env.for_rank(1, 2, "8-9")
    assert rank1[sdk.VISIBLE_CORES] == "9" and rank1[sdk.CONTAINER_CORES] == "8-9"
    assert rank1[sdk.NEFF_CACHE_DIR] == "/cache/neff" and rank1[sdk.NO_FALLBACK] == "1"
    assert rank1[sdk.CC_FLAGS] == "--lnc 1" and (rank1["RANK"], rank1["WORLD_SIZE"]) == ("1", "2")
    assert sdk.COMPILE_ONLY not in rank1
    with pytest.raises(sdk.NeuronConfigError, match=r"rank 2 is not in 0\.\.1"):
        env.for_rank(2, 2)
    # compile-only (a CPU host with the SDK): no core, the target named
    with pytest.raises(sdk.NeuronConfigError, match="NEURON_PLATFORM_TARGET_OVERRIDE"):
        sdk.NeuronEnv("/c", compile_only=True)
    with pytest.raises(sdk.NeuronConfigError, match="trn2, trn3"):
        sdk.NeuronEnv("/c", target="inf2")
    co = sdk.NeuronEnv("/c", compile_only=True, target="trn2").for_rank(0, 1)
    assert co[sdk.COMPILE_ONLY] == "1" and co[sdk.TARGET_OVERRIDE] == "trn2" and sdk.VISIBLE_CORES not in co
    # as the operator set it
    parsed = sdk.from_environ(
        {sdk.NEFF_CACHE_DIR: "/n", sdk.COMPILE_ONLY: "1", sdk.TARGET_OVERRIDE: "trn3", sdk.CC_FLAGS: "-O2"}
    )
    assert parsed == sdk.NeuronEnv("/n", compile_only=True, target="trn3", cc_flags="-O2")
    assert sdk.container_cores({sdk.VISIBLE_CORES: "0"}) == "0"
    assert sdk.container_cores({sdk.VISIBLE_CORES: "0", sdk.CONTAINER_CORES: "0-3"}) == "0-3"


def test_environment_is_applied_before_torch_neuronx(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_neuronx", object())
    with pytest.raises(sdk.NeuronConfigError, match="before torch_neuronx is imported"):
        sdk.apply({"X": "1"})


def test_target_detection(tmp_path) -> None:
    product = tmp_path / "product_name"
    product.write_text("trn2.48xlarge\n")
    assert sdk.detect_target({}, product) == "trn2"
    assert sdk.detect_target({sdk.TARGET_OVERRIDE: "trn3"}, product) == "trn3"
    product.write_text("m7i.large\n")
    assert sdk.detect_target({}, product) is None
    assert sdk.detect_target({}, tmp_path / "absent") is None


def test_int64_inputs_must_fit_int32() -> None:
    ok = (torch.tensor([[0, 2**31 - 1]]), torch.tensor([1.0e12]), torch.tensor([-(2**31)]))
    check_int32(ok)
    with pytest.raises(StepIOError, match=r"positions: values 0\.\.2147483648 do not fit int32"):
        check_int32((torch.tensor([1]), torch.tensor([0, 2**31])), ("input_ids", "positions"))


def test_graph_key_names_the_neuron_sdk_target_and_flags(monkeypatch) -> None:
    from exec_service.graph_sets.key import graph_key, key_inputs

    src = source_from_hf(tiny_hf(seed=1))
    versions = {"torch_neuronx": "2.13.3.0.1", "neuronx_cc": "2.30.1.0", "runtime": "2.29.5"}
    monkeypatch.setattr(sdk, "versions", lambda: dict(versions))
    monkeypatch.setenv(sdk.TARGET_OVERRIDE, "trn2")
    monkeypatch.delenv(sdk.CC_FLAGS, raising=False)
    cfg = RuntimeConfig(max_batch_size=2, max_seq_len=32, context_buckets=(16,), backend="neuron")

    def key() -> str:
        return graph_key(key_inputs(src.arch, src.target, cfg))

    inputs = key_inputs(src.arch, src.target, cfg)
    assert inputs["device_target"] == {
        "device": "neuron",
        "target": "trn2",
        "neuron_cc_flags": "",
        **versions,
    }
    assert inputs["backend"]["options"]["cpu_linear"] == "aten"
    base = key()
    monkeypatch.setenv(sdk.CC_FLAGS, "--lnc 2")
    flags = key()
    monkeypatch.setenv(sdk.TARGET_OVERRIDE, "trn3")
    target = key()
    versions["neuronx_cc"] = "2.31.0.0"  # the NEFF cache does not key on it; the graph key must
    compiler = key()
    assert len({base, flags, target, compiler}) == 4
    cpu = graph_key(
        key_inputs(
            src.arch, src.target, RuntimeConfig(max_batch_size=2, max_seq_len=32, context_buckets=(16,))
        )
    )
    assert cpu not in {base, flags, target, compiler}


def test_a_neuron_graph_set_holds_the_neff_cache() -> None:
    from exec_service.graph_sets.key import graph_key
    from exec_service.graph_sets.manifest import GraphSetError, GraphSetManifest

    assert graph_files("neuron") == (NEFF_CACHE,) and graph_files("cpu") == (
        "mega-cache.bin",
        "cpu-kernels.tar",
    )
    inputs = {"backend": {"name": "neuron"}, "x": 1}
    entry = {"path": NEFF_CACHE, "size": 1, "sha256": "0" * 64}
    doc = {
        "schema_version": 1,
        "graph_key": graph_key(inputs),
        "key_inputs": inputs,
        "graphs": [],
        "files": [],
    }
    import json

    with pytest.raises(GraphSetError, match=f"lists no {NEFF_CACHE}"):
        GraphSetManifest.from_json(json.dumps(doc))
    m = GraphSetManifest.from_json(json.dumps({**doc, "files": [entry]}))
    assert m.backend == "neuron"


def test_neff_cache_captured_restored_and_a_graph_compiled_at_start_refused(tmp_path, monkeypatch) -> None:
    built, served, out = tmp_path / "built", tmp_path / "served", tmp_path / "set"
    out.mkdir()
    (built / "ab" / "cd").mkdir(parents=True)
    (built / "ab" / "cd" / "abcd1234.neff").write_bytes(b"NEFF" * 64)
    monkeypatch.setenv(sdk.NEFF_CACHE_DIR, str(built))
    capture(out, "neuron")
    assert (out / NEFF_CACHE).is_file()

    monkeypatch.setenv(sdk.NEFF_CACHE_DIR, str(served))  # another host: an empty cache
    graphs = CompiledGraphs("k" * 32, str(out), frozenset({"g1", "g2"}), backend="neuron", strict=True)
    install(graphs)
    assert (served / "ab" / "cd" / "abcd1234.neff").read_bytes() == b"NEFF" * 64
    before = graphs.compiled_state()
    graphs.check_loaded("g1", before)  # found in the cache: nothing new
    (served / "ef").mkdir()
    (served / "ef" / "ef99.neff").write_bytes(b"x")  # what a compile at start would write
    with pytest.raises(GraphSetMiss, match="graph g2 was compiled at start"):
        graphs.check_loaded("g2", before)
    lenient = CompiledGraphs("k" * 32, str(out), frozenset({"g2"}), backend="neuron", strict=False)
    lenient.check_loaded("g2", before)  # --graphs auto/compile: allowed


class _CountingBackend(CpuBackend):
    """A cpu backend that warms up at start (as neuron does) and counts what the runner asks."""

    warm_up_at_start = True
    compiles_every_graph = True

    def __init__(self) -> None:
        super().__init__(compile=True)
        self.prepared: list[str] = []
        self.calls: list[str] = []
        self.served = 0

    def prepare(self, graph):
        self.prepared.append(graph.spec.name)

        def run(*args):
            self.calls.append(graph.spec.name)
            return graph(*args)

        return run

    def serving(self) -> None:
        self.served += 1


def test_the_runner_warms_every_graph_up_then_serves() -> None:
    src = source_from_hf(tiny_hf(seed=4))
    cfg = RuntimeConfig(max_batch_size=2, max_seq_len=32, context_buckets=(16,), cpu_linear="aten")
    backend = _CountingBackend()
    runner = Runner(src.arch, src.target, src.load(0), cfg, backend=backend)
    names = [s.name for s in cfg.graph_specs()]
    assert backend.prepared == names and backend.calls == names and backend.served == 1
    assert sorted(runner.warm_up_s) == sorted(names)  # graph sets record each graph's compile time
    assert all(float(b.abs().sum()) == 0 for b in runner.cache.buffers())  # warm-up leaves no state
    assert float(runner.counts.counts.abs().sum()) == 0


def test_worker_environment_is_set_for_the_child_only(monkeypatch) -> None:
    from exec_service.runtime.executor import _environment, _rank_environment

    monkeypatch.setenv(sdk.VISIBLE_CORES, "6-7")
    monkeypatch.setenv(sdk.NEFF_CACHE_DIR, "/tmp/neff")
    monkeypatch.delenv(sdk.CONTAINER_CORES, raising=False)
    env = _rank_environment(1, 2)
    assert env[sdk.VISIBLE_CORES] == "7" and env[sdk.NEFF_CACHE_DIR] == "/tmp/neff"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with _environment(env):
        assert os.environ[sdk.VISIBLE_CORES] == "7" and os.environ["WORLD_SIZE"] == "2"
    assert os.environ[sdk.VISIBLE_CORES] == "6-7" and "WORLD_SIZE" not in os.environ


@pytest.mark.skipif(HAVE_SDK, reason="torch_neuronx is installed here")
def test_compile_device_neuron_without_the_sdk_exits_1_naming_it(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop(sdk.NEFF_CACHE_DIR, None)
    proc = subprocess.run(
        [EXE, "compile", f"file://{tmp_path}/m/manifest.json", "--device", "neuron", "--max-seq-len", "64"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr
    assert "needs the Neuron SDK (TorchNeuron): cannot import torch_neuronx" in proc.stderr
    bad = subprocess.run(
        [EXE, "compile", "file:///x/manifest.json", "--device", "cpu", "--stablehlo", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--stablehlo: lowers the graphs of --device neuron" in bad.stderr
