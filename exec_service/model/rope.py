"""Rotary position embeddings, computed exactly as transformers' ``modeling_rope_utils`` does.

Supported kinds: default, linear, llama3. Others (dynamic, longrope, yarn, partial rotary) raise
``NotImplementedError`` at model build time (see ``check_supported``).
"""

from __future__ import annotations

import math

import torch

from shared.families.base import Architecture, RopeConfig

SUPPORTED_ROPE = ("default", "linear", "llama3")


def inv_freq(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies."""
    if rope.kind not in SUPPORTED_ROPE:
        raise NotImplementedError(
            f"Architecture.rope.kind={rope.kind!r} is not implemented (have {SUPPORTED_ROPE})"
        )
    dim = head_dim
    base = rope.theta
    freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    if rope.kind == "linear":
        return freq / rope.factor
    if rope.kind == "llama3":
        factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
        old = rope.original_max_position_embeddings or max_position_embeddings
        low_freq_wavelen = old / low
        high_freq_wavelen = old / high
        wavelen = 2 * math.pi / freq
        llama = torch.where(wavelen > low_freq_wavelen, freq / factor, freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * llama / factor + smooth * llama
        medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(medium, smoothed, llama)
    return freq


def check_supported(arch: Architecture) -> None:
    """Raise NotImplementedError naming the first Architecture field this decoder does not implement."""
    if arch.rope.kind not in SUPPORTED_ROPE:
        raise NotImplementedError(
            f"Architecture.rope.kind={arch.rope.kind!r} is not implemented (have {SUPPORTED_ROPE})"
        )
    if arch.rope.partial_rotary_factor != 1.0:
        raise NotImplementedError("Architecture.rope.partial_rotary_factor != 1.0 is not implemented")
    if arch.moe is not None:
        raise NotImplementedError("Architecture.moe is not implemented")
    if arch.nope_layers:
        raise NotImplementedError("Architecture.nope_layers is not implemented")
    if arch.attention_chunk_size is not None:
        raise NotImplementedError("Architecture.attention_chunk_size is not implemented")
    if arch.attn_temperature_tuning:
        raise NotImplementedError("Architecture.attn_temperature_tuning is not implemented")
    if arch.head_dim % 2 != 0:
        raise NotImplementedError(f"Architecture.head_dim={arch.head_dim} must be even for RoPE")


def cos_sin(
    positions: torch.Tensor, freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, S] -> cos, sin [B, 1, S, D] (broadcast over heads)."""
    f = positions[..., None].float() * freq.float()  # [B, S, D/2]
    emb = torch.cat((f, f), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D]."""
    return x * cos + rotate_half(x) * sin
