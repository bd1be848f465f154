"""Speculation (the third graph): the verify math against exactly computed distributions, the
verify graphs (specs, signatures, export, harmless rejected K/V), n-gram / oracle / draft-model
drafting through the engine against transformers' greedy tokens and the non-speculative engine,
the adaptive fallback, and tp = 2.

References: transformers' greedy ``generate`` (token-exact), the non-speculative engine (logprobs,
penalties, min_new_tokens), and for sampling the exact next-token distributions of a Markov chain
on a tiny vocabulary (χ² over seeded draws) and of a tiny model computed by transformers.
"""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch

from exec_service.engine import (
    Engine,
    FinishReason,
    Request,
    RuntimeConfig,
    SamplingParams,
    StoppingCriteria,
)
from exec_service.engine.drafting import Adaptive, AdaptivePolicy, Proposal, VerifyCost, ngram_lookup
from exec_service.model.collectives import SINGLE
from exec_service.runtime.graphs import (
    CONTEXT,
    DECODE,
    SPECULATE,
    GraphSpec,
    example_inputs,
    example_step,
    make_mask,
)
from exec_service.runtime.runner import Runner
from exec_service.runtime.sampling import PARAM_FIELDS, candidates, sample
from exec_service.runtime.speculation import verify, verify_greedy
from exec_service.runtime.step_io import StepInputs
from shared.shapes import ServingShape, ShapeError
from tests.drafters import OracleDrafter, WrongDrafter
from tests.helpers import assert_export_matches_eager
from tests.hf_reference import hf_greedy, source_from_hf, tiny_hf

PROMPTS = [
    [7, 3, 12],
    [40, 41, 42, 43, 44, 45, 46, 47, 48],
    list(range(5, 22)),
    [(i * 37) % 97 + 3 for i in range(40)],  # longer than the largest context bucket: chunked prefill
]
K = 4
PLAIN = RuntimeConfig(max_batch_size=4, max_seq_len=128, context_buckets=(8, 16), return_logits=True)
CONFIG = dataclasses.replace(PLAIN, speculation="ngram", num_speculative_tokens=K)
N = 48
ZERO = torch.zeros(1, dtype=torch.int64)


def greedy(p: list[int], n: int = N, **stop) -> Request:
    return Request(p, stopping=StoppingCriteria(max_new_tokens=n, ignore_eos=True, **stop))


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The upper 0.001 quantile of χ²(df) (Wilson-Hilferty; z = Φ⁻¹(0.999))."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def _params(**kw) -> torch.Tensor:
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    base.update(kw)
    return torch.tensor([float(base.get(f, 0.0)) for f in PARAM_FIELDS])


# ---- the verify math, against exactly computed distributions ----------------------------------------


