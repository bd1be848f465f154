"""Every family token-exact with transformers through prepare -> exec runtime (the shared tester in
``tests/family_exec.py``; adding a family is one ``CASES`` entry there).

Per case: 32 greedy tokens for 3 prompts (batched together) identical to transformers ``generate``
and first-step logits within 1e-4, at tp = 1 and tp = 2; a bf16 artifact's first-step logits within
the documented tolerance of the fp32 transformers logits (docs/families/README.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exec_service.artifact import open_artifact
from exec_service.engine import Engine, RuntimeConfig
from prep_service.api import PrepareRequest
from prep_service.convert import prepare
from tests.drafters import OracleDrafter
from tests.family_configs import save_llama4_multimodal
from tests.family_exec import CASES, CONFIG, N_NEW, PROMPTS, SPECULATIVE, FamilyCase, run_engine
from tests.helpers import assert_export_matches_eager
from tests.hf_reference import hf_greedy

pytestmark = pytest.mark.timeout(600)

# bf16 artifact vs fp32 transformers, first-step logits: max |diff| <= BF16_TOL * max(1, max |ref|)
# (measured worst 0.006 on logits of magnitude ~0.5: ~5x headroom)
BF16_TOL = 0.03


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FamilyCase]:
    return {
        name: FamilyCase(name, family, overrides, tmp_path_factory.mktemp(name))
        for name, (family, overrides) in CASES.items()
    }


def check_parity(case: FamilyCase, engine: Engine) -> None:
    tokens, logits = run_engine(engine, PROMPTS)
    assert tokens == case.reference()
    for got, prompt in zip(logits, PROMPTS, strict=True):
        torch.testing.assert_close(got, case.reference_logits(prompt), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_parity_tp1(cases: dict[str, FamilyCase], name: str) -> None:
    case = cases[name]
    with Engine(case.source(1), CONFIG) as engine:
        check_parity(case, engine)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_parity_tp2(cases: dict[str, FamilyCase], name: str) -> None:
    """Experts sharded on the intermediate dim (every rank holds every expert's slice), router
    replicated; kv heads 2 split over 2 ranks; vocab 101 padded to 102."""
    case = cases[name]
    src = case.source(2)
    # really split: each rank holds half of the (padded) vocabulary rows of transformers' embedding
    ref = case.model.get_input_embeddings().weight
    embed = [src.load(r)["embed.weight"] for r in range(2)]
    assert embed[0].shape == embed[1].shape and embed[0].shape[0] < ref.shape[0]
    assert torch.equal(torch.cat(embed)[: ref.shape[0]], ref)
    with Engine(src, CONFIG) as engine:
        check_parity(case, engine)


def check_speculative_parity(case: FamilyCase, tp: int) -> None:
    """Verify steps (k = 3) whose drafts are transformers' own tokens with one of them wrong at a
    cycling position: every acceptance count from 0 to k occurs, and the tokens are transformers'
    — through the family's options over multi-token windows (Phi-3's longrope re-encode at the
    switch length, sliding windows, Llama4's chunks and NoPE layers, MoE routing per position)."""
    refs = case.reference()
    drafter = OracleDrafter(
        {tuple(p): r for p, r in zip(PROMPTS, refs, strict=True)}, case.model.config.vocab_size, 3
    )
    accepted: list[int] = []
    with Engine(case.source(tp), SPECULATIVE, drafter=drafter, adaptive=None) as engine:
        run = engine.executor.run

        def spy(spec, inputs):
            out = run(spec, inputs)
            if out.num_accepted is not None:
                accepted.extend(out.num_accepted[inputs.num_drafts > 0].tolist())
            return out

        engine.executor.run = spy  # type: ignore[method-assign]
        tokens, _ = run_engine(engine, PROMPTS)
    assert tokens == refs
    assert set(accepted) == {0, 1, 2, 3}


@pytest.mark.parametrize("name", sorted(CASES))
def test_speculative_greedy_parity_tp1(cases: dict[str, FamilyCase], name: str) -> None:
    check_speculative_parity(cases[name], 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_speculative_greedy_parity_tp2(cases: dict[str, FamilyCase], name: str) -> None:
    check_speculative_parity(cases[name], 2)


# compiled graphs (torch.compile per static shape, what a graph set holds): max batch 2 and one
# context / KV bucket keep it to 3 graphs per case (ctx_b1_s64_k128, tkg_b1/b2 greedy)
COMPILED = RuntimeConfig(
    max_batch_size=2, max_seq_len=128, context_buckets=(64,), kv_buckets=(128,), compile=True
)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_graphs_token_exact(cases: dict[str, FamilyCase], name: str, tp: int) -> None:
    """Every family's graphs compiled (at tp 2 with functional collectives inside them) give
    transformers' tokens, the prompts staggered so batch buckets change mid-stream."""
    case = cases[name]
    with Engine(case.source(tp), COMPILED) as engine:
        tokens, _ = run_engine(engine, PROMPTS)
        compiled = [s for s in engine.executor.runner._fns if engine.executor.runner.runs_compiled(s)]
    assert tokens == case.reference()
    assert len(compiled) >= 3  # the graphs that ran were compiled ones


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_first_logits_within_tolerance(cases: dict[str, FamilyCase], name: str) -> None:
    case = cases[name]
    src = case.source(1, "bfloat16")
    weights = src.load(0)
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.bfloat16}
    ref = case.model.get_input_embeddings().weight
    assert torch.equal(weights["embed.weight"][: ref.shape[0]], ref.to(torch.bfloat16))
    with Engine(src, CONFIG) as engine:
        _, logits = run_engine(engine, PROMPTS, 1)
    for got, prompt in zip(logits, PROMPTS, strict=True):
        ref = case.reference_logits(prompt)
        bound = BF16_TOL * max(1.0, float(ref.abs().max()))
        assert float((got.float() - ref).abs().max()) <= bound


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_llama4_from_conditional_generation_checkpoint(
    cases: dict[str, FamilyCase], tmp_path: Path, tp: int
) -> None:
    """The language_model part of a Llama4ForConditionalGeneration checkpoint serves exactly like
    the text-only Llama4ForCausalLM it was built from."""

    case = cases["llama4"]
    text = case.model
    save_llama4_multimodal(text, tmp_path / "mm")
    res = prepare(
        PrepareRequest(source=str(tmp_path / "mm"), tp_degree=tp, output=f"file://{tmp_path}/store")
    )
    src = open_artifact(res.manifest_uri)
    cfg = text.config  # the text model's own config says which layers are NoPE / chunked
    assert src.arch.nope_layers == tuple(i for i, rope in enumerate(cfg.no_rope_layers) if not rope)
    assert src.arch.chunked_layers == tuple(
        i for i, kind in enumerate(cfg.layer_types) if kind == "chunked_attention"
    )
    assert src.arch.nope_layers and src.arch.chunked_layers  # both kinds present in the test model
    with Engine(src, CONFIG) as engine:
        check_parity(case, engine)


def test_longrope_refuses_buckets_that_would_pick_short_factors(cases: dict[str, FamilyCase]) -> None:
    """A prefill chunk ending at or below original_max (32) of a longer prompt would use the short
    factors where transformers uses the long ones: refused up front."""
    src = cases["phi3"].source(1)
    bad = RuntimeConfig(max_batch_size=1, max_seq_len=64, context_buckets=(16, 32))
    with pytest.raises(ValueError, match="largest context bucket"):
        Engine(src, bad)
    ok = RuntimeConfig(max_batch_size=1, max_seq_len=32, context_buckets=(16, 32), return_logits=True)
    with Engine(src, ok) as engine:  # nothing longer than 32 fits: allowed, and exact up to 32
        for prompt in PROMPTS[:2]:
            n = ok.max_seq_len - 1 - len(prompt)  # the last forward sees position 30 < 32
            tokens, _ = run_engine(engine, [prompt], n)
            assert tokens == [hf_greedy(cases["phi3"].model, prompt, n)]


def test_shared_tester_covers_every_registered_family(cases: dict[str, FamilyCase]) -> None:
    from shared.families import REGISTRY

    served = {f for f, _ in CASES.values()} | {"llama"}  # llama: tests/test_exec_*.py
    assert {fam.name for fam in REGISTRY.values()} <= served
    # the prompts reach what the cases switch on (see PROMPTS in tests/family_exec.py)
    lens = [len(p) for p in PROMPTS]
    phi3 = cases["phi3_window"].model.config
    orig = phi3.rope_parameters["original_max_position_embeddings"]
    assert any(n <= orig < n + N_NEW for n in lens)  # crosses original_max while generating
    assert max(lens) > max(CONFIG.context_buckets)  # prefilled in chunks
    assert max(lens) > cases["llama4"].model.config.attention_chunk_size
    assert max(lens) > phi3.sliding_window
    assert len(PROMPTS) <= CONFIG.max_batch_size and max(lens) + N_NEW <= CONFIG.max_seq_len


@pytest.mark.parametrize("name", ["phi3_window", "mixtral", "qwen3_moe", "llama4"])
def test_family_graphs_export(cases: dict[str, FamilyCase], name: str) -> None:
    """torch.export (the CI proxy for Neuron traceability) of a prefill and a decode graph with the
    family options on: longrope table pick, sliding / chunked masks, NoPE + temperature tuning, MoE
    routers. The exported program computes what the eager graph does."""
    from exec_service.runtime.graphs import CONTEXT, DECODE, example_inputs
    from exec_service.runtime.runner import Runner

    src = cases[name].source(1)
    rc = RuntimeConfig(max_batch_size=2, max_seq_len=64, context_buckets=(8, 64))
    runner = Runner(src.arch, src.target, src.load(0), rc)
    exported = []
    for spec in rc.graph_specs():
        if (spec.kind, spec.seq, spec.kv_len) not in ((CONTEXT, 64, 64), (DECODE, 1, 64)):
            continue
        ep = torch.export.export(runner.graphs[spec], example_inputs(spec), strict=False)
        assert_export_matches_eager(runner, spec, ep)
        exported.append(spec.kind)
    assert set(exported) == {CONTEXT, DECODE}  # both kinds were found and checked
