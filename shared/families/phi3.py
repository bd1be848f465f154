"""Phi-3: Llama with q/k/v and gate/up already fused in the checkpoint, longrope (short/long
factors picked by sequence length) and optional partial rotary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.families import llama
from shared.families.base import Architecture, Family, ParamRule


def arch_from_hf(cfg: Mapping[str, Any]) -> Architecture:
    window = cfg.get("sliding_window")
    return Architecture(
        **llama.base_arch_fields(cfg, "phi3"),
        sliding_window=None if window is None else int(window),
    )


def rules(arch: Architecture) -> list[ParamRule]:
    out = [ParamRule("embed.weight", ("model.embed_tokens.weight",))]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}"
        out += llama.norm_rules(i, p)
        out += [
            # fused in the checkpoint as [q; k; v] and [gate; up]: exactly our canonical order
            ParamRule(f"layers.{i}.attn.qkv.weight", (f"{p}.self_attn.qkv_proj.weight",)),
            ParamRule(f"layers.{i}.attn.o.weight", (f"{p}.self_attn.o_proj.weight",)),
            ParamRule(f"layers.{i}.mlp.gate_up.weight", (f"{p}.mlp.gate_up_proj.weight",)),
            ParamRule(f"layers.{i}.mlp.down.weight", (f"{p}.mlp.down_proj.weight",)),
        ]
    return out + llama.model_rules(arch)


FAMILY = Family(
    name="phi3",
    hf_architectures=("Phi3ForCausalLM",),
    converter_version="phi3-1",
    arch_from_hf=arch_from_hf,
    rules=rules,
    ignore_key_patterns=llama.FAMILY.ignore_key_patterns,
)
