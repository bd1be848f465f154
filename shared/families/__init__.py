"""Family registry: HF model_type -> Family. Adding a family is one file plus one line here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.families import granite, llama, llama4, mixtral, phi3, qwen2, qwen3, qwen3_moe
from shared.families.base import Architecture, Family, MoEConfig, ParamRule, RopeConfig, UnsupportedModel

REGISTRY: dict[str, Family] = {
    "llama": llama.FAMILY,
    "qwen2": qwen2.FAMILY,
    "qwen3": qwen3.FAMILY,
    "granite": granite.FAMILY,
    "phi3": phi3.FAMILY,
    "mixtral": mixtral.FAMILY,
    "qwen3_moe": qwen3_moe.FAMILY,
    "llama4_text": llama4.FAMILY,  # Llama4ForCausalLM
    "llama4": llama4.FAMILY,  # Llama4ForConditionalGeneration (text part)
}


def family_for_config(cfg: Mapping[str, Any]) -> Family:
    """The family for an HF config.json, by ``model_type`` (then by ``architectures``)."""
    model_type = cfg.get("model_type")
    if model_type in REGISTRY:
        return REGISTRY[model_type]
    for arch_name in cfg.get("architectures") or ():
        for fam in REGISTRY.values():
            if arch_name in fam.hf_architectures:
                return fam
    known = ", ".join(sorted(REGISTRY))
    raise UnsupportedModel(
        f"unknown architecture: model_type={model_type!r}, architectures={cfg.get('architectures')!r}; "
        f"supported model types: {known}"
    )


__all__ = [
    "REGISTRY",
    "Architecture",
    "Family",
    "MoEConfig",
    "ParamRule",
    "RopeConfig",
    "UnsupportedModel",
    "family_for_config",
]
