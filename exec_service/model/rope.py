"""Rotary position embeddings, computed exactly as transformers' ``modeling_rope_utils`` does.

Supported kinds: default, linear, llama3, longrope (Phi-3 "su"), each with partial rotary
(``partial_rotary_factor``: only the first ``rotary_dim`` features of a head are rotated). dynamic and
yarn raise ``NotImplementedError`` at model build time (see ``check_supported``).

longrope keeps TWO frequency tables (short and long factors) and picks one per row with a tensor
condition on that row's sequence length (``> original_max_position_embeddings`` -> long), as
transformers does from ``max(position_ids) + 1``; no Python branch on data, so it stays one static
graph. Both tables carry transformers' ``attention_factor`` scaling of cos/sin.
"""

from __future__ import annotations

import math

import torch

from shared.families.base import Architecture, RopeConfig

SUPPORTED_ROPE = ("default", "linear", "llama3", "longrope")


def rotary_dim(rope: RopeConfig, head_dim: int) -> int:
    """How many features of a head are rotated (transformers: int(head_dim * partial_rotary_factor))."""
    return int(head_dim * rope.partial_rotary_factor)


def _base_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    return 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def inv_freq(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> torch.Tensor:
    """[rotary_dim // 2] float32 inverse frequencies (longrope: the SHORT table, see ``longrope_freqs``)."""
    if rope.kind not in SUPPORTED_ROPE:
        raise NotImplementedError(
            f"Architecture.rope.kind={rope.kind!r} is not implemented (have {SUPPORTED_ROPE})"
        )
    dim = rotary_dim(rope, head_dim)
    if rope.kind == "longrope":
        return longrope_freqs(rope, head_dim)[0]
    freq = _base_freq(rope, dim)
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


def longrope_freqs(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(short, long) inverse frequencies [rotary_dim // 2], as transformers'
    ``_compute_longrope_parameters`` builds them for seq_len <= / > original_max_position_embeddings."""
    dim = rotary_dim(rope, head_dim)
    if rope.short_factor is None or rope.long_factor is None:
        raise NotImplementedError("longrope needs rope.short_factor and rope.long_factor")
    if len(rope.short_factor) != dim // 2 or len(rope.long_factor) != dim // 2:
        raise NotImplementedError(
            f"longrope factors have {len(rope.short_factor)}/{len(rope.long_factor)} entries; "
            f"rotary_dim/2 = {dim // 2}"
        )
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    short = 1.0 / (torch.tensor(rope.short_factor, dtype=torch.float32) * rope.theta**shape)
    long = 1.0 / (torch.tensor(rope.long_factor, dtype=torch.float32) * rope.theta**shape)
    return short, long


def attention_scaling(rope: RopeConfig, max_position_embeddings: int) -> float:
    """The factor transformers multiplies cos and sin by (1.0 except for longrope).

    longrope without ``attention_factor``: sqrt(1 + ln(factor) / ln(original_max)), where factor is
    rope.factor, or max_position_embeddings / original_max when the config gave none. (The frozen
    RopeConfig stores a missing factor as 1.0, so an explicit ``factor: 1.0`` is read as missing.)
    """
    if rope.kind != "longrope":
        return 1.0
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    orig = rope.original_max_position_embeddings or max_position_embeddings
    factor = rope.factor if rope.factor != 1.0 else max_position_embeddings / orig
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(orig))


def check_supported(arch: Architecture) -> None:
    """Raise NotImplementedError naming the first Architecture field this decoder does not implement."""
    if arch.rope.kind not in SUPPORTED_ROPE:
        raise NotImplementedError(
            f"Architecture.rope.kind={arch.rope.kind!r} is not implemented (have {SUPPORTED_ROPE})"
        )
    dim = rotary_dim(arch.rope, arch.head_dim)
    if dim % 2 != 0 or dim <= 0 or dim > arch.head_dim:
        raise NotImplementedError(
            f"Architecture.rope rotary dim {dim} (head_dim {arch.head_dim} x partial_rotary_factor "
            f"{arch.rope.partial_rotary_factor}) must be even and in (0, head_dim]"
        )
    if arch.rope.kind == "longrope":
        longrope_freqs(arch.rope, arch.head_dim)
        if arch.rope.original_max_position_embeddings is None:
            raise NotImplementedError("longrope needs rope.original_max_position_embeddings")


def cos_sin(
    positions: torch.Tensor, freq: torch.Tensor, dtype: torch.dtype, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, S] -> cos, sin [B, S, 1, R] (R = rotary dim; broadcast over the heads of a
    [B, S, H, D] tensor)."""
    f = positions[..., None].float() * freq.float()  # [B, S, R/2]
    emb = torch.cat((f, f), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return cos.to(dtype)[:, :, None], sin.to(dtype)[:, :, None]


def fold_sign(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., R] -> [-sin[:R/2], sin[R/2:]]: rotate_half's negation moved into the table, once per
    step, so ``apply`` needs only a half swap. Exact: (-a) * b == a * (-b) in IEEE arithmetic."""
    h = sin.shape[-1] // 2
    return torch.cat((-sin[..., :h], sin[..., h:]), dim=-1)


def apply(x: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D]; cos / ``fold_sign``-ed sin [B, S, 1, R] with R <= D: the first R features
    rotate, the rest pass. Bit-identical to transformers' x * cos + rotate_half(x) * sin."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + torch.roll(x, r // 2, -1) * sin_folded
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + torch.roll(rot, r // 2, -1) * sin_folded, rest), dim=-1)
