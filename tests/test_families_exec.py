"""Every family token-exact with transformers through prepare -> exec runtime (the shared tester in
``tests/family_exec.py``; adding a family is one ``CASES`` entry there).

Per case: 32 greedy tokens for 3 prompts (batched together) identical to transformers ``generate``
and first-step logits within 1e-4, at tp = 1 and tp = 2; a bf16 artifact's first-step logits within
the documented tolerance of the fp32 transformers logits (docs/families/README.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exec_service.engine import Engine, RuntimeConfig
from exec_service.model.loading import ManifestShards
from prep_service.api import PrepareRequest
from prep_service.convert import prepare
from tests.family_configs import save_llama4_multimodal
from tests.family_exec import CASES, CONFIG, N_NEW, PROMPTS, FamilyCase, run_engine
from tests.helpers import assert_export_matches_eager

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
    assert src.target.tp_degree == 2
    with Engine(src, CONFIG) as engine:
        check_parity(case, engine)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_first_logits_within_tolerance(cases: dict[str, FamilyCase], name: str) -> None:
    case = cases[name]
    src = case.source(1, "bfloat16")
    assert src.target.dtype == "bfloat16"
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
    src = ManifestShards(res.manifest_uri)
    assert src.arch.nope_layers == (3,) and src.arch.chunked_layers == (0, 1, 2)
    with Engine(src, CONFIG) as engine:
        check_parity(case, engine)


def test_longrope_refuses_buckets_that_would_pick_short_factors(cases: dict[str, FamilyCase]) -> None:
    """A prefill chunk ending at or below original_max (32) of a longer prompt would use the short
    factors where transformers uses the long ones: refused up front."""
    src = cases["phi3"].source(1)
    bad = RuntimeConfig(max_batch_size=1, max_seq_len=64, context_buckets=(16, 32))
    with pytest.raises(ValueError, match="largest context bucket"):
        Engine(src, bad)
    ok = RuntimeConfig(max_batch_size=1, max_seq_len=32, context_buckets=(16, 32))
    with Engine(src, ok) as engine:  # nothing longer than 32 fits: allowed
        assert engine.config.max_seq_len == 32


def test_shared_tester_covers_every_registered_family() -> None:
    from shared.families import REGISTRY

    served = {f for f, _ in CASES.values()} | {"llama"}  # llama: tests/test_exec_*.py
    assert {fam.name for fam in REGISTRY.values()} <= served
    assert N_NEW == 32 and len(PROMPTS) == 3


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
    for spec in rc.graph_specs():
        if (spec.kind, spec.seq, spec.kv_len) not in ((CONTEXT, 64, 64), (DECODE, 1, 64)):
            continue
        ep = torch.export.export(runner.graphs[spec], example_inputs(spec), strict=False)
        assert_export_matches_eager(runner, spec, ep)
