"""Exec model: parallel layers, RoPE, the generic decoder's options, strict loading (tp = 1)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from exec_service.model.collectives import Collectives
from exec_service.model.decoder import DecoderModel, rms_norm
from exec_service.model.loading import ShardLoadError, load_strict, shards_from_hf_state_dict
from exec_service.model.parallel import ParallelSizeError, divide
from exec_service.model.rope import inv_freq
from exec_service.runtime.graphs import CONTEXT, GraphSpec, make_mask
from exec_service.runtime.runner import Runner, RuntimeConfig
from exec_service.runtime.sampling import NEUTRAL_PARAMS
from exec_service.runtime.step_io import StepInputs
from shared.families.base import RopeConfig
from shared.layout import make_target
from tests.hf_reference import arch_of, hf_last_logits, source_from_hf, tiny_hf

PROMPT = [5, 17, 33, 2, 90, 64, 11, 7, 48, 99, 3]


def first_logits(source, prompt=PROMPT) -> torch.Tensor:
    """Full-vocab logits of the last prompt token through a ctx graph (tp = 1)."""
    rc = RuntimeConfig(max_batch_size=1, max_seq_len=64, context_buckets=(16,), return_logits=True)
    runner = Runner(source.arch, source.target, source.load(0), rc)
    s = 16
    ids = torch.zeros(1, s, dtype=torch.int64)
    ids[0, : len(prompt)] = torch.tensor(prompt)
    pos = torch.arange(s)[None]
    params = torch.tensor([NEUTRAL_PARAMS])
    spec = GraphSpec(CONTEXT, 1, s, 16, rc.max_suppressed_ids)
    out = runner.run(
        spec,
        StepInputs(
            input_ids=ids,
            positions=pos,
            slots=torch.tensor([0]),
            mask=make_mask(pos, 16),
            last_idx=torch.tensor([len(prompt) - 1]),
            suppress_ids=torch.full((1, rc.max_suppressed_ids), -1),
            params=params,
            uniforms=torch.zeros(1),
        ),
    )
    return out.logits[0]


def test_divide_fails_early() -> None:
    assert divide(12, 4, "x") == 3
    with pytest.raises(ParallelSizeError, match=r"intermediate \(10\) is not divisible by tp \(4\)"):
        divide(10, 4, "intermediate")


@pytest.mark.parametrize(
    "kind,extra",
    [
        ("default", {}),
        ("linear", {"factor": 4.0}),
        (
            "llama3",
            {
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ],
)
def test_rope_inv_freq_matches_transformers(kind: str, extra: dict) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": kind, "rope_theta": 5000.0, **extra}
    cfg = LlamaConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=512, rope_parameters=params
    )
    if kind == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        ref = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)[0]
    else:
        ref = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")[0]
    rope = RopeConfig(
        kind=kind,
        theta=5000.0,
        factor=extra.get("factor", 1.0),
        low_freq_factor=extra.get("low_freq_factor", 1.0),
        high_freq_factor=extra.get("high_freq_factor", 4.0),
        original_max_position_embeddings=extra.get("original_max_position_embeddings"),
    )
    torch.testing.assert_close(inv_freq(rope, 16, 512), ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"attention_bias": True, "mlp_bias": True},
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            }
        },
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
        {"head_dim": 16},
    ],
    ids=["base", "tied", "bias", "llama3", "linear", "head_dim"],
)
def test_first_step_logits_match_transformers(overrides: dict) -> None:
    model = tiny_hf(seed=1, **overrides)
    got = first_logits(source_from_hf(model))
    torch.testing.assert_close(got, hf_last_logits(model, PROMPT), rtol=0, atol=1e-4)


def test_qk_norm_rms_matches_qwen3() -> None:
    """qk_norm='rms' switched only by the dataclass: transformers' Qwen3 is Llama + per-head q/k RMSNorm."""
    model = tiny_hf(seed=2, cls_name="Qwen3ForCausalLM", config_cls="Qwen3Config", head_dim=16)
    arch = arch_of(model, qk_norm="rms", qk_norm_before_rope=True)
    got = first_logits(source_from_hf(model, arch=arch))
    torch.testing.assert_close(got, hf_last_logits(model, PROMPT), rtol=0, atol=1e-4)


