"""Qwen3-MoE: Qwen3 attention (q/k norm) with softmax top-k experts on the layers chosen by
``decoder_sparse_step`` and ``mlp_only_layers``; ``norm_topk_prob`` decides renormalisation."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from shared.families import llama, qwen3
from shared.families.base import Architecture, Family, MoEConfig, ParamRule, stack0, stack_pairs


def arch_from_hf(cfg: Mapping[str, Any]) -> Architecture:
    n_layers = int(cfg["num_hidden_layers"])
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense = set(cfg.get("mlp_only_layers") or ())
    n_exp = int(
        cfg["num_experts"] if "num_experts" in cfg else cfg["num_local_experts"]
    )  # transformers 5 renames it
    moe_layers = tuple(i for i in range(n_layers) if i not in dense and n_exp > 0 and (i + 1) % step == 0)
    moe = MoEConfig(
        num_experts=n_exp,
        top_k=int(cfg["num_experts_per_tok"]),
        intermediate_size=int(cfg["moe_intermediate_size"]),
        router="softmax",
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),  # honoured both ways (NxD ignores it)
        moe_layers=moe_layers,
    )
    return dataclasses.replace(qwen3.arch_from_hf(cfg), family="qwen3_moe", moe=moe)


def rules(arch: Architecture) -> list[ParamRule]:
    out = [ParamRule("embed.weight", ("model.embed_tokens.weight",))]
    e = arch.moe.num_experts if arch.moe else 0
    for i in range(arch.num_layers):
        p = f"model.layers.{i}"
        out += llama.norm_rules(i, p) + llama.attention_rules(arch, i, p)
        if arch.is_moe_layer(i):
            m = f"{p}.mlp"
            out += [
                ParamRule(f"layers.{i}.moe.router.weight", (f"{m}.gate.weight",)),
                ParamRule(
                    f"layers.{i}.moe.experts.gate_up",
                    tuple(f"{m}.experts.{x}.{w}_proj.weight" for x in range(e) for w in ("gate", "up")),
                    stack_pairs,
                ),
                ParamRule(
                    f"layers.{i}.moe.experts.down",
                    tuple(f"{m}.experts.{x}.down_proj.weight" for x in range(e)),
                    stack0,
                ),
            ]
        else:
            out += llama.mlp_rules(arch, i, p)
    return out + llama.model_rules(arch)


FAMILY = Family(
    name="qwen3_moe",
    hf_architectures=("Qwen3MoeForCausalLM",),
    converter_version="qwen3_moe-1",
    arch_from_hf=arch_from_hf,
    rules=rules,
    ignore_key_patterns=llama.FAMILY.ignore_key_patterns,
)
