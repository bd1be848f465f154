"""Runtime: the graph set and its traceability (torch.export of every graph at every bucket), the KV
cache interface, on-device sampling against transformers' logits processors, backends."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from exec_service.model.collectives import SINGLE
from exec_service.runtime.backends import BackendUnavailable, get_backend
from exec_service.runtime.graphs import CONTEXT, DECODE, GraphSpec, StepGraph, example_inputs, example_step
from exec_service.runtime.kv_cache import KVCache
from exec_service.runtime.runner import Runner, RuntimeConfig
from exec_service.runtime.sampling import NUM_PARAMS, PARAM_FIELDS, sample
from exec_service.runtime.step_io import INPUTS, StepInputs, StepIOError, StepOutputs
from tests.helpers import assert_export_matches_eager
from tests.hf_reference import source_from_hf, tiny_hf

SMALL = RuntimeConfig(max_batch_size=2, max_seq_len=64, context_buckets=(8, 32), kv_buckets=(16, 32, 64))


def test_graph_set_and_distinct_signatures() -> None:
    specs = SMALL.graph_specs()
    names = {s.name for s in specs}
    assert SMALL.batch_buckets == (1, 2)  # default: powers of two up to max_batch_size
    assert names == {
        f"{kind}_b{b}_s{s}_k{k}{suffix}"
        for b in (1, 2)
        for kind, s, k, suffix in [
            ("ctx", 8, 16, ""), ("ctx", 32, 32, ""), ("ctx", 8, 64, ""), ("ctx", 32, 64, ""),
            ("tkg", 1, 16, ""), ("tkg", 1, 32, ""), ("tkg", 1, 64, ""),
            ("tkg", 1, 16, "_greedy"), ("tkg", 1, 32, "_greedy"), ("tkg", 1, 64, "_greedy"),
        ]
    }  # fmt: skip
    sigs = [s.input_shapes() for s in specs]
    assert len(set(sigs)) == len(sigs)  # NxD routes by input shapes alone
    # even at max_batch 1 a ctx graph never looks like a decode graph
    one = RuntimeConfig(max_batch_size=1, max_seq_len=32, context_buckets=(2, 4, 32))
    sigs = [s.input_shapes() for s in one.graph_specs()]
    assert len(set(sigs)) == len(sigs)


def test_graph_arguments_are_the_named_step_inputs() -> None:
    """Each graph's forward takes exactly its spec's input names, in order, and ``StepInputs``
    holds every input any graph takes (``INPUTS`` gives them all a dtype and a symbolic shape)."""
    from exec_service.runtime.graphs import GreedyStepGraph

    assert set(INPUTS) == {f.name for f in dataclasses.fields(StepInputs)}
    specs = SMALL.graph_specs()
    for spec in specs:
        module = GreedyStepGraph if spec.greedy else StepGraph
        assert tuple(inspect.signature(module.forward).parameters)[1:] == spec.input_names(), spec.name
        assert set(spec.input_names()) <= set(INPUTS)
        inputs = example_step(spec)
        assert tuple(tuple(t.shape) for t in inputs.args(spec)) == spec.input_shapes()
        again = StepInputs.from_args(spec, example_inputs(spec))
        assert all(torch.equal(a, b) for a, b in zip(again.args(spec), inputs.args(spec), strict=True))
    assert {s.input_names() for s in specs} == {
        ("input_ids", "positions", "slots", "mask", "last_idx", "params", "uniforms", "suppress_ids"),
        ("input_ids", "positions", "slots", "mask", "last_idx", "suppress_ids"),
    }


def test_step_inputs_check_their_invariants() -> None:
    full = GraphSpec(DECODE, 2, 1, 16, 3)
    greedy = dataclasses.replace(full, greedy=True)
    ok = example_step(full)
    ok.check(full)
    with pytest.raises(StepIOError, match="graph tkg_b2_s1_k16_greedy takes no params"):
        ok.check(greedy)
    bare = dataclasses.replace(ok, params=None, uniforms=None)
    bare.check(greedy)
    with pytest.raises(StepIOError, match="graph tkg_b2_s1_k16 needs params"):
        bare.args(full)
    with pytest.raises(
        StepIOError, match=r"mask has shape \[2, 1, 16\], expected \[2, 1, 32\] \[B,S,K\] bool"
    ):
        ok.check(dataclasses.replace(full, kv_len=32))
    with pytest.raises(StepIOError, match=r"suppress_ids has shape \[2, 3\], expected \[2, 4\]"):
        ok.check(dataclasses.replace(full, suppress=4))
    # the tensors agree with each other whatever the graph: dtypes, ranks, one size per symbol
    with pytest.raises(StepIOError, match=r"positions must be \[B,S\] int64, got \[2, 1\] int32"):
        dataclasses.replace(ok, positions=ok.positions.int())
    with pytest.raises(StepIOError, match="slots must be"):
        dataclasses.replace(ok, slots=ok.slots[None])
    with pytest.raises(StepIOError, match="B is 2 in input_ids but 3 in slots"):
        dataclasses.replace(ok, slots=torch.arange(3))
    with pytest.raises(StepIOError, match="takes 6 inputs"):
        StepInputs.from_args(greedy, example_inputs(full))
    # outputs: named, one row per batch row
    out = StepOutputs.from_graph(("tokens", "logits"), (torch.zeros(2, dtype=torch.int64), torch.zeros(2, 5)))
    assert out.logits is not None and out.logprob is None
    with pytest.raises(StepIOError, match="returned 1 outputs"):
        StepOutputs.from_graph(("tokens", "logits"), (torch.zeros(2),))
    with pytest.raises(StepIOError, match="logprob has shape"):
        StepOutputs(torch.zeros(2, dtype=torch.int64), logprob=torch.zeros(3))


def test_tp_step_header_and_payload_carry_every_variant() -> None:
    """The TP broadcast: the header carries the whole spec (greedy included), the payload the inputs
    the spec names, bit for bit (pure functions; the tp = 2 runs are in test_exec_tp.py)."""
    from exec_service.runtime.executor import _OP_RUN, _header, _pack, _spec_of, _unpack

    for spec in SMALL.graph_specs():
        header = _header(_OP_RUN, spec)
        assert int(header[0]) == _OP_RUN and _spec_of(header) == spec
        sent = dataclasses.replace(example_step(spec), input_ids=torch.randint(0, 99, (spec.batch, spec.seq)))
        got = _unpack(spec, _pack(spec, sent))
        for name in spec.input_names():
            a, b = getattr(got, name), getattr(sent, name)
            assert a.dtype == b.dtype and torch.equal(a, b), (spec.name, name)
        assert (got.params is None) == spec.greedy
    with pytest.raises(StepIOError, match="takes no params"):  # checked before anything is sent
        _pack(GraphSpec(DECODE, 2, 1, 16, 72, greedy=True), example_step(GraphSpec(DECODE, 2, 1, 16, 72)))


def test_runtime_config_validation() -> None:
    with pytest.raises(ValueError, match="context buckets must be >= 2"):
        RuntimeConfig(context_buckets=(1, 8))
    with pytest.raises(ValueError, match="multiple of the largest context bucket"):
        RuntimeConfig(max_seq_len=100, context_buckets=(64,))
    with pytest.raises(ValueError, match="largest KV bucket must equal max_seq_len"):
        RuntimeConfig(max_seq_len=64, context_buckets=(8,), kv_buckets=(16, 32))
    assert RuntimeConfig(max_seq_len=128, context_buckets=(16, 32)).kv_buckets == (16, 32, 64, 128)


def test_every_graph_exports_at_every_bucket() -> None:
    """torch.export is the CI proxy for Neuron traceability: static shapes, no data-dependent control
    flow, KV/count state updated as buffer mutations."""
    src = source_from_hf(tiny_hf(seed=5))
    runner = Runner(src.arch, src.target, src.load(0), SMALL)
    specs = SMALL.graph_specs()
    assert {s.kind for s in specs} == {CONTEXT, DECODE}
    for spec in specs:
        ep = torch.export.export(runner.graphs[spec], example_inputs(spec), strict=False)
        assert len(ep.graph_signature.user_outputs) == (1 if spec.greedy else 4), spec.name
        if spec.name in ("ctx_b1_s8_k16", "tkg_b2_s1_k64", "tkg_b2_s1_k64_greedy"):
            # functionalized: the cache is aliased state (the greedy graph leaves the counts alone)
            mutated = set(ep.run_decompositions().graph_signature.buffers_to_mutate.values())
            counts = set() if spec.greedy else {"counts.counts"}
            assert mutated == {"cache.k0", "cache.v0", "cache.k1", "cache.v1", *counts}, spec.name
            assert_export_matches_eager(runner, spec, ep)


def test_kv_cache_write_read() -> None:
    cache = KVCache(num_layers=1, max_batch=3, kv_heads=2, max_seq_len=8, head_dim=4, dtype=torch.float32)
    k = torch.randn(1, 2, 3, 4)
    v = torch.randn(1, 2, 3, 4)
    cache.write(0, k, v, torch.tensor([2]), torch.tensor([[4, 5, 6]]))
    kc, vc = cache.read(0, 8, torch.tensor([2]))
    torch.testing.assert_close(kc[:, :, 4:7], k)
    torch.testing.assert_close(vc[:, :, 4:7], v)
    assert kc[:, :, :4].abs().sum() == 0 and cache.k0[:2].abs().sum() == 0  # other slots untouched
    # decode: one token per slot, rows == slots, read returns the prefix view of all slots
    k1 = torch.randn(3, 2, 1, 4)
    cache.write(0, k1, k1, torch.arange(3), torch.tensor([[0], [1], [7]]))
    kc, _ = cache.read(0, 4, None)
    assert kc.shape == (3, 2, 4, 4) and kc.data_ptr() == cache.k0.data_ptr()
    torch.testing.assert_close(kc[1, :, 1], k1[1, :, 0])
    torch.testing.assert_close(cache.k0[2, :, 7], k1[2, :, 0])


# ---- sampling ------------------------------------------------------------------------------------


def _params(**kw) -> torch.Tensor:
    base = dict(
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
    )
    base.update(kw)
    return torch.tensor([[float(base[f]) for f in PARAM_FIELDS]])


def _hf_probs(logits: torch.Tensor, counts: torch.Tensor, seen_ids: list[int], **kw) -> torch.Tensor:
    """The distribution transformers' processors produce (repetition penalty, temperature, top-k,
    top-p, min-p), with OpenAI-style presence/frequency penalties applied by hand."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    x = logits[None].clone()
    ids = torch.tensor([seen_ids])
    if kw.get("repetition_penalty", 1.0) != 1.0:
        x = RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"])(ids, x)
    x = x - kw.get("presence_penalty", 0.0) * (counts > 0) - kw.get("frequency_penalty", 0.0) * counts
    x = TemperatureLogitsWarper(kw.get("temperature", 1.0))(ids, x)
    if kw.get("top_k", 0):
        x = TopKLogitsWarper(kw["top_k"])(ids, x)
    if kw.get("top_p", 1.0) < 1.0:
        x = TopPLogitsWarper(kw["top_p"])(ids, x)
    if kw.get("min_p", 0.0) > 0:
        x = MinPLogitsWarper(kw["min_p"])(ids, x)
    return torch.softmax(x, -1)[0]


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.7),
        dict(temperature=1.3, top_k=5),
        dict(temperature=0.9, top_p=0.6),
        dict(temperature=1.0, min_p=0.2),
        dict(temperature=0.8, top_k=8, top_p=0.9, min_p=0.05),
        dict(temperature=1.0, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3),
    ],
)
def test_inverse_cdf_sampling_follows_transformers_distribution(kw: dict) -> None:
    torch.manual_seed(0)
    v = 50
    logits = torch.randn(v) * 2
    seen_ids = [3, 3, 7, 11, 11, 11]
    counts = torch.zeros(v)
    for t in seen_ids:
        counts[t] += 1
    want = _hf_probs(logits, counts, seen_ids, **kw)
    order = torch.argsort(want, descending=True, stable=True)
    cdf = torch.cumsum(want[order], 0)
    us = torch.linspace(0.0005, 0.9995, 400)
    n = len(us)
    out = sample(
        logits.expand(n, v).clone(), _params(**kw).expand(n, NUM_PARAMS), us, counts.expand(n, v),
        torch.full((n, 1), -1), torch.zeros(1, dtype=torch.int64), SINGLE, num_candidates=v, num_top=5,
    )  # fmt: skip
    for u, tok in zip(us.tolist(), out.tokens.tolist(), strict=True):
        i = int((cdf <= u).sum().clamp(max=v - 1))
        near_edge = (cdf - u).abs().min() < 1e-4
        assert tok == int(order[i]) or near_edge, (u, tok, int(order[i]))
    assert (want[out.tokens] > 0).all()  # never a filtered-out token


