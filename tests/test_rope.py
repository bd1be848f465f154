"""RoPE kinds against transformers 5 as the independent reference.

* Tables: our inverse frequencies and attention scaling (parsed from the HF config by the family, then
  computed by ``exec_service.model.rope``) bit-equal to transformers' own rope functions, for yarn's
  parameters and for dynamic at every sequence length; the decoder's per-row cos/sin bit-equal to
  transformers' rotary embedding run on each row alone.
* Serving: 32 greedy tokens equal to transformers ``generate`` through prepare -> engine, for tiny
  Llama (dynamic, yarn), Qwen3 and Qwen2 (yarn) with prompts below and above the length where the
  scaling starts (the yarn 70-token prompt is prefilled in two chunks), at tp 1 and tp 2.
* The dynamic serving-shape rule and what prep refuses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from exec_service.engine import Engine, RuntimeConfig
from exec_service.model import rope as rope_mod
from exec_service.model.decoder import DecoderModel
from shared.families import llama
from shared.families.base import ROPE_KINDS, Architecture, RopeConfig, UnsupportedModel
from shared.layout import make_target
from tests.family_exec import CONFIG, N_NEW, PROMPTS, FamilyCase, run_engine
from tests.hf_reference import source_from_hf, tiny_hf

pytestmark = pytest.mark.timeout(600)


def hf_config(head_dim: int = 16, max_pos: int = 128, **rope: Any):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters={"rope_theta": 10000.0, **rope},
    )


def ours(cfg) -> RopeConfig:
    """The family's parse of the saved config (what prep stores in the manifest)."""
    return llama.rope_from_hf(cfg.to_dict(), cfg.head_dim)


