"""The Neuron compiler's front half, verified without the SDK: every step graph of every family, at
tp 1 and 2, through Dynamo fullgraph capture -> AOTAutograd (input mutations kept) -> torch-mlir ->
StableHLO (``exec_service/runtime/neuron``).

What is asserted comes from the MLIR text itself (regexes over the module, not the lowering's own
bookkeeping) and from eager runs: every graph kind of the serving shape lowers; no torch dialect op
and no f64 is left; every op is on the allowlist; each KV-cache write is an argument aliased to an
output (``tf.aliasing_output``) and produced by a scatter into that argument (no copy); tp 2 holds
``stablehlo.all_reduce`` / ``all_gather`` over replica group [[0, 1]] and every rank's module is the
same program; a captured graph's second call reads what its first call wrote; a graph that does not
lower names itself and the op (and the CLI exits 1).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip(
    "torch_mlir", reason="the lowering needs torch-mlir (pip install 'neuron-serve[stablehlo]')"
)

from exec_service.model.collectives import GROUP_NAME
from exec_service.runtime.graphs import CONTEXT, DECODE, SPECULATE, GraphSpec, make_mask
from exec_service.runtime.neuron.capture import CapturedGraph, capture
from exec_service.runtime.neuron.collective_legalize import CollectiveError
from exec_service.runtime.neuron.lowering import LoweredGraph, LoweringError, lower
from exec_service.runtime.neuron.op_allowlist import ALLOWED, violations
from exec_service.runtime.neuron.stablehlo_export import TraceBackend, export, neuron_config
from exec_service.runtime.neuron.trace_group import rank_group
from exec_service.runtime.runner import Runner, RuntimeConfig
from exec_service.runtime.sampling import NEUTRAL_PARAMS
from exec_service.runtime.step_io import StepInputs
from tests.family_configs import make_family_model
from tests.family_exec import CASES
from tests.hf_reference import HFShards, source_from_hf, tiny_hf

FAMILIES = ("llama", "qwen2", "qwen3", "granite", "phi3", "mixtral", "qwen3_moe", "llama4")
# one graph per kind: a context graph, a full and a greedy token-generation graph, a full and a
# greedy verify graph (n-gram speculation, k = 2) (small, so that 8 families x 2 tp stay within the
# CI budget; any new kind in graph_set() is picked up)
SHAPE = RuntimeConfig(
    max_batch_size=2,
    max_seq_len=32,
    context_buckets=(16,),
    batch_buckets=(2,),
    kv_buckets=(32,),
    speculation="ngram",
    num_speculative_tokens=2,
)
EXE = Path(sys.executable).parent / "neuron-serve"

_OP = re.compile(r'^\s*(?:%[\w#:, %]+ = )?"?([a-z_]+\.[a-z_.]+)', re.M)
_TYPE = r"tensor<[^>]*>"


def ops_in(text: str) -> set[str]:
    """Every op name in the MLIR text (generic and pretty forms), read from the text itself."""
    return set(_OP.findall(text)) | ({"builtin.module"} if text.lstrip().startswith("module") else set())


def arguments(text: str) -> dict[int, tuple[str, str]]:
    """Function argument number -> (its type, its attribute dictionary)."""
    sig = re.search(r"func\.func @\w+\((.*?)\)\s*->", text, re.S).group(1)
    return {
        int(m.group(1)): (m.group(2), m.group(3) or "")
        for m in re.finditer(rf"%arg(\d+): ({_TYPE})(?: \{{([^}}]*)\}})?", sig)
    }


def returned(text: str) -> list[str]:
    m = re.search(r"^\s*return (.*?) : ", text, re.M)
    return [v.strip() for v in m.group(1).split(",")]


def definition(text: str, value: str) -> str:
    """The line defining SSA value ``value`` (``%12``, or one result of a multi-result op)."""
    base = value.split("#")[0]
    m = re.search(rf"^\s*{re.escape(base)}(?::\d+)? = (.*)$", text, re.M)
    if m is None:  # a result of a multi-result op: "%a, %b = ..." / "%r:2 = ..."
        m = re.search(rf"^\s*(?:%[\w]+, )*{re.escape(base)}(?:, %[\w]+)* = (.*)$", text, re.M)
    assert m is not None, f"no definition of {value}"
    return m.group(1)


def written_in_place(text: str, out: int) -> int:
    """Follow output ``out`` back through reshapes and scatters (their first operand) to an
    argument; fails on any other op (a computed value, a copy)."""
    value = returned(text)[out]
    while not value.startswith("%arg"):
        line = definition(text, value)
        m = re.match(r'"?stablehlo\.(reshape|scatter)"?\(?\s*(%[\w#]+)', line)
        assert m is not None, f"output {out} is produced by {line[:80]}, not written in place"
        value = m.group(2)
    return int(value.removeprefix("%arg"))


def check_module(text: str, tp: int) -> None:
    """The lowered-graph contract, read from the text."""
    ops = ops_in(text)
    assert not {o for o in ops if o.startswith(("torch.", "torch_c."))}, ops
    assert not re.search(r"\bf64\b", text), "f64 left in the module"
    assert ops <= set(ALLOWED), ops - set(ALLOWED)
    args = arguments(text)
    cache = {n: (t, a) for n, (t, a) in args.items() if re.search(r'"cache\.[kv]\d+"', a)}
    assert cache, "no KV cache arguments"
    outs = returned(text)
    for n, (typ, attrs) in cache.items():
        alias = re.search(r"tf\.aliasing_output = (\d+) : i32", attrs)
        assert alias is not None, f"cache argument {n} is not aliased to an output"
        out = int(alias.group(1))
        assert out < len(outs)
        assert written_in_place(text, out) == n, f"output {out} does not update argument {n}"
        ret_types = re.search(r"^\s*return .*? : (.*)$", text, re.M).group(1)
        assert re.findall(_TYPE, ret_types)[out] == typ
    if tp > 1:
        assert "stablehlo.all_reduce" in ops and "stablehlo.all_gather" in ops
        groups = set(re.findall(r"replica_groups = (dense<[^>]*>)", text))
        assert groups == {"dense<[[0, 1]]>"}, groups
        assert f"mhlo.num_replicas = {tp} : i32" in text
    else:
        assert not {"stablehlo.all_reduce", "stablehlo.all_gather"} & ops


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny checkpoint per family (converted from the files, as prep does)."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(f"ckpt-{family}")
        make_family_model(family, **CASES.get(family, (family, {}))[1]).save_pretrained(path)
        out[family] = path
    return out


# llama at tp 2 is the CLI test below (every rank, through `neuron-serve compile --stablehlo`)
CASES_TP = [(f, tp) for f in FAMILIES for tp in (1, 2) if (f, tp) != ("llama", 2)]


@pytest.mark.parametrize(("family", "tp"), CASES_TP, ids=[f"{f}-tp{tp}" for f, tp in CASES_TP])
def test_every_graph_of_every_family_lowers(family: str, tp: int, checkpoints, tmp_path) -> None:
    src = HFShards(checkpoints[family], tp=tp)
    report = export(src, SHAPE, tmp_path, ranks=[0])
    graphs = report["graphs"]
    assert report["ok"], [(g["graph"], g["op"], g["error"], g["violations"]) for g in graphs if not g["ok"]]
    specs = neuron_config(SHAPE).graph_specs()
    assert [g["graph"] for g in graphs] == [s.name for s in specs]
    assert {s.kind for s in specs} == {CONTEXT, DECODE, SPECULATE}
    assert {s.kind for s in specs if s.greedy} == {DECODE, SPECULATE}
    for g, spec in zip(graphs, specs, strict=True):
        text = (tmp_path / g["file"]).read_text()
        check_module(text, tp)
        mutated = {m["input"] for m in g["mutated"]}
        caches = {f"cache.{kv}{i}" for kv in "kv" for i in range(src.arch.num_layers)}
        # every graph writes every layer's K and V; only the token counts may be written besides
        assert caches <= mutated <= caches | {"counts.counts"}, (spec.name, mutated)
        if spec.greedy:  # the greedy graph leaves the counts alone (GreedyStepGraph)
            assert "counts.counts" not in mutated
        elif spec.kind == CONTEXT:
            assert "counts.counts" in mutated


def test_every_rank_lowers_to_the_same_program_cli(tmp_path) -> None:
    """`neuron-serve compile --device neuron --stablehlo DIR` on a tp=2 artifact with draft-model
    speculation: exit 0, one module per graph per rank (the verify graphs with q included), rank 1's
    module identical to rank 0's (one program for every rank)."""
    from tests.helpers import make_llama

    make_llama(tmp_path / "ckpt", seed=4)
    prep = subprocess.run(
        [EXE, "prepare", tmp_path / "ckpt", "--tp", "2", "--output", f"file://{tmp_path}/store"],
        capture_output=True,
        text=True,
        check=True,
    )
    manifest = prep.stdout.strip().splitlines()[-1]
    out = tmp_path / "shlo"
    shape = [
        "--max-batch-size",
        "2",
        "--max-seq-len",
        "32",
        "--context-buckets",
        "16",
        "--batch-buckets",
        "2",
    ]
    # draft-model speculation: the verify graphs that take the draft's distribution q [B, k, Q]
    shape += ["--kv-buckets", "32", "--speculation", "draft", "--num-speculative-tokens", "2"]
    proc = subprocess.run(
        [EXE, "compile", manifest, "--device", "neuron", *shape, "--stablehlo", out],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out / "report.json")
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["tp"] == 2 and report["ranks"] == [0, 1]
    names = sorted(p.name for p in (out / "rank-00000").iterdir())
    assert names == sorted(p.name for p in (out / "rank-00001").iterdir())
    assert len(names) == 5 and any(n.startswith("spec_") and "_q" in n for n in names), names
    for name in names:
        a, b = (out / "rank-00000" / name).read_text(), (out / "rank-00001" / name).read_text()
        assert a == b, name
        check_module(a, 2)
    assert all(g["same_as_rank0"] for g in report["graphs"] if g["rank"] == 1)