def test_greedy_top_k1_and_logprobs() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 40)
    logits[1, 39] = float("-inf")  # a padded-vocab entry
    counts = torch.zeros(4, 40)
    us = torch.rand(4)
    greedy = sample(
        logits,
        _params(temperature=0.0).expand(4, -1),
        us,
        counts,
        torch.full((4, 2), -1),
        torch.zeros(1, dtype=torch.int64),
        SINGLE,
        16,
        5,
    )
    topk1 = sample(
        logits,
        _params(temperature=1.7, top_k=1).expand(4, -1),
        us,
        counts,
        torch.full((4, 2), -1),
        torch.zeros(1, dtype=torch.int64),
        SINGLE,
        16,
        5,
    )
    assert torch.equal(greedy.tokens, logits.argmax(-1))
    assert torch.equal(topk1.tokens, greedy.tokens)
    # min_new_tokens: suppressed ids (per row; -1 = none) are never sampled
    sup_ids = torch.full((4, 2), -1)
    sup_ids[0, 1] = greedy.tokens[0]
    sup = sample(
        logits,
        _params(temperature=0.0).expand(4, -1),
        us,
        counts,
        sup_ids,
        torch.zeros(1, dtype=torch.int64),
        SINGLE,
        16,
        5,
    )
    assert int(sup.tokens[0]) == int(logits[0].topk(2).indices[1]) and torch.equal(
        sup.tokens[1:], greedy.tokens[1:]
    )
    torch.testing.assert_close(sup.logprob[1:], greedy.logprob[1:])
    lsm = torch.log_softmax(logits, -1)
    torch.testing.assert_close(greedy.logprob, lsm.gather(1, greedy.tokens[:, None])[:, 0])
    vals, ids = lsm.topk(5, -1)
    torch.testing.assert_close(greedy.top_logprobs, vals)
    assert torch.equal(greedy.top_ids, ids)