def test_multipliers_match_granite() -> None:
    """embedding/residual/attention multipliers and logits_scaling, against transformers' Granite."""
    mult = dict(
        embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0
    )
    model = tiny_hf(seed=3, cls_name="GraniteForCausalLM", config_cls="GraniteConfig", **mult)
    arch = arch_of(model, **mult)
    got = first_logits(source_from_hf(model, arch=arch))
    torch.testing.assert_close(got, hf_last_logits(model, PROMPT), rtol=0, atol=1e-4)


def test_l2_qk_norm_is_weightless_rms() -> None:
    from transformers.models.llama4.modeling_llama4 import Llama4TextL2Norm

    x = torch.randn(2, 3, 5, 16)
    torch.testing.assert_close(rms_norm(x, None, 1e-6), Llama4TextL2Norm(1e-6)(x))
    model = tiny_hf(seed=4)
    arch = arch_of(model, qk_norm="l2")
    out = first_logits(source_from_hf(model, arch=arch))  # runs; no parameters added for l2
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "field,value",
    [
        # MoE, NoPE, chunked attention, temperature tuning, every rope kind, partial rotary:
        # implemented (tests/test_families_exec.py, tests/test_family_modules.py, tests/test_rope.py)
        ("rope", RopeConfig(partial_rotary_factor=0.1)),  # rotary dim int(8 * 0.1) = 0
        ("rope", RopeConfig(kind="dynamic", factor=2.0, partial_rotary_factor=0.25)),  # dim 2
    ],
)
def test_unimplemented_options_fail_at_build(field: str, value) -> None:
    arch = dataclasses.replace(arch_of(tiny_hf()), **{field: value})
    target = make_target(dataclasses.replace(arch, moe=None), 1, "float32")
    name = "rope" if field == "rope" else field
    with pytest.raises(NotImplementedError, match=name):
        DecoderModel(arch, target)


def test_model_checks_tp_against_collectives() -> None:
    arch = arch_of(tiny_hf())
    with pytest.raises(ValueError, match="tp=1"):
        DecoderModel(arch, make_target(arch, 2, "float32"), comm=Collectives(1))


def test_strict_loading_refuses_mismatches() -> None:
    model = tiny_hf()
    arch = arch_of(model)
    target = make_target(arch, 1, "float32")
    good = shards_from_hf_state_dict(model.state_dict(), arch, target)[0]
    dm = DecoderModel(arch, target)
    load_strict(dm, good)
    assert torch.equal(dm.layers[1].attn.qkv.weight, good["layers.1.attn.qkv.weight"])

    missing = dict(good)
    del missing["layers.0.mlp.down.weight"]
    with pytest.raises(ShardLoadError, match=r"missing keys \['layers.0.mlp.down.weight'\]"):
        load_strict(dm, missing)
    with pytest.raises(ShardLoadError, match=r"unexpected keys \['lm_head.bias'\]"):
        load_strict(dm, {**good, "lm_head.bias": torch.zeros(3)})
    with pytest.raises(ShardLoadError, match=r"layers\.0\.attn\.o\.weight has shape"):
        load_strict(dm, {**good, "layers.0.attn.o.weight": torch.zeros(64, 32)})
    with pytest.raises(ShardLoadError, match=r"norm\.weight has dtype torch\.float16"):
        load_strict(dm, {**good, "norm.weight": good["norm.weight"].half()})
    with pytest.raises(ShardLoadError, match="missing keys"):  # rank tensor is part of the contract
        load_strict(dm, {k: v for k, v in good.items() if k != "rank"})


def test_runner_refuses_another_ranks_shard() -> None:
    src = source_from_hf(tiny_hf(), tp=2)
    with pytest.raises(ShardLoadError, match="the shard loaded for rank 0 holds rank 1"):
        Runner(src.arch, src.target, src.load(1), RuntimeConfig(max_seq_len=64, context_buckets=(16,)))


def test_tied_shard_has_no_lm_head() -> None:
    model = tiny_hf(tie_word_embeddings=True)
    src = source_from_hf(model)
    assert "lm_head.weight" not in src.load(0)
    assert "lm_head.weight" not in DecoderModel(src.arch, src.target).state_dict()