YARN_CASES: dict[str, dict[str, Any]] = {
    "defaults": {"factor": 4.0, "original_max_position_embeddings": 32},
    "betas_no_truncate": {
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 16,
        "beta_slow": 0.5,
        "truncate": False,
    },
    "mscale_pair": {
        "factor": 8.0,
        "original_max_position_embeddings": 16,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
    },
    "attention_factor": {"factor": 4.0, "original_max_position_embeddings": 32, "attention_factor": 0.9},
    "implicit_factor": {"factor": None, "original_max_position_embeddings": 32},  # 128 / 32
    "partial_rotary": {"factor": 2.0, "original_max_position_embeddings": 64, "partial_rotary_factor": 0.5},
    "small_theta": {"factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 100.0},
    "large_head": {"factor": 4.0, "original_max_position_embeddings": 4096, "rope_theta": 1e6},
}


@pytest.mark.parametrize("name", sorted(YARN_CASES))
def test_yarn_table_and_scaling_equal_transformers(name: str) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = 128 if name == "large_head" else 16
    cfg = hf_config(head_dim, max_pos=128, rope_type="yarn", **YARN_CASES[name])
    ref, ref_scaling = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    rope = ours(cfg)
    assert rope.kind == "yarn"
    assert torch.equal(rope_mod.inv_freq(rope, head_dim, 128), ref)
    assert rope_mod.attention_scaling(rope, 128) == ref_scaling
    if name in ("mscale_pair", "attention_factor", "defaults"):
        assert ref_scaling != 1.0


@pytest.mark.parametrize(
    "theta,factor,head_dim,partial",
    [(10000.0, 2.0, 16, 1.0), (100.0, 8.0, 128, 1.0), (500000.0, 1.1, 64, 0.5), (10000.0, 3, 8, 1.0)],
)
def test_dynamic_tables_equal_transformers_at_every_length(
    theta: float, factor: float, head_dim: int, partial: float
) -> None:
    """A batch of rows, one per sequence length 1..300 (the per-row pow must not take the vectorised
    path that a 0-dim tensor never takes), against transformers at each length alone."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "dynamic", "rope_theta": theta, "factor": factor}
    if partial != 1.0:
        params["partial_rotary_factor"] = partial
    cfg = hf_config(head_dim, max_pos=32, **params)
    rope = ours(cfg)
    init, _ = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu")
    assert torch.equal(rope_mod.inv_freq(rope, head_dim, 32), init)
    lens = torch.arange(1, 301)[:, None]
    got = rope_mod.dynamic_freqs(rope, head_dim, 32, lens)
    for n in range(33, 301):  # above max_position_embeddings: transformers recomputes from seq_len
        ref, scaling = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=torch.tensor(n))
        assert torch.equal(got[n - 1], ref), n
    assert scaling == rope_mod.attention_scaling(rope, 32) == 1.0


def _model(rope: RopeConfig, head_dim: int, max_pos: int) -> DecoderModel:
    """A one-layer decoder (zero weights) around ``rope``: enough for its rotary tables."""
    arch = Architecture(
        family="llama",
        vocab_size=16,
        hidden_size=4 * head_dim,
        intermediate_size=32,
        num_layers=1,
        num_heads=4,
        num_kv_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-6,
        rope=rope,
    )
    return DecoderModel(arch, make_target(arch, 1, "float32"))


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 4.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    ],
    ids=["dynamic", "yarn"],
)
def test_decoder_rotary_per_row_equals_transformers_rotary(rope: dict) -> None:
    """DecoderModel.rotary on a batch mixing decode rows (S = 1, positions 0..79 around
    max_position_embeddings 32) and prefill rows (real tokens then padding) equals transformers'
    rotary embedding run on each row's real positions alone (a fresh one per row: transformers keeps
    a grown dynamic table across calls)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = hf_config(64, max_pos=32, **rope)  # rotary dim 64: 32 frequencies, the vectorised width
    model = _model(ours(cfg), 64, 32)
    x = torch.zeros(1, dtype=torch.float32)

    def reference(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return LlamaRotaryEmbedding(cfg)(x, pos[None])

    decode = torch.arange(80)[:, None]  # [80, 1]
    cos, sin = model.rotary(decode, torch.zeros(80, dtype=torch.int64), torch.float32)
    for i in range(80):
        c, s = reference(decode[i])
        assert torch.equal(cos[i, :, 0], c[0]), i
        assert torch.equal(sin[i, :, 0], rope_mod.fold_sign(s)[0]), i
    # prefill rows of 48 slots: (start, real tokens) -> row seq_len start + n
    rows = [(0, 10), (0, 40), (16, 20), (30, 3), (40, 48)]
    pos = torch.stack([torch.arange(st, st + 48) for st, _ in rows])
    last = torch.tensor([n - 1 for _, n in rows])
    cos, sin = model.rotary(pos, last, torch.float32)
    for i, (_, n) in enumerate(rows):
        c, s = reference(pos[i, :n])
        assert torch.equal(cos[i, :n, 0], c[0]), rows[i]
        assert torch.equal(sin[i, :n, 0], rope_mod.fold_sign(s)[0]), rows[i]


def test_legacy_rope_scaling_parses_like_rope_parameters() -> None:
    """A Qwen2.5-style hub config.json (``rope_theta`` + ``rope_scaling`` with ``type``) gives the
    same RopeConfig as transformers 5's standardized ``rope_parameters``."""
    legacy = {
        "max_position_embeddings": 131072,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    }
    v5 = {
        "max_position_embeddings": 131072,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
        },
    }
    a, b = llama.rope_from_hf(legacy, 128), llama.rope_from_hf(v5, 128)
    assert a == b
    assert (a.kind, a.theta, a.factor, a.original_max_position_embeddings, a.truncate) == (
        "yarn",
        1e6,
        4.0,
        32768,
        True,
    )
    # transformers' standardize_rope_params: a top-level original_max_position_embeddings wins
    top = {**v5, "original_max_position_embeddings": 8192}
    assert llama.rope_from_hf(top, 128).original_max_position_embeddings == 8192
    # no original_max: transformers' default, max_position_embeddings; explicit null truncate: off
    bare = {
        "max_position_embeddings": 4096,
        "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "truncate": None},
    }
    r = llama.rope_from_hf(bare, 64)
    assert (r.original_max_position_embeddings, r.truncate) == (4096, False)