def test_backends() -> None:
    assert get_backend("cpu").device.type == "cpu"
    with pytest.raises(BackendUnavailable, match="torch_neuronx"):
        get_backend("neuron")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            get_backend("cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("tpu")


# ---- the greedy decode variant ---------------------------------------------------------------------


def test_greedy_graph_equals_full_graph() -> None:
    """tkg_*_greedy (argmax after the suppressed ids) picks what the full sampler picks for greedy
    rows with neutral penalties, leaves the token counts alone, and has its own input signature."""
    from exec_service.runtime.graphs import GraphSpec, make_mask
    from exec_service.runtime.sampling import NEUTRAL_PARAMS

    rc = RuntimeConfig(max_batch_size=3, max_seq_len=32, context_buckets=(8,), return_logits=True)
    src = source_from_hf(tiny_hf(seed=5))
    runner = Runner(src.arch, src.target, src.load(0), rc)
    m = rc.max_suppressed_ids
    full = GraphSpec(DECODE, 3, 1, 32, m)
    fast = GraphSpec(DECODE, 3, 1, 32, m, greedy=True)
    assert fast in rc.graph_specs() and fast.input_shapes() != full.input_shapes()
    torch.manual_seed(0)
    ids = torch.randint(0, src.arch.vocab_size, (3, 1))
    pos = torch.tensor([[3], [17], [0]])
    sup = torch.full((3, m), -1)
    params = torch.tensor([NEUTRAL_PARAMS] * 3)

    def step(spec: GraphSpec):
        inputs = StepInputs(
            ids, pos, torch.arange(3), make_mask(pos, 32), torch.zeros(3, dtype=torch.int64), sup
        )
        if not spec.greedy:
            inputs = dataclasses.replace(inputs, params=params, uniforms=torch.rand(3))
        return runner.run(spec, inputs)

    want = step(full)
    counts = runner.counts.counts.clone()
    got = step(fast)
    assert got.logprob is None and got.top_ids is None and got.logits is not None  # tokens + logits only
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.logits, want.logits)
    assert torch.equal(got.tokens, want.logits.argmax(-1))
    assert torch.equal(runner.counts.counts, counts)  # no counts update
    # suppressed ids (min_new_tokens) are never chosen; -1 and repeats are harmless
    sup[0, :3] = torch.tensor([int(want.tokens[0]), -1, int(want.tokens[0])])
    sup[1, 0] = int(want.tokens[1])
    want = step(full)
    got = step(fast)
    assert torch.equal(got.tokens, want.tokens) and int(got.tokens[0]) != int(sup[0, 0])
    assert torch.equal(got.tokens[2:], want.tokens[2:])  # an unsuppressed row is unchanged
    second = want.logits[0].clone()
    second[sup[0, 0]] = float("-inf")
    assert int(got.tokens[0]) == int(second.argmax())


def test_greedy_tokens_merge_ranks() -> None:
    """Under tp each rank takes its shard's best (suppressed ids removed) and the ranks merge."""
    from exec_service.runtime.sampling import greedy_tokens

    class TwoRanks:  # what torch.distributed would return for ranks 0 and 1, rank 0's view
        tp = 2

        def __init__(self, other: torch.Tensor) -> None:
            self.other = other

        def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
            return torch.cat([x, self.other.pop(0)], dim)

    torch.manual_seed(3)
    logits = torch.randn(4, 20)  # the full vocab; rank r holds [10 r, 10 r + 10)
    sup = torch.full((4, 2), -1)
    sup[1, 0] = int(logits[1].argmax())
    want = logits.clone()
    want[1, sup[1, 0]] = float("-inf")
    hi = want[:, 10:]  # rank 1's shard
    other = [hi.max(-1, keepdim=True).values, hi.argmax(-1, keepdim=True) + 10]
    got = greedy_tokens(logits[:, :10].clone(), sup, torch.zeros(1, dtype=torch.int64), TwoRanks(other))
    assert torch.equal(got, want.argmax(-1))
