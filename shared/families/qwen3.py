"""Qwen3: Llama plus a learned RMSNorm on q and k per head (before RoPE) and an explicit head_dim."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.families import llama
from shared.families.base import Architecture, Family, UnsupportedModel


def arch_from_hf(cfg: Mapping[str, Any]) -> Architecture:
    if cfg.get("use_sliding_window"):
        raise UnsupportedModel("Qwen3 sliding-window attention (use_sliding_window=true) is not supported")
    bias = bool(cfg.get("attention_bias", False))
    return Architecture(
        **llama.base_arch_fields(cfg, "qwen3"),  # head_dim read explicitly (not hidden/heads)
        attention_bias=bias,
        o_bias=bias,
        qk_norm="rms",  # q_norm / k_norm weights [head_dim]
    )


FAMILY = Family(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    converter_version="qwen3-1",
    arch_from_hf=arch_from_hf,
    rules=llama.rules,
    ignore_key_patterns=llama.FAMILY.ignore_key_patterns,
)