# ---- the cache write survives the call ---------------------------------------------------------


def _step(spec: GraphSpec, ids: list[int], start: int) -> StepInputs:
    """One row (slot 0) feeding ``ids`` at positions start.. (padded to the spec's S)."""
    s = spec.seq
    row = ids + [0] * (s - len(ids))
    pos = torch.arange(start, start + s).view(1, s)
    sampler = "params" in spec.input_names()
    return StepInputs(
        input_ids=torch.tensor([row]),
        positions=pos,
        slots=torch.tensor([0]),
        mask=make_mask(pos, spec.kv_len),
        last_idx=torch.tensor([len(ids) - 1]),
        suppress_ids=torch.full((1, spec.suppress), -1),
        params=torch.tensor([NEUTRAL_PARAMS]) if sampler else None,  # greedy
        uniforms=torch.zeros(1) if sampler else None,
    )


@dataclass
class Chain:
    """A prompt prefilled by the context graph, then 4 tokens decoded by the greedy graph (tp 1)."""

    runner: Runner  # whose buffers the captured graphs read and write
    graphs: dict[GraphSpec, CapturedGraph]
    steps: list[tuple[GraphSpec, StepInputs]]  # fed the eager tokens
    eager: list[int]


@pytest.fixture(scope="module")
def chain() -> Chain:
    src = source_from_hf(tiny_hf(seed=11))
    cfg = neuron_config(
        RuntimeConfig(max_batch_size=2, max_seq_len=16, context_buckets=(8,), batch_buckets=(1, 2))
    )
    ctx = GraphSpec(CONTEXT, 1, 8, 16, cfg.max_suppressed_ids)
    tkg = GraphSpec(DECODE, 1, 1, 16, cfg.max_suppressed_ids, greedy=True)
    prompt = [5, 17, 42, 9, 77, 3]
    eager = Runner(src.arch, src.target, src.load(0), cfg, backend=TraceBackend())
    steps = [(ctx, _step(ctx, prompt, 0))]
    tokens = [int(eager.run(ctx, steps[0][1]).tokens[0])]
    for i in range(4):
        steps.append((tkg, _step(tkg, [tokens[-1]], len(prompt) + i)))
        tokens.append(int(eager.run(tkg, steps[-1][1]).tokens[0]))
    runner = Runner(src.arch, src.target, src.load(0), cfg, backend=TraceBackend())
    graphs = {
        spec: capture(runner.graphs[spec], _step(spec, [0], 0).args(spec), spec.name) for spec in (ctx, tkg)
    }
    return Chain(runner, graphs, steps, tokens)


