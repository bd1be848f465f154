"""Engine (tp = 1): greedy parity with transformers, continuous batching, abort, seeded sampling,
logprobs, finish reasons, request validation."""

from __future__ import annotations

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
from tests.hf_reference import hf_greedy, hf_last_logits, source_from_hf, tiny_hf

PROMPTS = [
    [7, 3, 12],
    [40, 41, 42, 43, 44, 45, 46, 47, 48],
    list(range(5, 22)),
    [(i * 37) % 97 + 3 for i in range(40)],
]
CONFIG = RuntimeConfig(max_batch_size=4, max_seq_len=128, context_buckets=(8, 16), return_logits=True)
N = 48


def greedy(n: int = N, **kw) -> Request:
    return Request(kw.pop("prompt"), stopping=StoppingCriteria(max_new_tokens=n, ignore_eos=True), **kw)


@pytest.fixture(scope="module")
def model():
    return tiny_hf(seed=11)


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    return [hf_greedy(model, p, N) for p in PROMPTS]


@pytest.fixture(scope="module")
def engine(model):
    with Engine(source_from_hf(model), CONFIG) as eng:
        yield eng


def test_greedy_parity_batched(engine, reference) -> None:
    # the 40-token prompt is longer than the largest context bucket (16): chunked prefill
    res = engine.generate([greedy(prompt=p) for p in PROMPTS])
    assert [toks for toks, _ in res.values()] == reference
    assert all(why == FinishReason.LENGTH for _, why in res.values())
    assert engine.free_slots == 4 and not engine.has_unfinished()


def test_greedy_parity_one_at_a_time(engine, reference) -> None:
    for p, ref in zip(PROMPTS, reference, strict=True):
        ((toks, _),) = engine.generate([greedy(prompt=p)]).values()
        assert toks == ref


def test_first_step_logits_and_logprobs(engine, model) -> None:
    for p in PROMPTS:
        rid = engine.add_request(
            Request(p, SamplingParams(logprobs=True, top_logprobs=5), StoppingCriteria(max_new_tokens=1))
        )
        steps = 0
        while not (outs := engine.step()):  # one prefill chunk (at most 16 tokens here) per step
            steps += 1
        (out,) = outs
        assert steps == -(-len(p) // 16) - 1  # the 40-token prompt: two silent chunk steps, then this
        assert out.request_id == rid and out.finish_reason == FinishReason.LENGTH
        ref = hf_last_logits(model, p)
        torch.testing.assert_close(out.logits[0], ref, rtol=0, atol=1e-4)
        lsm = torch.log_softmax(ref, -1)
        (lp,) = out.logprobs
        assert lp.token_id == int(ref.argmax())
        assert abs(lp.logprob - float(lsm[lp.token_id])) < 1e-4
        vals, ids = lsm.topk(5)
        assert [t for t, _ in lp.top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), vals, rtol=0, atol=1e-4)


def test_staggered_join_and_abort(engine, model, reference) -> None:
    """A request joining while others decode gets the same tokens as alone; abort frees the slot."""
    a = engine.add_request(greedy(prompt=PROMPTS[0]))
    b = engine.add_request(greedy(prompt=PROMPTS[1], n=1000))  # would run to the context length
    got: dict[str, list[int]] = {a: [], b: []}
    for _ in range(5):
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
    c = engine.add_request(greedy(prompt=PROMPTS[2]))
    d = engine.add_request(greedy(prompt=PROMPTS[3]))
    got[c], got[d] = [], []
    assert engine.abort(b) and not engine.abort("nope")
    reasons = {}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
            if o.finish_reason is not None:
                reasons[o.request_id] = o.finish_reason
    assert got[a] == reference[0] and got[c] == reference[2] and got[d] == reference[3]
    assert reasons[b] == FinishReason.ABORTED and reasons[a] == FinishReason.LENGTH
    assert 5 <= len(got[b]) < 20 and got[b] == hf_greedy(model, PROMPTS[1], len(got[b]))
    assert engine.free_slots == 4 and not engine.abort(b)


def test_more_requests_than_slots_queue(engine, reference) -> None:
    res = engine.generate([greedy(prompt=p) for p in PROMPTS + PROMPTS[:2]])
    assert [t for t, _ in res.values()] == reference + reference[:2]


