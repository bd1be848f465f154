"""Llama: the baseline every other family declares its differences against."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.families.base import Architecture, Family, ParamRule, RopeConfig, UnsupportedModel

CONVERTER_VERSION = "llama-1"


def rope_from_hf(cfg: Mapping[str, Any], head_dim: int) -> RopeConfig:
    """Rope settings from either transformers-5 ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` pair found in most hub checkpoints, with transformers'
    defaults resolved here (once) where exec would otherwise have to guess them."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = dict(cfg.get("rope_scaling") or {})
    merged = {**legacy, **params}
    theta = float(merged.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind == "su":  # Phi-3's older name for longrope
        kind = "longrope"
    partial = float(merged.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0)
    max_pos = int(cfg.get("max_position_embeddings", 2048))

    def opt_float(key: str) -> float | None:
        v = merged.get(key)
        return None if v is None else float(v)

    def opt_tuple(key: str) -> tuple[float, ...] | None:
        v = merged.get(key)
        return None if v is None else tuple(float(x) for x in v)

    if kind in ("llama3", "yarn", "longrope"):
        # transformers (standardize_rope_params): a top-level value wins over the rope dict's
        orig = cfg.get("original_max_position_embeddings", merged.get("original_max_position_embeddings"))
    else:
        orig = merged.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    factor = float(merged.get("factor", 1.0) or 1.0)
    extra: dict[str, Any] = {}
    if kind == "yarn":
        orig = max_pos if orig is None else orig  # transformers' default
        f = merged.get("factor")
        factor = max_pos / int(orig) if f is None else float(f)  # no factor: the implicit ratio
        # transformers reads ``truncate`` with ``if truncate:``, so an explicit null means False
        extra = dict(
            truncate=bool(merged.get("truncate", True)),
            mscale=opt_float("mscale"),
            mscale_all_dim=opt_float("mscale_all_dim"),
        )
    dim = int(head_dim * partial)  # the rotated features of a head (exec's rope.rotary_dim)
    if dim <= 0 or dim % 2 or dim > head_dim:
        raise UnsupportedModel(
            f"rotary dim {dim} (head_dim {head_dim} x partial_rotary_factor {partial}) must be even "
            "and in (0, head_dim]"
        )
    if kind in ("yarn", "dynamic"):
        _check_scaled_rope(str(kind), merged, factor, dim)
    return RopeConfig(
        kind=str(kind),
        theta=theta,
        factor=factor,
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=None if orig is None else int(orig),
        short_factor=opt_tuple("short_factor"),
        long_factor=opt_tuple("long_factor"),
        attention_factor=opt_float("attention_factor"),
        beta_fast=opt_float("beta_fast"),
        beta_slow=opt_float("beta_slow"),
        partial_rotary_factor=partial,
        **extra,
    )


def _check_scaled_rope(kind: str, merged: Mapping[str, Any], factor: float, dim: int) -> None:
    """What exec could not reproduce exactly (transformers itself fails or yields NaN) is refused here,
    at prep, with the reason."""
    if kind == "dynamic" and merged.get("factor") is None:
        raise UnsupportedModel("rope_type 'dynamic' needs a 'factor' (transformers requires one)")
    if factor <= 0:
        raise UnsupportedModel(f"rope_type {kind!r}: factor must be positive, got {factor}")
    if kind == "dynamic" and dim <= 2:
        raise UnsupportedModel(
            f"rope_type 'dynamic' needs a rotary dim > 2 (its base exponent is dim / (dim - 2)), got {dim}"
        )


def _eos(cfg: Mapping[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list | tuple) else (int(eos),)


def base_arch_fields(cfg: Mapping[str, Any], family: str) -> dict[str, Any]:
    """The fields every Llama-like config shares; families add or override."""
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        return {
            "family": family,
            "vocab_size": int(cfg["vocab_size"]),
            "hidden_size": hidden,
            "intermediate_size": int(cfg["intermediate_size"]),
            "num_layers": int(cfg["num_hidden_layers"]),
            "num_heads": heads,
            "num_kv_heads": int(cfg.get("num_key_value_heads") or heads),
            "head_dim": head_dim,
            "max_position_embeddings": int(cfg.get("max_position_embeddings", 2048)),
            "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
            "rope": rope_from_hf(cfg, head_dim),
            "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
            "hidden_act": str(cfg.get("hidden_act", "silu")),
            "bos_token_id": cfg.get("bos_token_id"),
            "eos_token_ids": _eos(cfg),
            "pad_token_id": cfg.get("pad_token_id"),
            "torch_dtype": str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        }
    except KeyError as e:
        raise UnsupportedModel(f"config.json lacks the required field {e.args[0]!r}") from None


def arch_from_hf(cfg: Mapping[str, Any]) -> Architecture:
    bias = bool(cfg.get("attention_bias", False))
    return Architecture(
        **base_arch_fields(cfg, "llama"),
        attention_bias=bias,
        o_bias=bias,  # Llama's attention_bias covers o_proj too
        mlp_bias=bool(cfg.get("mlp_bias", False)),
    )


def attention_rules(arch: Architecture, i: int, p: str) -> list[ParamRule]:
    """q/k/v fused into one column-parallel ``qkv``; ``p`` is the HF layer prefix."""
    a = f"{p}.self_attn"
    rules = [
        ParamRule(f"layers.{i}.attn.qkv.weight", tuple(f"{a}.{x}_proj.weight" for x in "qkv")),
        ParamRule(f"layers.{i}.attn.o.weight", (f"{a}.o_proj.weight",)),
    ]
    if arch.attention_bias:
        rules.append(ParamRule(f"layers.{i}.attn.qkv.bias", tuple(f"{a}.{x}_proj.bias" for x in "qkv")))
    if arch.o_bias:
        rules.append(ParamRule(f"layers.{i}.attn.o.bias", (f"{a}.o_proj.bias",)))
    if arch.qk_norm == "rms":
        rules += [
            ParamRule(f"layers.{i}.attn.q_norm.weight", (f"{a}.q_norm.weight",)),
            ParamRule(f"layers.{i}.attn.k_norm.weight", (f"{a}.k_norm.weight",)),
        ]
    return rules


def mlp_rules(arch: Architecture, i: int, p: str, mlp: str = "mlp") -> list[ParamRule]:
    """gate and up fused into one column-parallel ``gate_up``."""
    m = f"{p}.{mlp}"
    rules = [
        ParamRule(f"layers.{i}.mlp.gate_up.weight", (f"{m}.gate_proj.weight", f"{m}.up_proj.weight")),
        ParamRule(f"layers.{i}.mlp.down.weight", (f"{m}.down_proj.weight",)),
    ]
    if arch.mlp_bias:
        rules += [
            ParamRule(f"layers.{i}.mlp.gate_up.bias", (f"{m}.gate_proj.bias", f"{m}.up_proj.bias")),
            ParamRule(f"layers.{i}.mlp.down.bias", (f"{m}.down_proj.bias",)),
        ]
    return rules


def norm_rules(i: int, p: str) -> list[ParamRule]:
    return [
        ParamRule(f"layers.{i}.input_norm.weight", (f"{p}.input_layernorm.weight",)),
        ParamRule(f"layers.{i}.post_attn_norm.weight", (f"{p}.post_attention_layernorm.weight",)),
    ]


def model_rules(arch: Architecture) -> list[ParamRule]:
    rules = [ParamRule("norm.weight", ("model.norm.weight",))]
    if not arch.tie_word_embeddings:
        rules.append(ParamRule("lm_head.weight", ("lm_head.weight",)))
    return rules


def rules(arch: Architecture) -> list[ParamRule]:
    out = [ParamRule("embed.weight", ("model.embed_tokens.weight",))]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}"
        out += norm_rules(i, p) + attention_rules(arch, i, p) + mlp_rules(arch, i, p)
    return out + model_rules(arch)


FAMILY = Family(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    converter_version=CONVERTER_VERSION,
    arch_from_hf=arch_from_hf,
    rules=rules,
    # tied checkpoints sometimes still carry lm_head.weight: it equals embed_tokens and is unused
    ignore_key_patterns=(r".*rotary_emb\.inv_freq$", r"^lm_head\.weight$"),
)