def _reset(runner: Runner) -> None:
    runner.cache.reset()
    runner.counts.counts.zero_()


def test_second_call_of_a_captured_graph_reads_what_the_first_wrote(chain: Chain) -> None:
    """Prefill through the captured context graph, then decode through the captured greedy graph:
    the same tokens as eager. Without the write-back of the aliased outputs (what the device does by
    reusing the input buffer), decoding reads an empty cache and the tokens differ."""
    for g in chain.graphs.values():
        assert {"cache.k0", "cache.v0", "cache.k1", "cache.v1"} <= set(g.mutated)

    def run() -> list[int]:
        _reset(chain.runner)
        with torch.no_grad():
            return [int(chain.graphs[spec].compiled(*inp.args(spec))[0][0]) for spec, inp in chain.steps]

    assert run() == chain.eager
    saved = {spec: g.aliases for spec, g in chain.graphs.items()}
    try:
        for g in chain.graphs.values():
            g.aliases = ()
        assert run() != chain.eager  # the test sees a lost cache write
    finally:
        for spec, g in chain.graphs.items():
            g.aliases = saved[spec]


def test_lowered_stablehlo_runs_on_xla_and_is_token_exact(chain: Chain, tmp_path) -> None:
    """The StableHLO itself, run on XLA's CPU backend (jaxlib, in a subprocess), each step's cache
    taken from the previous step's aliased outputs: the eager tokens. Without that write-back they
    differ."""
    pytest.importorskip("jax", reason="jax runs the StableHLO on XLA's CPU backend")
    _reset(chain.runner)
    meta: dict = {"graphs": {}, "steps": [spec.name for spec, _ in chain.steps]}
    arrays = {}
    graph = next(iter(chain.graphs))
    module = chain.runner.graphs[graph]
    for spec, captured in chain.graphs.items():
        lowered = lower(captured)
        (tmp_path / f"{spec.name}.mlir").write_text(lowered.text)
        names = [i.name for i in lowered.inputs]
        meta["graphs"][spec.name] = {"inputs": names, "aliases": lowered.aliases}
        for name in names:
            if "." in name:  # a parameter or buffer of the step graph (model.*, cache.*, counts.*)
                t = (
                    module.get_parameter(name)
                    if name in dict(module.named_parameters())
                    else module.get_buffer(name)
                )
                arrays[f"state:{name}"] = t.detach().numpy().copy()
    for n, (spec, inp) in enumerate(chain.steps):
        for name in spec.input_names():
            arrays[f"step{n}:{name}"] = getattr(inp, name).numpy()
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    np.savez(tmp_path / "inputs.npz", **arrays)

    def run(*flags: str) -> list[int]:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.xla_stablehlo", str(tmp_path), *flags],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])["tokens"]

    assert run() == chain.eager
    assert run("--no-write-back") != chain.eager


