"""Granite: Llama plus four scalars — embedding, residual and attention multipliers, logits scaling."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.families import llama
from shared.families.base import Architecture, Family


def arch_from_hf(cfg: Mapping[str, Any]) -> Architecture:
    bias = bool(cfg.get("attention_bias", False))
    return Architecture(
        **llama.base_arch_fields(cfg, "granite"),
        attention_bias=bias,
        o_bias=bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),  # embeddings * m
        residual_multiplier=float(cfg.get("residual_multiplier", 1.0)),  # residual + m * block(x)
        attention_multiplier=float(cfg.get("attention_multiplier", 1.0)),  # replaces 1/sqrt(head_dim)
        logits_scaling=float(cfg.get("logits_scaling", 1.0)),  # logits / s
    )


FAMILY = Family(
    name="granite",
    hf_architectures=("GraniteForCausalLM",),
    converter_version="granite-1",
    arch_from_hf=arch_from_hf,
    rules=llama.rules,
    ignore_key_patterns=llama.FAMILY.ignore_key_patterns,
)