def test_finish_reasons(engine, model) -> None:
    ref = hf_greedy(model, PROMPTS[1], 20)
    stop = ref[5]
    first = ref.index(stop)
    (r,) = engine.generate(
        [
            Request(
                PROMPTS[1],
                stopping=StoppingCriteria(max_new_tokens=20, stop_token_ids=(stop,), ignore_eos=True),
            )
        ]
    ).values()
    assert r == (ref[: first + 1], FinishReason.STOP_TOKEN)
    eng_eos = ref[3]  # pretend this token is the model's EOS
    engine.eos_token_ids = frozenset({eng_eos})
    try:
        (r,) = engine.generate([Request(PROMPTS[1], stopping=StoppingCriteria(max_new_tokens=20))]).values()
        assert r == (ref[: ref.index(eng_eos) + 1], FinishReason.EOS)
        (r,) = engine.generate([greedy(20, prompt=PROMPTS[1])]).values()  # ignore_eos
        assert r == (ref, FinishReason.LENGTH)
    finally:
        engine.eos_token_ids = frozenset(engine.arch.eos_token_ids)


def test_min_new_tokens(model) -> None:
    ref = hf_greedy(model, PROMPTS[1], 20)
    eos, stop = ref[2], ref[4]
    with Engine(source_from_hf(model), CONFIG, eos_token_ids=(eos,)) as eng:  # EOS mask built in the graphs
        crit = StoppingCriteria(max_new_tokens=20, min_new_tokens=6, stop_token_ids=(stop,))
        ((toks, why),) = eng.generate([Request(PROMPTS[1], stopping=crit)]).values()
    # neither EOS nor the stop token is sampled before 6 tokens (vLLM min_tokens semantics)
    assert eos not in toks[:6] and stop not in toks[:6] and toks[:2] == ref[:2] and toks[2] != eos
    assert len(toks) >= 6 and why in (FinishReason.EOS, FinishReason.STOP_TOKEN, FinishReason.LENGTH)
    if why is not FinishReason.LENGTH:
        assert toks[-1] in (eos, stop) and all(t not in (eos, stop) for t in toks[6:-1])


def test_context_length_finish(engine, model) -> None:
    prompt = PROMPTS[3]  # 40 tokens, max_seq_len 128: 88 new tokens fill the context
    (r,) = engine.generate([greedy(1000, prompt=prompt)]).values()
    assert r[1] == FinishReason.CONTEXT_LENGTH and len(r[0]) == 128 - len(prompt)
    assert r[0] == hf_greedy(model, prompt, len(r[0]))


def test_seeded_sampling_is_batch_invariant(engine) -> None:
    sp = [
        SamplingParams(temperature=0.9, top_p=0.95, seed=1234),
        SamplingParams(temperature=1.2, top_k=20, min_p=0.02, repetition_penalty=1.3, seed=99),
        SamplingParams(temperature=0.7, presence_penalty=0.5, frequency_penalty=0.5, seed=7),
    ]
    alone = []
    for s, p in zip(sp, PROMPTS, strict=False):
        (r,) = engine.generate([Request(p, s, StoppingCriteria(max_new_tokens=24, ignore_eos=True))]).values()
        alone.append(r[0])
    # again, batched with each other and with unseeded noise requests that join at different times
    ids = [
        engine.add_request(
            Request(PROMPTS[3], SamplingParams(temperature=1.0), StoppingCriteria(max_new_tokens=30))
        )
    ]
    engine.step()
    batch = engine.generate(
        [
            Request(p, s, StoppingCriteria(max_new_tokens=24, ignore_eos=True))
            for s, p in zip(sp, PROMPTS, strict=False)
        ]
    )
    assert [t for t, _ in batch.values()] == alone
    while engine.has_unfinished():
        engine.step()
    assert ids
    # sampling really samples: a different seed gives a different continuation
    (other,) = engine.generate(
        [
            Request(
                PROMPTS[0],
                SamplingParams(temperature=0.9, top_p=0.95, seed=4321),
                StoppingCriteria(max_new_tokens=24, ignore_eos=True),
            )
        ]
    ).values()
    assert other[0] != alone[0]


def test_top_k1_equals_greedy(engine, reference) -> None:
    (r,) = engine.generate(
        [
            Request(
                PROMPTS[2],
                SamplingParams(temperature=1.5, top_k=1),
                StoppingCriteria(max_new_tokens=N, ignore_eos=True),
            )
        ]
    ).values()
    assert r[0] == reference[2]