# ---- collectives, errors, the allowlist ----------------------------------------------------------


class _Collectives(nn.Module):
    def __init__(self, group: str) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        import torch.distributed._functional_collectives as funcol

        s = funcol.all_reduce(x * 2, "sum", self.group)
        m = funcol.all_reduce(x, "max", self.group)
        g = funcol.all_gather_tensor(x.to(torch.int64), 0, self.group)
        return s + m, g


def test_collectives_become_stablehlo_collectives_with_replica_groups() -> None:
    with rank_group(1, 2):
        graph = lower(capture(_Collectives(GROUP_NAME), (torch.ones(2, 3),), "coll"), tp=2)
    text = graph.text
    assert text.count('"stablehlo.all_reduce"') == 2
    assert re.search(r"stablehlo\.add %\w+, %\w+ : tensor<f32>", text)  # the sum's region
    assert re.search(r"stablehlo\.maximum %\w+, %\w+ : tensor<f32>", text)  # the max's region
    gather = re.search(
        r'"stablehlo.all_gather"\(.*?\) <\{(.*?)\}> : \((tensor<[^>]*>)\) -> (tensor<[^>]*>)', text
    )
    assert gather and "all_gather_dim = 0" in gather.group(1) and "dense<[[0, 1]]>" in gather.group(1)
    assert gather.group(2) == "tensor<2x3xi64>" and gather.group(3) == "tensor<4x3xi64>"
    assert not graph.check()
    with rank_group(0, 2, name="other"), pytest.raises(CollectiveError, match="group 'other'"):
        lower(capture(_Collectives("other"), (torch.ones(2, 3),), "coll2"), tp=2)