def test_old_manifest_rope_dict_still_loads() -> None:
    """A manifest written before the yarn fields existed (no truncate / mscale keys)."""
    arch = _model(RopeConfig(), 16, 128).arch
    assert Architecture.from_dict(arch.to_dict()) == arch
    d = arch.to_dict()
    for key in ("truncate", "mscale", "mscale_all_dim"):
        del d["rope"][key]
    assert Architecture.from_dict(d).rope == RopeConfig()


@pytest.mark.parametrize(
    "rope,match",
    [
        ({"rope_type": "dynamic"}, "needs a 'factor'"),
        ({"rope_type": "dynamic", "factor": 2.0, "partial_rotary_factor": 0.125}, "rotary dim > 2"),
        ({"rope_type": "yarn", "factor": -1.0}, "factor must be positive"),
        ({"rope_type": "none"}, "not supported"),
        ({"rope_type": "proportional", "factor": 2.0}, "not supported"),
        ({"rope_type": "default", "partial_rotary_factor": 0.1}, "must be even"),
    ],
)
def test_prep_refuses_what_exec_cannot_reproduce(rope: dict, match: str) -> None:
    with pytest.raises(UnsupportedModel, match=match):
        llama.rope_from_hf({"rope_parameters": {"rope_theta": 10000.0, **rope}}, 16)


@pytest.mark.parametrize("kind", ROPE_KINDS)
def test_exec_builds_every_kind_prep_accepts(kind: str) -> None:
    params: dict[str, Any] = {"rope_type": kind, "factor": 2.0, "original_max_position_embeddings": 32}
    if kind == "longrope":
        params |= {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    rope = llama.rope_from_hf({"max_position_embeddings": 128, "rope_parameters": params}, 16)
    assert _model(rope, 16, 128).arch.rope.kind == kind


# ---------------------------------------------------------------------------------------------
# Greedy generation through prepare -> engine, against transformers generate
# ---------------------------------------------------------------------------------------------

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
# dynamic: the table grows past max_position_embeddings (32): prompt 5 and 20 cross it while
# generating, 70 is above it from the prefill on (one chunk: the 128 bucket, see the shape rule)
DYNAMIC_CONFIG = RuntimeConfig(
    max_batch_size=4, max_seq_len=128, context_buckets=(16, 128), return_logits=True
)

# case -> (family, config overrides, serving config). yarn: max_position_embeddings 128, original 32;
# CONFIG's largest context bucket is 64, so the 70-token prompt is prefilled in two chunks.
# initializer_range 0.1 (not 0.02): sharper attention, so that the tokens depend on the rope tables
# (at 0.02 the tiny Llama's greedy tokens are the same with plain RoPE; see the test below).
GEN_CASES: dict[str, tuple[str, dict[str, Any], RuntimeConfig]] = {
    "llama_dynamic": (
        "llama",
        {
            "initializer_range": 0.1,
            "max_position_embeddings": 32,
            "rope_parameters": {"rope_type": "dynamic", "factor": 8.0},
        },
        DYNAMIC_CONFIG,
    ),
    "llama_yarn": (
        "llama",
        {
            "initializer_range": 0.1,
            "max_position_embeddings": 128,
            "rope_parameters": {
                **YARN,
                "beta_fast": 16,
                "beta_slow": 0.5,
                "truncate": False,
                "mscale": 2.0,
                "mscale_all_dim": 1.0,
            },
        },
        CONFIG,
    ),
    "qwen3_yarn": (
        "qwen3",
        {"initializer_range": 0.1, "max_position_embeddings": 128, "rope_parameters": YARN},
        CONFIG,
    ),
    "qwen2_yarn": (
        "qwen2",
        {"initializer_range": 0.1, "max_position_embeddings": 128, "rope_parameters": YARN},
        CONFIG,
    ),
}


@pytest.fixture(scope="module")
def gen_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FamilyCase]:
    return {
        name: FamilyCase(name, family, overrides, tmp_path_factory.mktemp(name))
        for name, (family, overrides, _) in GEN_CASES.items()
    }


