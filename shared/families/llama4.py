"""Llama4 (text): MoE layers per ``moe_layers`` with a shared expert and a sigmoid top-1 router
that scales the expert *input*; NoPE layers (no RoPE, no q/k norm, attention temperature tuning);
chunked attention on RoPE layers; weightless L2 q/k norm after RoPE. Loads ``Llama4ForCausalLM``
checkpoints and the ``language_model`` part of ``Llama4ForConditionalGeneration`` ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from shared.families import llama
from shared.families.base import Architecture, Family, MoEConfig, ParamRule, transpose12


def arch_from_hf(cfg: Mapping[str, Any]) -> Architecture:
    cfg = cfg.get("text_config") or cfg  # Llama4ForConditionalGeneration nests the text model
    n = int(cfg["num_hidden_layers"])
    rope_flags = cfg.get("no_rope_layers") or [
        int((i + 1) % int(cfg.get("no_rope_layer_interval", 4)) != 0) for i in range(n)
    ]
    nope = tuple(i for i in range(n) if not rope_flags[i])  # no_rope_layers[i] == 1 means "uses RoPE"
    types = cfg.get("layer_types") or [
        "chunked_attention" if rope_flags[i] else "full_attention" for i in range(n)
    ]
    chunk = cfg.get("attention_chunk_size")
    moe_layers = cfg.get("moe_layers")
    if moe_layers is None:
        step = int(cfg.get("interleave_moe_layer_step", 1))
        moe_layers = list(range(step - 1, n, step))
    inter = int(cfg["intermediate_size"])
    moe = MoEConfig(
        num_experts=int(cfg["num_local_experts"]),
        top_k=int(cfg.get("num_experts_per_tok", 1)),
        intermediate_size=inter,
        router="sigmoid",
        norm_topk_prob=False,
        shared_expert_intermediate_size=inter,
        router_applied_to_input=True,  # expert(x * sigmoid(router score)), not expert(x) * score
        moe_layers=tuple(int(i) for i in moe_layers),
    )
    fields = llama.base_arch_fields(cfg, "llama4")
    fields["intermediate_size"] = int(cfg.get("intermediate_size_mlp", inter))  # dense layers
    bias = bool(cfg.get("attention_bias", False))
    return Architecture(
        **fields,
        attention_bias=bias,
        o_bias=bias,
        qk_norm="l2" if cfg.get("use_qk_norm", True) else "none",  # RoPE layers only
        qk_norm_before_rope=False,
        moe=moe,
        nope_layers=nope,
        attention_chunk_size=None if chunk is None else int(chunk),
        chunked_layers=tuple(i for i, t in enumerate(types) if t == "chunked_attention") if chunk else (),
        attn_temperature_tuning=bool(cfg.get("attn_temperature_tuning", True)),
        floor_scale=float(cfg.get("floor_scale", 8192)),
        attn_scale=float(cfg.get("attn_scale", 0.1)),
    )


def _interleaved_to_half(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Llama4 rotates interleaved pairs (2j, 2j+1); our decoder rotates halves (j, j + D/2).
    Permuting each q/k head's output rows to [0, 2, 4, …, 1, 3, 5, …] makes the two identical
    (q·k is unchanged by a permutation shared by q and k, and so is the L2 norm)."""
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)]).to(w.device)
    heads = w.reshape(-1, head_dim, *w.shape[1:])
    return heads.index_select(1, perm).reshape(w.shape)


def rules(arch: Architecture) -> list[ParamRule]:
    d = arch.head_dim

    def qkv(parts: Sequence[torch.Tensor]) -> torch.Tensor:
        q, k, v = parts
        return torch.cat([_interleaved_to_half(q, d), _interleaved_to_half(k, d), v], dim=0)

    out = [ParamRule("embed.weight", ("model.embed_tokens.weight",))]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}"
        a, f = f"{p}.self_attn", f"{p}.feed_forward"
        out += llama.norm_rules(i, p)
        out.append(
            ParamRule(f"layers.{i}.attn.qkv.weight", tuple(f"{a}.{x}_proj.weight" for x in "qkv"), qkv)
        )
        if arch.attention_bias:
            out.append(
                ParamRule(f"layers.{i}.attn.qkv.bias", tuple(f"{a}.{x}_proj.bias" for x in "qkv"), qkv)
            )
        out.append(ParamRule(f"layers.{i}.attn.o.weight", (f"{a}.o_proj.weight",)))
        if arch.o_bias:
            out.append(ParamRule(f"layers.{i}.attn.o.bias", (f"{a}.o_proj.bias",)))
        if arch.is_moe_layer(i):
            out += [
                ParamRule(f"layers.{i}.moe.router.weight", (f"{f}.router.weight",)),
                # stored as x @ W: gate_up_proj [E, H, 2I], down_proj [E, I, H]
                ParamRule(f"layers.{i}.moe.experts.gate_up", (f"{f}.experts.gate_up_proj",), transpose12),
                ParamRule(f"layers.{i}.moe.experts.down", (f"{f}.experts.down_proj",), transpose12),
                ParamRule(
                    f"layers.{i}.moe.shared.gate_up.weight",
                    (f"{f}.shared_expert.gate_proj.weight", f"{f}.shared_expert.up_proj.weight"),
                ),
                ParamRule(f"layers.{i}.moe.shared.down.weight", (f"{f}.shared_expert.down_proj.weight",)),
            ]
        else:
            out += llama.mlp_rules(arch, i, p, mlp="feed_forward")
    return out + llama.model_rules(arch)


FAMILY = Family(
    name="llama4",
    hf_architectures=("Llama4ForCausalLM", "Llama4ForConditionalGeneration"),
    converter_version="llama4-1",
    arch_from_hf=arch_from_hf,
    rules=rules,
    ignore_key_patterns=(
        *llama.FAMILY.ignore_key_patterns,
        r"^vision_model\..*",  # the vision tower and projector of Llama4ForConditionalGeneration
        r"^multi_modal_projector\..*",
    ),
    key_prefixes=("language_model.",),
)