def test_request_validation(engine) -> None:
    with pytest.raises(ValueError, match="at most 127"):
        engine.add_request(Request([1] * 128))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request(Request([1, 101]))
    with pytest.raises(ValueError, match="top_logprobs 21 > the configured maximum 20"):
        engine.add_request(Request([1], SamplingParams(logprobs=True, top_logprobs=21)))
    with pytest.raises(ValueError, match="prompt_token_ids is empty"):
        Request([])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        StoppingCriteria(max_new_tokens=0)
    rid = engine.add_request(Request([1, 2], request_id="dup", stopping=StoppingCriteria(max_new_tokens=1)))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(Request([1, 2], request_id="dup"))
    engine.generate([])
    while engine.has_unfinished():
        engine.step()
    assert rid == "dup"


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the cuda backend is unverified here)"
)
def test_cuda_backend_greedy_parity(model, reference) -> None:
    config = RuntimeConfig(max_batch_size=4, max_seq_len=128, context_buckets=(8, 16), backend="cuda")
    with Engine(source_from_hf(model), config) as engine:
        res = engine.generate([greedy(prompt=p) for p in PROMPTS])
    assert [t for t, _ in res.values()] == reference


def test_slot_accounting_under_random_adds_and_aborts(engine) -> None:
    import random

    rng = random.Random(0)
    live: set[str] = set()
    seen_final: set[str] = set()
    for i in range(60):
        if rng.random() < 0.5:
            p = [rng.randrange(3, 100) for _ in range(rng.randrange(1, 30))]
            n = rng.randrange(1, 12)
            live.add(
                engine.add_request(
                    Request(
                        p,
                        SamplingParams(temperature=rng.choice([0.0, 1.0]), seed=i),
                        StoppingCriteria(max_new_tokens=n),
                    )
                )
            )
        if live and rng.random() < 0.3:
            engine.abort(rng.choice(sorted(live)))
        for out in engine.step():
            assert out.request_id not in seen_final  # nothing after the final output
            if out.finish_reason is not None:
                seen_final.add(out.request_id)
                live.discard(out.request_id)
        assert engine.free_slots + engine.num_running == CONFIG.max_batch_size
    while engine.has_unfinished():
        for out in engine.step():
            if out.finish_reason is not None:
                live.discard(out.request_id)
    assert not live and engine.free_slots == CONFIG.max_batch_size and engine.num_waiting == 0


def test_greedy_decode_graph_choice(model, reference) -> None:
    """All-greedy batches decode through the greedy graph variant (chosen on the host), with the same
    tokens as the full sampler; a request that asks for logprobs or has penalties in the batch puts
    the step back on the full graph, and still gets its logprobs."""
    import dataclasses

    from exec_service.runtime.graphs import DECODE

    with Engine(source_from_hf(model), CONFIG) as eng:
        used = []
        run = eng.executor.run
        eng.executor.run = lambda spec, inputs: used.append(spec) or run(spec, inputs)
        res = eng.generate([greedy(prompt=p) for p in PROMPTS])
        assert [toks for toks, _ in res.values()] == reference
        decodes = [s for s in used if s.kind == DECODE]
        assert decodes and all(s.greedy for s in decodes)
        # min_new_tokens suppression in the greedy graph = in the full one
        crit = StoppingCriteria(max_new_tokens=12, min_new_tokens=12)
        suppressed = eng.generate([Request(p, stopping=crit) for p in PROMPTS])

        used.clear()
        until_n = StoppingCriteria(max_new_tokens=N, ignore_eos=True)
        lp = Request(PROMPTS[1], SamplingParams(logprobs=True, top_logprobs=3), until_n)
        pen = Request(PROMPTS[2], SamplingParams(repetition_penalty=1.3), until_n)
        ids = [eng.add_request(r) for r in (greedy(prompt=PROMPTS[0]), lp)]
        outs = []
        while eng.has_unfinished():
            outs += eng.step()
        assert used and not any(s.greedy for s in used)  # a logprobs row keeps the batch on the full graph
        lps = [lp for o in outs if o.request_id == ids[1] for lp in o.logprobs]
        assert len(lps) == N and all(len(x.top) == 3 and x.top[0][0] == x.token_id for x in lps)
        assert [t for o in outs if o.request_id == ids[0] for t in o.new_token_ids] == reference[0]
        ((pen_toks, _),) = eng.generate([pen]).values()

    with Engine(source_from_hf(model), dataclasses.replace(CONFIG, greedy_graphs=False)) as eng:
        used.clear()
        run_full = eng.executor.run
        eng.executor.run = lambda spec, inputs: used.append(spec) or run_full(spec, inputs)
        res_full = eng.generate([Request(p, stopping=crit) for p in PROMPTS])
        assert used and not any(s.greedy for s in used)
        assert list(res_full.values()) == list(suppressed.values())
        ((pen_full, _),) = eng.generate([pen]).values()
    assert pen_toks == pen_full  # penalties: the full graph either way