class MarkovChain:
    """A 'model' whose next-token logits depend on the previous token only (logits[prev] [V]), with
    a draft chain of its own: the exact joint of two tokens is P(x1 | t0) P(x2 | x1)."""

    def __init__(self, v: int, seed: int, params: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(seed)
        self.v, self.params = v, params
        self.logits = torch.randn(v, v, generator=g) * 1.5
        self.draft = torch.softmax(torch.randn(v, v, generator=g) * 1.5, -1)
        self.p = torch.stack([self.filtered(i) for i in range(v)])  # [V, V] P(next | prev)

    def filtered(self, prev: int) -> torch.Tensor:
        """The sampler's distribution after penalties / temperature / top-k / top-p / min-p."""
        c = candidates(
            self.logits[prev][None], self.params[None], torch.zeros(1, self.v), torch.full((1, 1), -1),
            ZERO, SINGLE, self.v,
        )  # fmt: skip
        p = torch.zeros(self.v)
        p[c.ids[0]] = c.weights[0] / c.weights[0].sum()
        return p

    def verify_step(self, prev: torch.Tensor, drafter: str, g: torch.Generator):
        """One verify call per row from token ``prev`` [R], two drafts: a draft chain's samples
        with their q, or the fixed n-gram drafts (3, 1) with one-hot q."""
        r = prev.shape[0]
        if drafter == "draft":
            d1 = torch.multinomial(self.draft[prev], 1, generator=g)[:, 0]
            d2 = torch.multinomial(self.draft[d1], 1, generator=g)[:, 0]
            q_ids = torch.arange(self.v).expand(r, 2, self.v).clone()
            q_probs = torch.stack([self.draft[prev], self.draft[d1]], 1)
        else:
            d1, d2 = torch.full((r,), 3), torch.full((r,), 1)
            q_ids, q_probs = torch.stack([d1, d2], 1)[..., None], torch.ones(r, 2, 1)
        ids = torch.stack([prev, d1, d2], 1)  # [R, S = 3]
        return verify(
            self.logits[ids], ids, torch.full((r,), 2), self.params.expand(r, -1),
            torch.rand(r, 3, generator=g), q_ids, q_probs, torch.zeros(r, 3, self.v),
            torch.full((r, 1), -1), ZERO, SINGLE, self.v, 2,
        )  # fmt: skip

    def joint(self, drafter: str, rows: int, seed: int) -> torch.Tensor:
        """Counts [V, V] of the first two tokens generated after token 2, over ``rows`` seeded draws:
        speculatively (a second verify from x1 where the first accepted nothing), or, for drafter
        "none", by ``sample`` one token at a time (non-speculative sampling)."""
        g = torch.Generator().manual_seed(seed)
        prev = torch.full((rows,), 2)
        if drafter == "none":
            x1 = self._sample(prev, g)
            x2 = self._sample(x1, g)
        else:
            out = self.verify_step(prev, drafter, g)
            x1, x2 = out.tokens[:, 0], out.tokens[:, 1].clone()
            again = out.num_accepted == 0
            x2[again] = self.verify_step(x1, drafter, g).tokens[again, 0]
        counts = torch.zeros(self.v, self.v)
        counts.index_put_((x1, x2), torch.ones(rows), accumulate=True)
        return counts

    def _sample(self, prev: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        r = prev.shape[0]
        return sample(
            self.logits[prev], self.params.expand(r, -1), torch.rand(r, generator=g), torch.zeros(r, self.v),
            torch.full((r, 1), -1), ZERO, SINGLE, self.v, 2,
        ).tokens  # fmt: skip

    def chi2(self, counts: torch.Tensor) -> tuple[float, int]:
        """Pearson χ² of ``counts`` against the exact joint; tokens the sampler filters out must never
        appear (their cells are left out of the statistic)."""
        expected = self.p[2][:, None] * self.p * counts.sum()
        allowed = expected > 0
        assert counts[~allowed].sum() == 0, "a filtered-out token was generated"
        e, o = expected[allowed], counts[allowed]
        return float(((o - e) ** 2 / e).sum()), int(allowed.sum()) - 1


@pytest.mark.parametrize(
    "params",
    [_params(temperature=0.8), _params(temperature=1.2, top_k=4), _params(top_p=0.8, min_p=0.05)],
    ids=["temperature", "top_k", "top_p+min_p"],
)
def test_verify_is_exact_speculative_sampling(params: torch.Tensor) -> None:
    """Two tokens from one (or two) verify calls have exactly the joint distribution that sampling
    one token at a time has, with n-gram (one-hot q) and draft-model (sampled q) drafts; and the
    χ² test has the power to see a wrong rule (accepting every draft)."""
    chain = MarkovChain(6, seed=1, params=params)
    rows = 20_000
    for drafter, seed in (("none", 10), ("ngram", 11), ("draft", 12)):
        stat, df = chain.chi2(chain.joint(drafter, rows, seed))
        assert stat < chi2_critical(df), (drafter, stat, df)
    # power: a plausible bug — after rejecting draft d, resample from p instead of the residual
    # (p without d) — makes d too likely, and the same test sees it
    g = torch.Generator().manual_seed(13)
    p = chain.p[2]
    d = int(p.argmax())
    resampled = torch.multinomial(p, rows, replacement=True, generator=g)
    x1 = torch.where(torch.rand(rows, generator=g) < p[d], d, resampled)
    observed, expected = torch.bincount(x1, minlength=6).float(), p * rows
    keep = expected > 0
    stat = float(((observed - expected)[keep] ** 2 / expected[keep]).sum())
    assert stat > 10 * chi2_critical(int(keep.sum()) - 1)


def test_verify_acceptance_rate_is_min_1_p_over_q() -> None:
    """A draft is accepted with probability min(1, p/q): estimated over many rows for one position."""
    chain = MarkovChain(6, seed=2, params=_params())
    g = torch.Generator().manual_seed(0)
    out = chain.verify_step(torch.full((40_000,), 2), "ngram", g)  # one-hot q: P(accept d1=3) = p(3|2)
    rate = float((out.num_accepted >= 1).float().mean())
    assert abs(rate - float(chain.p[2, 3])) < 4 * math.sqrt(0.25 / 40_000)


def test_verify_greedy_rule() -> None:
    """Greedy rows: drafts accepted while they equal the argmax; the argmax after the last accepted
    one is the correction (or the bonus after all); padding drafts never count; suppressed ids are
    never chosen. The full graph's math with temperature 0 and the greedy variant agree."""
    torch.manual_seed(0)
    b, s, v = 4, 4, 9
    logits = torch.randn(b, s, v)
    best = logits.argmax(-1)  # [B, S]
    ids = torch.zeros(b, s, dtype=torch.int64)
    ids[:, 0] = 5
    ids[0, 1:] = best[0, :3]  # every draft right: 3 accepted + the bonus
    ids[1, 1:] = best[1, :3]
    ids[1, 1] = (best[1, 0] + 1) % v  # the first draft wrong
    ids[2, 1:] = best[2, :3]  # right, but only one of them is real
    ids[3, 1:] = best[3, :3]  # the first draft is a suppressed id: rejected
    num = torch.tensor([3, 3, 1, 3])
    sup = torch.full((b, 2), -1)
    sup[3, 0] = best[3, 0]
    second = logits[3, 0].clone()
    second[best[3, 0]] = float("-inf")
    want_tokens = torch.tensor(
        [
            [*best[0, :3].tolist(), int(best[0, 3])],
            [int(best[1, 0]), -1, -1, -1],
            [int(best[2, 0]), int(best[2, 1]), -1, -1],
            [int(second.argmax()), -1, -1, -1],
        ]
    )
    want_accepted = torch.tensor([3, 0, 1, 0])
    fast = verify_greedy(logits.clone(), ids, num, sup, ZERO, SINGLE)
    full = verify(
        logits, ids, num, _params(temperature=0.0).expand(b, -1), torch.rand(b, s),
        ids[:, 1:, None], torch.ones(b, s - 1, 1), torch.zeros(b, s, v), sup, ZERO, SINGLE, v, 3,
    )  # fmt: skip
    for out in (fast, full):
        assert torch.equal(out.num_accepted, want_accepted)
        assert torch.equal(out.tokens, want_tokens)
    lsm = torch.log_softmax(logits, -1)
    got = full.logprob[0]
    torch.testing.assert_close(got, lsm[0].gather(-1, want_tokens[0][:, None])[:, 0])


def test_ngram_lookup() -> None:
    seq = [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 1, 2, 3]
    assert ngram_lookup(seq, 2) == (5, 6)  # the latest earlier [1, 2, 3] is followed by 5, 6
    assert ngram_lookup(seq, 9) == (5, 6, 1, 2, 3)  # up to the end of the sequence
    assert ngram_lookup([4, 7, 8, 9, 7], 3) == (8, 9, 7)  # only [7] occurs before: n = 1
    assert ngram_lookup([4, 7, 8, 9, 10], 3) == ()  # nothing to copy
    assert ngram_lookup([5], 3) == () and ngram_lookup([5, 5], 3) == (5,)
    assert ngram_lookup([1, 2, 3, 1, 2, 3], 2, min_n=3) == (1, 2)
    assert ngram_lookup([1, 2, 9, 1, 2], 2, max_n=1) == (9, 1)  # n = 1: the latest earlier "2"


def test_adaptive_pauses_and_backs_off() -> None:
    policy = AdaptivePolicy(min_accepted=0.5, smoothing=0.5, pause_steps=2, max_pause_steps=8)
    a = Adaptive(policy)
    assert a.should_draft()
    a.record(0)  # 1.5 -> 0.75: still worth it
    assert a.should_draft()
    a.record(0)  # -> 0.375: pause 2 steps
    assert [a.should_draft() for _ in range(3)] == [False, False, True]
    a.record(0)  # the probe failed: pause 4
    assert [a.should_draft() for _ in range(5)] == [False] * 4 + [True]
    a.record(3)  # the probe succeeded: speculating again, the next pause short
    assert a.should_draft()
    a.record(0)
    a.record(0)
    assert [a.should_draft() for _ in range(3)] == [False, False, True]
    for _ in range(6):  # failing probes: the pause doubles up to its maximum
        a.record(0)
        while not a.should_draft():
            pass
    assert a.pause == 8
    # the step's gate: a gated row pauses, then comes back expecting enough to pass alone
    g = Adaptive(AdaptivePolicy(min_accepted=0.3, verify_cost=0.4, pause_steps=2))
    g.average = 0.35
    g.gated()
    assert [g.should_draft() for _ in range(3)] == [False, False, True] and g.expected == 0.4


def test_verify_cost_is_measured_per_bucket() -> None:
    """The gate's cost: the prior until a bucket has timed both kinds of step (the first of each is a
    warm-up), then median verify / median decode - 1; token generation is asked for while a bucket's
    decode time is unknown and again after ``refresh`` verifies in a row; a closed gate probes after
    ``probe_every`` closed steps, then ever more rarely, and starts again when it opens."""
    c = VerifyCost(prior=0.4, window=3, refresh=3, probe_every=2, max_probe_every=4)
    assert c.per_row(8) == 0.4 and c.needs_decode(8)
    c.observe(False, 8, 5.0)  # warm-up: not counted
    assert c.needs_decode(8)
    c.observe(False, 8, 0.010)
    assert not c.needs_decode(8) and c.per_row(8) == 0.4  # no verify timed yet
    c.observe(True, 8, 9.0)  # warm-up
    c.observe(True, 8, 0.025)
    assert c.per_row(8) == pytest.approx(1.5) and c.per_row(1) == 0.4  # other buckets: the prior
    c.observe(True, 8, 0.015)
    c.observe(True, 8, 1.0)  # an outlier: the median of the last three (0.025, 0.015, 1.0) ignores it
    assert c.per_row(8) == pytest.approx(1.5)
    assert c.needs_decode(8)  # three verifies in a row: time token generation again
    c.observe(False, 8, 0.030)  # median of (0.010, 0.030) = 0.020
    assert not c.needs_decode(8) and c.per_row(8) == pytest.approx(0.025 / 0.020 - 1)
    # probing a closed gate: after 2 closed steps, then after 4, 4 (the maximum)
    assert [c.probe_due(8) for _ in range(2)] == [False, True]
    assert [c.probe_due(8) for _ in range(4)] == [False, False, False, True]
    assert [c.probe_due(8) for _ in range(4)] == [False, False, False, True]
    c.opened(8)  # the gate opened by itself: back to every 2
    assert [c.probe_due(8) for _ in range(2)] == [False, True]
    c.observe(True, 8, 0.0001)
    assert c.per_row(8) >= 0.0  # never negative


# ---- the verify graphs --------------------------------------------------------------------------------


def test_speculation_graphs_in_the_graph_set() -> None:
    small = dict(max_batch_size=2, max_seq_len=32, context_buckets=(8,), kv_buckets=(4, 16, 32))
    off = RuntimeConfig(**small)
    on = RuntimeConfig(**small, speculation="ngram", num_speculative_tokens=4)
    draft = RuntimeConfig(**small, speculation="draft", num_speculative_tokens=4, num_candidates=64)
    assert not [s for s in off.graph_specs() if s.kind == SPECULATE]
    extra = sorted(s.name for s in set(on.graph_specs()) - set(off.graph_specs()))
    assert extra == sorted(
        f"spec_b{b}_s5_k{k}{g}" for b in (1, 2) for k in (16, 32) for g in ("", "_greedy")
    )  # no KV bucket 4 < S = 5
    assert {s.name for s in draft.graph_specs() if s.kind == SPECULATE and not s.greedy} == {
        f"spec_b{b}_s5_k{k}_q64" for b in (1, 2) for k in (16, 32)
    }
    for cfg in (on, draft):
        sigs = [s.input_shapes() for s in cfg.graph_specs()]
        assert len(set(sigs)) == len(sigs)  # every graph its own input signature
    # the TP broadcast carries the whole spec and the verify inputs, bit for bit
    from exec_service.runtime.executor import _OP_RUN, _header, _pack, _spec_of, _unpack

    for spec in draft.graph_specs():
        if spec.kind != SPECULATE:
            continue
        assert _spec_of(_header(_OP_RUN, spec)) == spec
        sent = dataclasses.replace(example_step(spec), num_drafts=torch.tensor([3, 1][: spec.batch]))
        got = _unpack(spec, _pack(spec, sent))
        for name in spec.input_names():
            assert torch.equal(getattr(got, name), getattr(sent, name)), (spec.name, name)
    with pytest.raises(ValueError, match="draft_width"):
        GraphSpec(SPECULATE, 1, 5, 16, 1)
    with pytest.raises(ValueError, match="seq >= 2"):
        GraphSpec(SPECULATE, 1, 1, 16, 1, draft_width=1)
    with pytest.raises(ValueError, match="greedy variant"):
        GraphSpec(CONTEXT, 1, 8, 16, 1, greedy=True)


def test_speculation_shape_rules_and_graph_key() -> None:
    assert ServingShape(max_seq_len=64, speculation="ngram").num_speculative_tokens == 4  # the default
    assert ServingShape(max_seq_len=64, num_speculative_tokens=3).num_speculative_tokens == 0  # off
    with pytest.raises(ShapeError, match=r"1\.\.16"):
        ServingShape(max_seq_len=64, speculation="ngram", num_speculative_tokens=17)
    with pytest.raises(ShapeError, match="must be one of off, ngram, draft"):
        ServingShape(max_seq_len=64, speculation="medusa")
    with pytest.raises(ShapeError, match=r"\+ 2 must be <= max_seq_len"):
        ServingShape(max_seq_len=8, context_buckets=(8,), speculation="ngram", num_speculative_tokens=7)
    flags = ServingShape(max_seq_len=64, speculation="draft", num_speculative_tokens=2).cli_flags()
    assert flags[-4:] == ["--speculation", "draft", "--num-speculative-tokens", "2"]
    assert "--speculation" not in ServingShape(max_seq_len=64).cli_flags()
    # the graph key changes with the speculation shape (the verify graphs are in the set)
    from exec_service.graph_sets.key import graph_key, key_inputs

    src = source_from_hf(tiny_hf(seed=5))
    keys = {
        graph_key(key_inputs(src.arch, src.target, RuntimeConfig(max_seq_len=64, **kw)))
        for kw in (
            {},
            {"speculation": "ngram"},
            {"speculation": "ngram", "num_speculative_tokens": 2},
            {"speculation": "draft"},
        )
    }
    assert len(keys) == 4


@pytest.fixture(scope="module")
def small_runner():
    cfg = RuntimeConfig(
        max_batch_size=2,
        max_seq_len=32,
        context_buckets=(8,),
        kv_buckets=(16, 32),
        speculation="ngram",
        num_speculative_tokens=3,
        return_logits=True,
    )
    src = source_from_hf(tiny_hf(seed=5))
    return src, cfg


def test_verify_graphs_export(small_runner) -> None:
    """torch.export of both verify variants (the CI proxy for Neuron traceability): the cache (and
    the token counts, for the full graph) are mutated state; the exported program computes what the
    eager graph does."""
    src, cfg = small_runner
    cfg = dataclasses.replace(cfg, return_logits=False)
    runner = Runner(src.arch, src.target, src.load(0), cfg)
    for spec in (GraphSpec(SPECULATE, 2, 4, 16, cfg.max_suppressed_ids, draft_width=1),
                 GraphSpec(SPECULATE, 1, 4, 32, cfg.max_suppressed_ids, greedy=True)):  # fmt: skip
        assert spec in runner.graphs
        ep = torch.export.export(runner.graphs[spec], example_inputs(spec), strict=False)
        mutated = set(ep.run_decompositions().graph_signature.buffers_to_mutate.values())
        counts = set() if spec.greedy else {"counts.counts"}
        assert mutated == {"cache.k0", "cache.v0", "cache.k1", "cache.v1", *counts}, spec.name
        assert_export_matches_eager(runner, spec, ep)


def test_rejected_drafts_leave_no_trace(small_runner) -> None:
    """K/V written at the positions of rejected (and padding) drafts is harmless: a runner that
    verified garbage drafts then decodes with exactly the logits of one that never saw them."""
    src, cfg = small_runner
    a = Runner(src.arch, src.target, src.load(0), cfg)
    b = Runner(src.arch, src.target, src.load(0), cfg)
    m = cfg.max_suppressed_ids
    none = torch.full((1, m), -1)
    slot = torch.tensor([1])
    pos = torch.arange(8)[None]
    prefill = StepInputs(
        input_ids=torch.tensor([[11, 4, 90, 17, 3, 3, 28, 5]]),
        positions=pos,
        slots=slot,
        mask=make_mask(pos, 16),
        last_idx=torch.tensor([7]),
        suppress_ids=none,
        params=torch.tensor([[0.0, 0, 1, 0, 1, 0, 0]]),
        uniforms=torch.zeros(1),
    )
    ctx = GraphSpec(CONTEXT, 1, 8, 16, m)
    first = int(a.run(ctx, prefill).tokens[0])
    assert int(b.run(ctx, prefill).tokens[0]) == first

    def decode(r: Runner, tok: int, p: int):
        pos = torch.tensor([[p]])
        inputs = StepInputs(
            torch.tensor([[tok]]), pos, slot, make_mask(pos, 16), torch.zeros(1, dtype=torch.int64), none
        )
        return r.run(GraphSpec(DECODE, 1, 1, 16, m, greedy=True), inputs)

    want = decode(b, first, 8)
    # a: one verify step with three drafts, each a token the target does not pick, at positions 9..11
    v = src.arch.vocab_size
    bad = [(int(want.tokens[0]) + i) % v for i in (1, 2, 3)]
    window = torch.arange(8, 12)[None]
    verify_step = StepInputs(
        input_ids=torch.tensor([[first, *bad]]),
        positions=window,
        slots=slot,
        mask=make_mask(window, 16),
        suppress_ids=none,
        num_drafts=torch.tensor([3]),
    )
    out = a.run(GraphSpec(SPECULATE, 1, 4, 16, m, greedy=True), verify_step)
    assert int(out.num_accepted[0]) == 0 and int(out.tokens[0, 0]) == int(want.tokens[0])
    torch.testing.assert_close(out.logits[0, 0], want.logits[0], rtol=0, atol=1e-5)
    assert a.cache.k0[1, :, 9:12].abs().sum() > 0  # the garbage is really in a's cache
    tok = int(want.tokens[0])
    for p in range(9, 14):  # every later step reads positions 9..11 only after writing them again
        got, want = decode(a, tok, p), decode(b, tok, p)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
        tok = int(want.tokens[0])


# ---- through the engine ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_hf(seed=11)


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    return [hf_greedy(model, p, N) for p in PROMPTS]


@pytest.fixture(scope="module")
def plain(model):
    with Engine(source_from_hf(model), PLAIN) as eng:
        yield eng


@pytest.fixture(scope="module")
def ngram(model):
    with Engine(source_from_hf(model), CONFIG, adaptive=None) as eng:
        yield eng


@pytest.fixture(scope="module")
def oracle(model, reference):
    drafter = OracleDrafter(
        {tuple(p): r for p, r in zip(PROMPTS, reference, strict=True)}, model.config.vocab_size, K
    )
    with Engine(source_from_hf(model), CONFIG, drafter=drafter, adaptive=None) as eng:
        yield eng


def record(engine: Engine) -> list[tuple[GraphSpec, list[int]]]:
    """(spec, accepted drafts per row of a verify step) of every step the engine runs from now on."""
    ran: list[tuple[GraphSpec, list[int]]] = []
    run = engine.executor.run

    def spy(spec, inputs):
        out = run(spec, inputs)
        accepted = [] if out.num_accepted is None else out.num_accepted[inputs.num_drafts > 0].tolist()
        ran.append((spec, accepted))
        return out

    engine.executor.run = spy  # type: ignore[method-assign]
    return ran


def staggered(engine: Engine, requests: list[Request]) -> list[list[int]]:
    """One request joins per step, so rows with and without drafts share verify steps and the batch
    bucket changes mid-stream."""
    todo, ids, tokens = list(requests), [], {}
    while todo or engine.has_unfinished():
        if todo:
            ids.append(engine.add_request(todo.pop(0)))
            tokens[ids[-1]] = []
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[i] for i in ids]


def test_ngram_greedy_parity(ngram: Engine, reference) -> None:
    """n-gram drafts (what a random model's own loops give it) verified: transformers' tokens, batched,
    staggered and one at a time."""
    ran = record(ngram)
    try:
        before = ngram.speculation_stats
        res = ngram.generate([greedy(p) for p in PROMPTS])
        assert [t for t, _ in res.values()] == reference
        assert all(why == FinishReason.LENGTH for _, why in res.values())
        assert staggered(ngram, [greedy(p) for p in PROMPTS]) == reference
        for p, ref in zip(PROMPTS, reference, strict=True):
            ((toks, _),) = ngram.generate([greedy(p)]).values()
            assert toks == ref
        stats = ngram.speculation_stats
        assert stats.accepted_tokens - before.accepted_tokens > N  # drafts were really accepted
        kinds = {spec.kind for spec, _ in ran}
        assert {SPECULATE, DECODE} <= kinds  # verify steps, and token generation when no row drafts
        assert {spec.batch for spec, _ in ran if spec.kind == SPECULATE} >= {1, 4}
    finally:
        del ngram.executor.run
    assert ngram.free_slots == 4 and not ngram.has_unfinished()


def test_oracle_drafts_every_acceptance_count(oracle: Engine, reference) -> None:
    """Drafts right up to a cycling position: verify steps accept 0..k drafts (k: the bonus token),
    with rows of other acceptance counts and rows without drafts in the same step."""
    ran = record(oracle)
    try:
        assert staggered(oracle, [greedy(p) for p in PROMPTS]) == reference
    finally:
        del oracle.executor.run
    accepted = [a for spec, acc in ran if spec.kind == SPECULATE for a in acc]
    assert set(accepted) == set(range(K + 1))
    assert all(spec.greedy for spec, _ in ran if spec.kind == SPECULATE)


def test_limits_are_exact_with_several_tokens_per_step(oracle: Engine, plain: Engine, reference) -> None:
    """max_new_tokens is never overshot, a stop id among accepted drafts ends the stream there, an
    abort frees the slot, and min_new_tokens' suppression matches the non-speculative engine."""
    for n in (1, 2, 3, 5, 7, 11):
        ((toks, why),) = oracle.generate([greedy(PROMPTS[1], n)]).values()
        assert toks == reference[1][:n] and why == FinishReason.LENGTH
    stop = reference[3][9]
    first = reference[3].index(stop)
    ((toks, why),) = oracle.generate([greedy(PROMPTS[3], stop_token_ids=(stop,))]).values()
    assert toks == reference[3][: first + 1] and why == FinishReason.STOP_TOKEN
    suppressed = greedy(PROMPTS[3], 20, stop_token_ids=(stop,), min_new_tokens=first + 3)
    ((want, _),) = plain.generate([suppressed]).values()
    ((got, _),) = oracle.generate([suppressed]).values()
    assert got == want and stop not in got[: first + 3]
    # abort while speculating: reported once, the slot free at the next step
    rid = oracle.add_request(greedy(PROMPTS[0], 1000))
    got_tokens: list[int] = []
    while len(got_tokens) < 10:
        for o in oracle.step():
            got_tokens += o.new_token_ids
    assert oracle.abort(rid)
    (out,) = oracle.step()
    assert out.finish_reason == FinishReason.ABORTED and oracle.free_slots == 4
    assert got_tokens == reference[0][: len(got_tokens)]


def test_logprobs_penalties_and_seeds_match_the_non_speculative_engine(ngram: Engine, plain: Engine) -> None:
    """Rows that run the full verify graph: greedy with logprobs (each output position's raw
    logprobs), greedy with penalties (each position sees the counts of the tokens before it), and
    seeded sampling: reproducible and batch-invariant."""
    reqs = [
        Request(PROMPTS[1], SamplingParams(logprobs=True, top_logprobs=3), StoppingCriteria(24, ignore_eos=True)),
        Request(PROMPTS[2], SamplingParams(repetition_penalty=1.3, frequency_penalty=0.2),
                StoppingCriteria(24, ignore_eos=True)),
    ]  # fmt: skip
    before = ngram.speculation_stats.verified_rows
    want, got = plain.generate(reqs), ngram.generate(reqs)
    assert ngram.speculation_stats.verified_rows > before
    assert [t for t, _ in got.values()] == [t for t, _ in want.values()]
    lp_plain = [o for o in _outputs(plain, reqs[0])]
    lp_spec = [o for o in _outputs(ngram, reqs[0])]
    assert [t.token_id for t in lp_spec] == [t.token_id for t in lp_plain]
    for a, b in zip(lp_spec, lp_plain, strict=True):
        assert abs(a.logprob - b.logprob) < 1e-4 and [i for i, _ in a.top] == [i for i, _ in b.top]
    sampled = [
        Request(p, SamplingParams(temperature=0.9, top_k=20, seed=s), StoppingCriteria(24, ignore_eos=True))
        for s, p in enumerate(PROMPTS)
    ]
    together = [t for t, _ in ngram.generate(sampled).values()]
    alone = [next(iter(ngram.generate([r]).values()))[0] for r in sampled]
    assert together == alone == [t for t, _ in ngram.generate(sampled).values()]


def _outputs(engine: Engine, request: Request):
    rid = engine.add_request(request)
    out = []
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid and o.logprobs:
                out += o.logprobs
    return out


def test_adaptive_fallback_to_token_generation(model, reference) -> None:
    """Drafts that are always wrong: a row pauses speculating, probes again ever more rarely, and the
    steps are mostly plain token generation; the tokens are transformers' all the same."""
    drafter = WrongDrafter(token=0)
    with Engine(source_from_hf(model), CONFIG, drafter=drafter) as engine:
        ran = record(engine)
        ((toks, _),) = engine.generate([greedy(PROMPTS[2], N)]).values()
        assert toks == reference[2]
        verifies = sum(spec.kind == SPECULATE for spec, _ in ran)
        decodes = sum(spec.kind == DECODE for spec, _ in ran)
        assert 2 <= verifies <= N // 4 and decodes >= N // 2
        # four greedy rows: the step's gate keeps the whole batch out of the verify graph sooner
        ran.clear()
        res = engine.generate([greedy(p) for p in PROMPTS])
        assert [t for t, _ in res.values()] == reference
        verifies = sum(spec.kind == SPECULATE for spec, _ in ran)
        assert 2 <= verifies <= N // 6


def test_gate_measures_what_speculating_costs(model, reference) -> None:
    """Drafts that are mostly right but take 0.3 s to make (a token-generation step of this model
    takes milliseconds): once the engine has timed both kinds of step, a verify costs far more than
    its accepted drafts gain, and the greedy row stops speculating; the tokens are transformers'."""

    class SlowOracle(OracleDrafter):
        def propose(self, rows):
            time.sleep(0.3)
            return super().propose(rows)

    refs = {tuple(p): r for p, r in zip(PROMPTS, reference, strict=True)}
    with Engine(
        source_from_hf(model), CONFIG, drafter=SlowOracle(refs, model.config.vocab_size, K)
    ) as engine:
        ran = record(engine)
        ((toks, _),) = engine.generate([greedy(PROMPTS[2], N)]).values()
        assert toks == reference[2]
        verifies = sum(spec.kind == SPECULATE for spec, _ in ran)
        # two decode steps timed first, then the first verify (a warm-up) and the one that is timed;
        # afterwards only the closed gate's probes (after 16 closed steps, then 32, ...)
        assert 1 <= verifies <= 5, verifies


# ---- the engine's sampled distribution, exactly --------------------------------------------------------


@pytest.mark.slow
def test_engine_sampling_distribution_with_and_without_speculation() -> None:
    """A tiny model over 8 tokens with sharp logits: the joint of its first two sampled tokens, from
    the engine with and without speculation (drafts: the greedy continuation, often accepted),
    against the distribution transformers' logits give (temperature 1.3, repetition penalty 1.2)."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    v = 8
    model = tiny_hf(seed=31, vocab_size=v)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)  # sharp distributions: drafts often right
    prompt = [1, 2, 3, 1, 2]
    sp = dict(temperature=1.3, repetition_penalty=1.2)

    @torch.no_grad()
    def dist(ids: list[int]) -> torch.Tensor:
        x = model(torch.tensor([ids])).logits[:, -1].float()
        x = RepetitionPenaltyLogitsProcessor(sp["repetition_penalty"])(torch.tensor([ids]), x)
        return torch.softmax(x / sp["temperature"], -1)[0]

    p1 = dist(prompt)
    # the first token comes from the prefill; the step after it verifies one draft (the greedy
    # continuation), giving the second token and, when accepted, the third (the bonus)
    exact = torch.zeros(v, v)  # P(t2, t3) = sum over t1 of P(t1) P(t2 | t1) P(t3 | t1, t2)
    for t1 in range(v):
        p2 = dist([*prompt, t1])
        exact += p1[t1] * p2[:, None] * torch.stack([dist([*prompt, t1, t2]) for t2 in range(v)])
    greedy_next = {t: int(dist([*prompt, t]).argmax()) for t in range(v)}

    class Greedy(WrongDrafter):
        def propose(self, rows):
            return [Proposal((greedy_next[r.tokens[-1]],)) for r in rows]

    rows = 800
    cfg = RuntimeConfig(max_batch_size=32, max_seq_len=16, context_buckets=(8,), speculation="ngram",
                        num_speculative_tokens=1, num_candidates=v, cpu_linear="aten")  # fmt: skip
    src = source_from_hf(model)
    for spec_on in (False, True):
        config = cfg if spec_on else dataclasses.replace(cfg, speculation="off")
        kw = {"drafter": Greedy(0), "adaptive": None} if spec_on else {}
        with Engine(src, config, **kw) as engine:
            reqs = [Request(prompt, SamplingParams(seed=i, **sp), StoppingCriteria(3, ignore_eos=True))
                    for i in range(rows)]  # fmt: skip
            out = engine.generate(reqs)
            stats = engine.speculation_stats
        counts = torch.zeros(v, v)
        for toks, _ in out.values():
            counts[toks[1], toks[2]] += 1
        expected = exact * rows
        keep = expected > 5  # Pearson's rule of thumb; the rest pooled into one cell
        stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
        rest_o, rest_e = float(counts[~keep].sum()), float(expected[~keep].sum())
        stat += (rest_o - rest_e) ** 2 / rest_e if rest_e > 0 else 0.0
        df = int(keep.sum()) - (0 if rest_e > 0 else 1)
        assert stat < chi2_critical(df), (spec_on, stat, df)
        if spec_on:
            assert stats.verified_rows == rows and stats.accepted_tokens > rows // 4  # really verified


# ---- a draft model, and tp = 2 -------------------------------------------------------------------------


def test_int8_self_draft(model, reference, tmp_path) -> None:
    """The int8 artifact of the same model drafts for its fp32 self: transformers' greedy tokens,
    most drafts accepted (its q is close to p), seeded sampling reproducible; a draft model with
    another vocabulary is refused with the reason."""
    from exec_service.engine.draft_model import DraftVocabularyError
    from tests.hf_reference import HFShards

    model.save_pretrained(tmp_path / "ckpt")
    draft = HFShards(tmp_path / "ckpt", quantize="int8")
    cfg = dataclasses.replace(CONFIG, speculation="draft", num_candidates=128)
    with Engine(source_from_hf(model), cfg, draft_source=draft, adaptive=None) as engine:
        assert staggered(engine, [greedy(p) for p in PROMPTS]) == reference
        stats = engine.speculation_stats
        assert stats.accepted_tokens > 0.8 * stats.draft_tokens and stats.mean_accepted_length > 3
        sampled = [
            Request(
                p, SamplingParams(temperature=0.8, top_p=0.9, seed=s), StoppingCriteria(16, ignore_eos=True)
            )
            for s, p in enumerate(PROMPTS)
        ]
        together = [t for t, _ in engine.generate(sampled).values()]
        alone = [next(iter(engine.generate([r]).values()))[0] for r in sampled]
        assert together == alone
        assert engine.speculation_stats.accepted_tokens > stats.accepted_tokens  # sampled rows accepted some
    # an int8 target speculating: the same tokens as without (int8 verify windows up to 64 rows run
    # the kernel decode uses)
    with Engine(draft, CONFIG, adaptive=None) as spec, Engine(draft, PLAIN) as plain_int8:
        want = [t for t, _ in plain_int8.generate([greedy(p, 24) for p in PROMPTS]).values()]
        assert [t for t, _ in spec.generate([greedy(p, 24) for p in PROMPTS]).values()] == want
        assert spec.speculation_stats.accepted_tokens > 0
    other = source_from_hf(tiny_hf(seed=2, vocab_size=99))
    with pytest.raises(DraftVocabularyError, match="99 tokens, the target's 101"):
        Engine(source_from_hf(model), cfg, draft_source=other)
    with pytest.raises(ValueError, match="needs a draft model"):
        Engine(source_from_hf(model), cfg)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tp2_speculation(model, reference) -> None:
    """tp = 2 (vocab 101 padded to 102 over two ranks; each rank's candidates merged): n-gram
    speculation gives transformers' greedy tokens and the same seeded samples as tp = 1, and a
    draft model (tp 1, beside rank 0) drafts for a tp 2 target."""
    sampled = [
        Request(
            p,
            SamplingParams(temperature=0.9, top_k=30, seed=s, logprobs=True),
            StoppingCriteria(20, ignore_eos=True),
        )
        for s, p in enumerate(PROMPTS)
    ]
    with Engine(source_from_hf(model), CONFIG, adaptive=None) as one:
        want = [t for t, _ in one.generate(sampled).values()]
    with Engine(source_from_hf(model, tp=2), CONFIG, adaptive=None) as two:
        assert two.tp == 2
        assert staggered(two, [greedy(p) for p in PROMPTS]) == reference
        assert [t for t, _ in two.generate(sampled).values()] == want
        assert two.speculation_stats.accepted_tokens > N
    cfg = dataclasses.replace(CONFIG, speculation="draft", num_candidates=128)
    with Engine(source_from_hf(model, tp=2), cfg, draft_source=source_from_hf(model), adaptive=None) as two:
        res = two.generate([greedy(p) for p in PROMPTS])
        assert [t for t, _ in res.values()] == reference
        stats = two.speculation_stats
        assert stats.accepted_tokens == stats.draft_tokens > 0  # the same weights: p == q


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_verify_graphs_compiled(small_runner) -> None:
    """Both verify variants under torch.compile(fullgraph, static shapes) — what a graph set holds:
    the outputs of two consecutive windows equal eager's, so the second call read the K/V the first
    one wrote in the compiled graph."""
    src, cfg = small_runner
    cfg = dataclasses.replace(cfg, return_logits=False, kv_buckets=(32,))
    eager = Runner(src.arch, src.target, src.load(0), cfg)
    compiled = Runner(src.arch, src.target, src.load(0), dataclasses.replace(cfg, compile=True))
    m = cfg.max_suppressed_ids
    for spec in (
        GraphSpec(SPECULATE, 1, 4, 32, m, greedy=True),
        GraphSpec(SPECULATE, 1, 4, 32, m, draft_width=1),
    ):
        assert compiled.runs_compiled(spec)
        for start in (0, 4):  # two windows of one sequence in slot 1: [0..3], then [4..7]
            inputs = example_step(spec)
            pos = inputs.positions + start
            inputs = dataclasses.replace(
                inputs,
                input_ids=torch.tensor([[17, 5, 5, 90]]) + start,
                positions=pos,
                slots=torch.tensor([1]),
                mask=make_mask(pos, 32),
                num_drafts=torch.tensor([2]),
            )
            if inputs.params is not None:
                inputs = dataclasses.replace(
                    inputs, params=torch.tensor([[0.8, 0, 1, 0, 1.1, 0, 0]]), draws=torch.rand(1, 4)
                )
            want, got = eager.run(spec, inputs), compiled.run(spec, inputs)
            for name in spec.output_names():
                torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=1e-5)