class _Fmod(nn.Module):
    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return p - torch.fmod(p, 16)


def test_an_op_without_a_lowering_names_the_graph_and_the_op() -> None:
    with pytest.raises(LoweringError) as e:
        lower(capture(_Fmod(), (torch.arange(8),), "fmod_graph"))
    assert e.value.graph == "fmod_graph" and e.value.op == "torch.aten.fmod.Scalar"
    assert "fmod_graph" in str(e.value) and "torch.aten.fmod.Scalar" in str(e.value)


def _scatter_reduce_suppress(x, suppress_ids, vocab_offset):
    """The sampler's suppression as it was before this issue (scatter_reduce "amin"), which
    torch-mlir cannot lower."""
    local = suppress_ids - vocab_offset
    inside = (local >= 0) & (local < x.shape[-1])
    local = torch.where(inside, local, torch.zeros_like(local))
    val = torch.where(inside, float("-inf"), float("inf")).to(x.dtype)
    return x.scatter_reduce_(1, local, val, "amin")


def test_suppression_without_scatter_reduce_is_the_same_function() -> None:
    """``sampling.suppress_`` (a plain scatter, lowerable) equals the scatter_reduce formulation it
    replaced, including duplicate ids, ids of other ranks' shards and -1 paddings."""
    from exec_service.runtime.sampling import suppress_

    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        b, v, m = 3, 7, 5
        offset = torch.tensor([int(torch.randint(0, 3, (), generator=g)) * v])
        ids = torch.randint(-1, 3 * v, (b, m), generator=g)
        x = torch.randn(b, v, generator=g)
        assert torch.equal(
            suppress_(x.clone(), ids, offset), _scatter_reduce_suppress(x.clone(), ids, offset)
        )


def test_cli_exits_1_naming_each_graph_and_op_that_does_not_lower(tmp_path, monkeypatch, capsys) -> None:
    from exec_service.graph_sets import cli as compile_cli
    from exec_service.runtime import sampling
    from shared.shapes import ServingShape

    # sample() and greedy_tokens() look suppress_ up at call time: every graph kind meets it
    monkeypatch.setattr(sampling, "suppress_", _scatter_reduce_suppress)
    src = source_from_hf(tiny_hf(seed=2))
    monkeypatch.setattr("exec_service.artifact.open_artifact", lambda uri: src)

    class Args:
        manifest, stablehlo, progress = "file:///unused/manifest.json", str(tmp_path / "out"), "text"

    rc = compile_cli._cmd_stablehlo(Args, ServingShape(1, 16, (16,), (16,), (1,)))
    err = capsys.readouterr().err
    assert rc == compile_cli.EXIT_ERROR
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    failed = {g["graph"]: g["op"] for g in report["graphs"] if not g["ok"]}
    assert failed and set(failed.values()) == {"torch.aten.scatter_reduce.two"}, failed
    for name in failed:
        assert f"graph {name}: torch.aten.scatter_reduce.two" in err


def test_allowlist_reasons_and_violations() -> None:
    assert all(isinstance(r, str) and len(r) > 10 for r in ALLOWED.values())
    assert "stablehlo.custom_call" not in ALLOWED and "stablehlo.while" not in ALLOWED
    g = LoweredGraph(
        name="g",
        text="module {\n  %0 = stablehlo.constant dense<1.0> : tensor<f64>\n}",
        ops={"stablehlo.custom_call": 1, "torch.aten.mm": 1, "stablehlo.add": 2},
        inputs=(),
        num_outputs=0,
        aliases=(),
        collectives=None,  # type: ignore[arg-type]
        in_place={"cache.k0": "it is computed by stablehlo.add, not written in place"},
    )
    problems = violations(g)
    assert any("stablehlo.custom_call is not on the allowlist" in p for p in problems)
    assert any("torch dialect op torch.aten.mm" in p for p in problems)
    assert any(p.startswith("f64 in the module") for p in problems)
    assert any("cache.k0 is not updated in place" in p for p in problems)
    assert not any("stablehlo.add is not on the allowlist" in p for p in problems)