class _Recorder:
    """Records the spec of every graph call the engine makes."""

    def __init__(self, engine: Engine) -> None:
        self.specs: list = []
        self._engine, self._run = engine, engine.executor.run
        engine.executor.run = self  # type: ignore[method-assign]

    def __call__(self, spec, inputs):
        self.specs.append(spec)
        return self._run(spec, inputs)

    def close(self) -> None:
        del self._engine.executor.run


def test_decode_runs_in_the_smallest_batch_bucket(engine, reference) -> None:
    """One running request decodes in the batch-1 graph (it does not pay for max_batch_size), two in
    the batch-2 graph; staggered ones move between buckets as they join and finish."""
    rec = _Recorder(engine)
    try:
        ((toks, _),) = engine.generate([greedy(prompt=PROMPTS[0])]).values()
        assert toks == reference[0]
        assert {s.batch for s in rec.specs if s.kind == "tkg"} == {1}
        rec.specs.clear()
        res = engine.generate([greedy(prompt=p) for p in PROMPTS[:2]])
        assert [t for t, _ in res.values()] == reference[:2]
        assert {s.batch for s in rec.specs if s.kind == "tkg"} == {2}
        rec.specs.clear()
        # 3, 9 and 17 tokens: the 17-token prompt needs a second chunk, so it joins a step later
        # (2 rows, then 3 in the full bucket of 4) and finishes a step later (1 row)
        res = engine.generate([greedy(prompt=p) for p in PROMPTS[:3]])
        assert [t for t, _ in res.values()] == reference[:3]
        tkg = [s.batch for s in rec.specs if s.kind == "tkg"]
        assert (tkg[0], tkg[1], tkg[-1]) == (2, 4, 1) and set(tkg) == {1, 2, 4}
    finally:
        rec.close()


def test_a_burst_of_prompts_is_prefilled_together(engine, reference) -> None:
    """Four prompts arriving together: their chunks share ctx graph calls (batch bucket 4), the
    long one chunk by chunk, and every token equals transformers'."""
    rec = _Recorder(engine)
    try:
        res = engine.generate([greedy(prompt=p) for p in PROMPTS])
    finally:
        rec.close()
    assert [t for t, _ in res.values()] == reference
    ctx = [s for s in rec.specs if s.kind == "ctx"]
    # 3/9/17/40 tokens in chunks of 16: step 1 = the first chunk of all four (one call, B = 4);
    # then the second chunks of 17 and 40 (B = 2); then the last chunk of 40 (B = 1)
    assert [(s.batch, s.seq) for s in ctx] == [(4, 16), (2, 16), (1, 8)]


def test_a_long_prompt_holds_running_streams_for_one_chunk_per_step(engine, reference) -> None:
    """While a 40-token prompt is prefilled in chunks of 16, a running stream gets a token every
    step: each step runs one prefill chunk, then decode."""
    rid = engine.add_request(greedy(prompt=PROMPTS[0]))
    for _ in range(3):
        engine.step()
    long_id = engine.add_request(greedy(prompt=PROMPTS[3]))
    got: dict[str, list[int]] = {rid: [], long_id: []}
    steps_until_first = 0
    while not got[long_id]:
        outs = {o.request_id: o for o in engine.step()}
        steps_until_first += 1
        assert len(outs[rid].new_token_ids) == 1  # the running stream never waits a step
        for k, o in outs.items():
            got[k] += o.new_token_ids
    assert steps_until_first == 3  # three chunks (16 + 16 + 8), one per step
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
    assert got[long_id] == reference[3]
