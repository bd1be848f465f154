"""Qwen2: Llama plus a bias on q/k/v (not on o); small models tie their embeddings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.families import llama
from shared.families.base import Architecture, Family, UnsupportedModel


def arch_from_hf(cfg: Mapping[str, Any]) -> Architecture:
    if cfg.get("use_sliding_window"):
        # differs from HF: not served (HF Qwen2 checkpoints ship with it off)
        raise UnsupportedModel("Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
    return Architecture(
        **llama.base_arch_fields(cfg, "qwen2"), attention_bias=True, o_bias=False
    )  # qkv bias only


FAMILY = Family(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    converter_version="qwen2-1",
    arch_from_hf=arch_from_hf,
    rules=llama.rules,
    ignore_key_patterns=llama.FAMILY.ignore_key_patterns,
)
