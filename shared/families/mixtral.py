"""Mixtral: every MLP is a softmax-routed top-k mixture of experts with renormalised weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.families import llama
from shared.families.base import Architecture, Family, MoEConfig, ParamRule, stack0, stack_pairs


def arch_from_hf(cfg: Mapping[str, Any]) -> Architecture:
    n_layers = int(cfg["num_hidden_layers"])
    moe = MoEConfig(
        num_experts=int(cfg["num_local_experts"]),
        top_k=int(cfg["num_experts_per_tok"]),
        intermediate_size=int(cfg["intermediate_size"]),
        router="softmax",
        norm_topk_prob=True,  # Mixtral always renormalises the top-k weights
        moe_layers=tuple(range(n_layers)),
    )
    return Architecture(**llama.base_arch_fields(cfg, "mixtral"), moe=moe)


def moe_rules(arch: Architecture, i: int, p: str) -> list[ParamRule]:
    m, e = f"{p}.block_sparse_moe", arch.moe.num_experts if arch.moe else 0
    return [
        ParamRule(f"layers.{i}.moe.router.weight", (f"{m}.gate.weight",)),
        # w1 = gate, w3 = up, w2 = down; stacked over experts
        ParamRule(
            f"layers.{i}.moe.experts.gate_up",
            tuple(f"{m}.experts.{x}.{w}.weight" for x in range(e) for w in ("w1", "w3")),
            stack_pairs,
        ),
        ParamRule(
            f"layers.{i}.moe.experts.down", tuple(f"{m}.experts.{x}.w2.weight" for x in range(e)), stack0
        ),
    ]


def rules(arch: Architecture) -> list[ParamRule]:
    out = [ParamRule("embed.weight", ("model.embed_tokens.weight",))]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}"
        out += llama.norm_rules(i, p) + llama.attention_rules(arch, i, p) + moe_rules(arch, i, p)
    return out + llama.model_rules(arch)


FAMILY = Family(
    name="mixtral",
    hf_architectures=("MixtralForCausalLM",),
    converter_version="mixtral-1",
    arch_from_hf=arch_from_hf,
    rules=rules,
    ignore_key_patterns=llama.FAMILY.ignore_key_patterns,
)
