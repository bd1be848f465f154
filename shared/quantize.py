"""Weight-only int8 quantization: symmetric, one scale per output channel.

A linear weight ``W [..., out, in]`` becomes ``q = round(W / s).clamp(-127, 127)`` (int8) and
``s = max|W[..., o, :]| / 127`` (float32, ``[..., out]``), stored as ``<name>`` and
``<name>_scale``. ``W ≈ q * s[..., None]``. Scales are over whole rows of the unsharded weight,
so row-parallel shards (split on ``in``) share the same scales and column-parallel shards take
their rows' scales (``shared.layout.spec_for``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shared.families.base import Architecture, ParamRule
    from shared.layout import Target

SCHEMES = ("int8",)

# The linear weights of attention, MLP and experts; embeddings, norms and routers stay as they are.
_QUANTIZED = re.compile(
    r"layers\.\d+\.(attn\.(qkv|o)\.weight|(mlp|moe\.shared)\.(gate_up|down)\.weight|moe\.experts\.(gate_up|down))"
)


def quantizable(name: str, lm_head: bool = False) -> bool:
    return bool(_QUANTIZED.fullmatch(name)) or (lm_head and name == "lm_head.weight")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scales [..., out]); works on meta tensors (planning)."""
    w32 = w.to(torch.float32)
    scale = w32.abs().amax(dim=-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row (padding) stays 0
    q = torch.round(w32 / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale.to(torch.float32)[..., None]).to(dtype)


def canonical_tensors(name: str, t: torch.Tensor, target: Target) -> Iterator[tuple[str, torch.Tensor]]:
    """The stored tensor(s) of canonical parameter ``name`` (already in the target dtype): ``t``
    itself, or for a weight the target quantizes its int8 values and ``<name>_scale``."""
    from shared.layout import SCALE_SUFFIX

    if target.quantization == "int8" and quantizable(name, target.quantized_lm_head):
        q, scale = quantize_int8(t)
        yield name, q
        yield name + SCALE_SUFFIX, scale
    elif target.quantization not in (None, "int8"):
        raise ValueError(f"unknown quantization scheme {target.quantization!r} (have {', '.join(SCHEMES)})")
    else:
        yield name, t


def target_rules(rules: list[ParamRule], arch: Architecture, target: Target) -> list[ParamRule]:
    """The family's conversion rules for ``target``: with a quantized LM head on a tied model, the
    head is its own ``lm_head.weight`` (built like the embedding, which keeps the model dtype)."""
    import dataclasses

    if not (target.quantized_lm_head and arch.tie_word_embeddings):
        return rules
    embed = next(r for r in rules if r.name == "embed.weight")
    return [*rules, dataclasses.replace(embed, name="lm_head.weight")]
