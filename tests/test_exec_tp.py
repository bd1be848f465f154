"""Tensor parallelism on cpu: one process per rank (gloo on 127.0.0.1), rank 0 drives.

Greedy parity with transformers at tp = 2 for the GQA layouts (plain split, forced CONVERT_TO_MHA,
and 9 q / 3 kv heads padded to 10 q heads), first-step logits, seeded sampling identical to tp = 1,
the greedy decode graph at tp = 2 (the step header carries the graph variant), and clean worker
shutdown."""

from __future__ import annotations

import os

import pytest
import torch

from exec_service.engine import Engine, Request, RuntimeConfig, SamplingParams, StoppingCriteria
from exec_service.runtime.graphs import DECODE, GraphSpec
from tests.hf_reference import hf_greedy, hf_last_logits, source_from_hf, tiny_hf

PROMPTS = [
    [7, 3, 12],
    [40, 41, 42, 43, 44, 45, 46, 47, 48],
    list(range(5, 22)),
    [(i * 37) % 97 + 3 for i in range(40)],
]
CONFIG = RuntimeConfig(max_batch_size=4, max_seq_len=128, context_buckets=(8, 16), return_logits=True)
N = 48

pytestmark = pytest.mark.timeout(300)


def greedy(p: list[int], n: int = N) -> Request:
    return Request(p, stopping=StoppingCriteria(max_new_tokens=n, ignore_eos=True))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def check_greedy_parity(model, engine: Engine) -> None:
    ref = [hf_greedy(model, p, N) for p in PROMPTS]
    res = engine.generate([greedy(p) for p in PROMPTS])  # one batch
    assert [t for t, _ in res.values()] == ref
    for p, r in zip(PROMPTS, ref, strict=True):  # one at a time
        ((toks, _),) = engine.generate([greedy(p)]).values()
        assert toks == r
    for p in PROMPTS:  # first-step logits (gathered over the vocab shards)
        engine.add_request(greedy(p, 1))
        while not (outs := engine.step()):  # a long prompt: one prefill chunk per step
            pass
        (out,) = outs
        torch.testing.assert_close(out.logits[0], hf_last_logits(model, p), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_tp2_greedy_parity_and_sampling_matches_tp1() -> None:
    model = tiny_hf(seed=21, tie_word_embeddings=True)  # vocab 101: padded to 102 over 2 ranks
    src = source_from_hf(model, tp=2)
    assert src.target.gqa_strategy == "none" and src.target.vocab_size_padded == 102
    sp = [
        SamplingParams(temperature=0.9, top_p=0.9, seed=5, logprobs=True, top_logprobs=3),
        SamplingParams(temperature=1.1, top_k=10, repetition_penalty=1.2, seed=6),
        SamplingParams(temperature=0.8, min_p=0.05, frequency_penalty=0.4, seed=7),
    ]
    reqs = [
        Request(p, s, StoppingCriteria(max_new_tokens=24, ignore_eos=True))
        for s, p in zip(sp, PROMPTS, strict=False)
    ]
    with Engine(source_from_hf(model, tp=1), CONFIG) as one:
        want = [t for t, _ in one.generate(reqs).values()]
    engine = Engine(src, CONFIG)
    pids = engine.executor.worker_pids
    try:
        assert len(pids) == 1
        check_greedy_parity(model, engine)
        got = [t for t, _ in engine.generate(reqs).values()]
        assert got == want  # the per-rank candidate merge picks what tp = 1 picks
    finally:
        engine.close()
    assert all(_gone(p) for p in pids)


@pytest.mark.slow
@pytest.mark.parametrize(
    "heads,kv,strategy,padded",
    [(8, 2, "convert_to_mha", 8), (9, 3, None, 10), (3, 1, None, 4)],
    ids=["8q2kv-mha", "9q3kv-mha-padded", "3q1kv-replicate-padded"],
)
def test_tp2_gqa_layouts(heads: int, kv: int, strategy: str | None, padded: int) -> None:
    model = tiny_hf(seed=22, num_attention_heads=heads, num_key_value_heads=kv, hidden_size=8 * heads)
    src = source_from_hf(model, tp=2, gqa_strategy=strategy)
    if kv == 1:  # MQA: the kv head is replicated to both ranks, q heads padded 3 -> 4, split 2 + 2
        assert src.target.gqa_strategy == "replicate_to_tp_degree" and src.target.kv_heads_per_rank == 1
    else:
        assert src.target.gqa_strategy == "convert_to_mha" and src.target.kv_heads_per_rank == padded // 2
    assert src.target.num_heads_padded == padded
    with Engine(src, CONFIG) as engine:
        check_greedy_parity(model, engine)


def _record_specs(engine: Engine) -> list[GraphSpec]:
    """Every spec rank 0's runner runs from now on (the workers run what the header tells them)."""
    ran: list[GraphSpec] = []
    runner = engine.executor.runner
    run = runner.run
    runner.run = lambda spec, inputs: ran.append(spec) or run(spec, inputs)
    return ran


@pytest.mark.slow
def test_tp2_greedy_graph_token_exact() -> None:
    """All-greedy batches decode through tkg_*_greedy on both ranks, token-exact with transformers;
    a batch with a sampled row runs the full graph and its greedy row stays token-exact, also when
    the step switches to the greedy graph mid-stream once the sampled row has finished."""
    model = tiny_hf(seed=24, tie_word_embeddings=True)  # vocab 101: padded to 102 over 2 ranks
    ref = [hf_greedy(model, p, N) for p in PROMPTS]
    with Engine(source_from_hf(model, tp=2), CONFIG) as engine:
        assert engine.tp == 2 and engine.config.greedy_graphs
        ran = _record_specs(engine)
        res = engine.generate([greedy(p) for p in PROMPTS])
        assert [t for t, _ in res.values()] == ref
        decodes = [s for s in ran if s.kind == DECODE]
        assert len(decodes) >= N - 1 and all(s.greedy for s in decodes)

        half = StoppingCriteria(max_new_tokens=N // 2, ignore_eos=True)
        sampled = Request(PROMPTS[1], SamplingParams(temperature=0.9, top_k=20, seed=3), half)
        ((alone, _),) = engine.generate([sampled]).values()
        ran.clear()
        (mixed_greedy, _), (mixed_sampled, _) = engine.generate([greedy(PROMPTS[3]), sampled]).values()
        assert mixed_greedy == ref[3]
        assert mixed_sampled == alone  # seeded sampling: whatever else is batched, whichever graph
        decodes = [s for s in ran if s.kind == DECODE]
        full = [s for s in decodes if not s.greedy]
        assert len(full) >= N // 2 - 1 and len(decodes) > len(full)  # full graph, then greedy
        assert decodes[: len(full)] == full  # ... in that order


class FailingSource:
    """Rank 1 cannot load its shard."""

    def __init__(self, inner) -> None:
        self.inner, self.arch, self.target = inner, inner.arch, inner.target

    def load(self, rank: int):
        if rank == 1:
            raise OSError("shard rank-00001 is unreadable")
        return self.inner.load(rank)


def test_tp_worker_load_failure_is_reported_and_cleaned_up() -> None:
    import multiprocessing

    src = FailingSource(source_from_hf(tiny_hf(seed=23), tp=2))
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(RuntimeError, match=r"rank 1 failed to load:(.|\n)*shard rank-00001 is unreadable"):
        Engine(src, CONFIG)
    after = {p.pid for p in multiprocessing.active_children()}
    assert after <= before


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


DRIVER = """
import os, signal, sys
from exec_service.engine import Engine, RuntimeConfig
from tests.hf_reference import source_from_hf, tiny_hf

if __name__ == "__main__":
    eng = Engine(source_from_hf(tiny_hf(), tp=2), RuntimeConfig(max_batch_size=1, max_seq_len=16, context_buckets=(8,)))
    print(*eng.executor.worker_pids, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the driver dies without any cleanup
"""


def test_tp_workers_exit_when_the_driver_is_killed(tmp_path) -> None:
    import subprocess
    import sys
    import time

    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=root,
                          env={**os.environ, "PYTHONPATH": root})  # fmt: skip
    pids = [int(x) for x in proc.stdout.split()]
    assert proc.returncode == -9 and len(pids) == 1, proc.stderr[-2000:]
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "orphaned TP worker"