def _check_generation(case: FamilyCase, tp: int) -> None:
    src = case.source(tp)
    assert src.arch.rope.kind == case.overrides["rope_parameters"]["rope_type"]
    assert src.target.tp_degree == tp
    with Engine(src, GEN_CASES[case.name][2]) as engine:
        tokens, logits = run_engine(engine, PROMPTS)
    # transformers, one prompt at a time in increasing length (a dynamic table grown by one prompt is
    # reset by the next, shorter-than-max_position_embeddings one, or outgrown by a longer one)
    assert tokens == case.reference()
    assert all(len(t) == N_NEW for t in tokens)
    for got, prompt in zip(logits, PROMPTS, strict=True):
        torch.testing.assert_close(got, case.reference_logits(prompt), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", sorted(GEN_CASES))
def test_greedy_parity_tp1(gen_cases: dict[str, FamilyCase], name: str) -> None:
    _check_generation(gen_cases[name], 1)


@pytest.mark.parametrize("name", sorted(GEN_CASES))
def test_greedy_parity_tp2(gen_cases: dict[str, FamilyCase], name: str) -> None:
    _check_generation(gen_cases[name], 2)


def test_the_scaling_changes_the_tokens(gen_cases: dict[str, FamilyCase]) -> None:
    """The parity above can fail: the same weights with plain RoPE generate other tokens for every
    prompt, so dynamic / yarn really acted at these lengths (dynamic's 5-token prompt only differs
    once generation passes max_position_embeddings 32: from about its 29th token)."""
    from tests.family_configs import make_family_model
    from tests.hf_reference import hf_greedy

    for name, case in gen_cases.items():
        plain_overrides = {k: v for k, v in case.overrides.items() if k != "rope_parameters"}
        plain = make_family_model(case.family, seed=case.seed, **plain_overrides)
        for prompt, ref in zip(PROMPTS, case.reference(), strict=True):
            assert hf_greedy(plain, prompt, N_NEW) != ref, (name, len(prompt))


def test_dynamic_serving_shape_rule() -> None:
    """A prompt longer than max_position_embeddings (32) split into prefill chunks would rotate its
    first chunk with the chunk's length where transformers uses the whole prompt's: refused."""
    model = tiny_hf(max_position_embeddings=32, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    src = source_from_hf(model)
    bad = RuntimeConfig(max_batch_size=1, max_seq_len=128, context_buckets=(16, 64))
    with pytest.raises(ValueError, match=r"largest context bucket \(64\).*max_position_embeddings \(32\)"):
        Engine(src, bad)
    with pytest.raises(ValueError, match=r"max_seq_len - 1 \(127"):
        rope_mod.check_serving_shape(src.arch, 128, 64)
    for ok in (  # one chunk holds every prompt; or no prompt is longer than max_position_embeddings
        RuntimeConfig(max_batch_size=1, max_seq_len=128, context_buckets=(16, 128)),
        RuntimeConfig(max_batch_size=1, max_seq_len=32, context_buckets=(16,)),
    ):
        with Engine(src, ok) as engine:
            assert engine.config.max_seq_len == ok.max_seq_len
    # other kinds: no rule
    rope_mod.check_serving_shape(dataclasses.replace(src.arch, rope=RopeConfig()), 128, 16)


def test_dynamic_graphs_export() -> None:
    """torch.export (the CI proxy for Neuron traceability) of a prefill and a decode graph with the
    per-row dynamic table: the exported program computes what the eager graph does."""
    from exec_service.runtime.graphs import CONTEXT, DECODE, example_inputs
    from exec_service.runtime.runner import Runner
    from tests.helpers import assert_export_matches_eager

    model = tiny_hf(max_position_embeddings=8, rope_parameters={"rope_type": "dynamic", "factor": 4.0})
    src = source_from_hf(model)
    rc = RuntimeConfig(max_batch_size=2, max_seq_len=64, context_buckets=(8, 64))
    runner = Runner(src.arch, src.target, src.load(0), rc)
    done = 0
    for spec in rc.graph_specs():
        if (spec.kind, spec.seq, spec.kv_len) not in ((CONTEXT, 64, 64), (DECODE, 1, 64)):
            continue
        ep = torch.export.export(runner.graphs[spec], example_inputs(spec), strict=False)
        assert_export_matches_eager(runner, spec, ep)
        done += 1
    assert done >= 2
