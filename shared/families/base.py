"""The frozen architecture description and the family interface.

A family turns an HF ``config.json`` into an :class:`Architecture` (once, at the boundary) and
declares how HF checkpoint keys map onto the canonical parameter names of the exec model.
Everything downstream (layout, exec decoder) reads only the dataclass, never the HF config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

ROPE_KINDS = ("default", "linear", "dynamic", "llama3", "longrope", "yarn")  # prep and exec: all
QK_NORM_KINDS = ("none", "rms", "l2")


class UnsupportedModel(ValueError):
    """The checkpoint's config describes something this family cannot serve."""


@dataclass(frozen=True)
class RopeConfig:
    kind: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # longrope / su (Phi-3): per-frequency factors for short and long contexts
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    # yarn / longrope attention scaling (None = derived as transformers does)
    attention_factor: float | None = None
    # yarn: the ramp between extrapolated and interpolated frequencies spans the dims that turn
    # beta_fast .. beta_slow times over original_max_position_embeddings (None or 0 = 32 / 1);
    # ``truncate`` rounds that range outwards to whole dims
    beta_fast: float | None = None
    beta_slow: float | None = None
    truncate: bool = True
    # yarn without attention_factor: mscale / mscale_all_dim (both set and non-zero) give
    # (0.1 mscale ln f + 1) / (0.1 mscale_all_dim ln f + 1), else 0.1 ln f + 1
    mscale: float | None = None
    mscale_all_dim: float | None = None
    # fraction of head_dim that is rotated (Phi-3 partial rotary); 1.0 = all
    partial_rotary_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise UnsupportedModel(f"rope kind {self.kind!r} is not supported (supported: {ROPE_KINDS})")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    router: str = "softmax"  # "softmax" (Mixtral/Qwen3-MoE) or "sigmoid" (Llama4)
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert
    router_applied_to_input: bool = False  # Llama4: scale the expert *input* by the router weight
    # which layers are MoE (others are dense with Architecture.intermediate_size)
    moe_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class Architecture:
    """Everything the exec model needs to know about a model, frozen."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False  # q/k/v (and, for Llama, o) projections carry a bias
    o_bias: bool = False
    mlp_bias: bool = False
    # family options, all off for the Llama baseline
    qk_norm: str = "none"  # "rms": learned per-head RMSNorm on q and k; "l2": weightless
    qk_norm_before_rope: bool = True
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None  # None = head_dim ** -0.5
    logits_scaling: float = 1.0  # logits are divided by this
    moe: MoEConfig | None = None
    # per-layer flags (empty = all layers use RoPE, full attention)
    nope_layers: tuple[int, ...] = ()
    attention_chunk_size: int | None = None  # chunked (local) attention ...
    chunked_layers: tuple[int, ...] = ()  # ... on these layers
    sliding_window: int | None = None  # each token attends to at most this many previous tokens
    attn_temperature_tuning: bool = False
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str = "float32"  # the checkpoint's dtype, recorded for information

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise UnsupportedModel(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads != 0:
            raise UnsupportedModel(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.qk_norm not in QK_NORM_KINDS:
            raise UnsupportedModel(f"qk_norm {self.qk_norm!r} not in {QK_NORM_KINDS}")
        if self.hidden_act not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
            raise UnsupportedModel(f"hidden_act {self.hidden_act!r} is not supported")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.moe_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Architecture:
        d = dict(d)
        rope = RopeConfig(**_tuples(d.pop("rope")))
        moe = d.pop("moe", None)
        moe_cfg = MoEConfig(**_tuples(moe)) if moe is not None else None
        return cls(rope=rope, moe=moe_cfg, **_tuples(d))


def _tuples(d: Mapping[str, Any]) -> dict[str, Any]:
    """JSON gives lists; the frozen dataclasses hold tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


# ---------------------------------------------------------------------------------------------
# Key rules: how canonical parameters are built from HF tensors.
# ---------------------------------------------------------------------------------------------

Combine = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def cat0(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=0)


def stack0(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(parts), dim=0)


def stack_pairs(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """[gate_0, up_0, gate_1, up_1, …] (each [I, H]) -> stacked experts [E, 2I, H]."""
    return torch.stack([torch.cat([parts[i], parts[i + 1]], dim=0) for i in range(0, len(parts), 2)], dim=0)


def transpose12(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """One stacked-experts tensor stored as [E, in, out] (x @ W) -> our [E, out, in]."""
    return parts[0].transpose(1, 2)


@dataclass(frozen=True)
class ParamRule:
    """One canonical parameter: built from ``sources`` (HF keys) by ``combine``."""

    name: str
    sources: tuple[str, ...]
    combine: Combine = cat0

    def build(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.combine([tensors[s] for s in self.sources])


@dataclass(frozen=True)
class Family:
    """A model family: parsing of its HF config and its key rules. Instances live in the registry."""

    name: str
    hf_architectures: tuple[str, ...]
    converter_version: str
    arch_from_hf: Callable[[Mapping[str, Any]], Architecture]
    rules: Callable[[Architecture], list[ParamRule]]
    # HF keys that carry no weights the exec model needs (e.g. rotary inv_freq buffers)
    ignore_key_patterns: tuple[str, ...] = (r".*rotary_emb\.inv_freq$",)
    # prefixes stripped from HF keys before the rules see them (multimodal wrappers)
    key_prefixes: tuple[str, ...] = field(default=())
