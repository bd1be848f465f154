"""Rotary position embeddings, computed exactly as transformers' ``modeling_rope_utils`` does.

Every kind of ``shared.families.base.ROPE_KINDS``: default, linear, llama3, longrope (Phi-3 "su"),
yarn and dynamic (NTK), each with partial rotary (``partial_rotary_factor``: only the first
``rotary_dim`` features of a head are rotated).

* default / linear / llama3 / yarn: one static table. yarn blends interpolated (``/ factor``) and
  extrapolated frequencies over a linear ramp of dims and scales cos/sin by its attention factor.
* longrope keeps TWO tables (short and long factors) and picks one per row with a tensor condition
  on that row's sequence length (``> original_max_position_embeddings`` -> long), as transformers
  does from ``max(position_ids) + 1``; both carry its ``attention_factor`` scaling of cos/sin.
* dynamic: transformers recomputes the table in every forward from ``seq_len = max(position_ids) + 1``
  once it exceeds ``max_position_embeddings`` (base rescaled), else uses the original table. Here each
  row computes its own table from its own sequence length with tensor ops (``dynamic_freqs``) and
  picks it over the original one by a tensor condition. Equal to transformers at batch 1 for every
  decode step and for a prompt prefilled in ONE chunk; ``check_serving_shape`` refuses serving
  shapes that would prefill a longer-than-``max_position_embeddings`` prompt in several chunks.

No Python branch on data anywhere, so each step stays one static graph.
"""

from __future__ import annotations

import math

import torch

from shared.families.base import ROPE_KINDS, Architecture, RopeConfig

SUPPORTED_ROPE = ROPE_KINDS  # prep and exec accept the same kinds


def rotary_dim(rope: RopeConfig, head_dim: int) -> int:
    """How many features of a head are rotated (transformers: int(head_dim * partial_rotary_factor))."""
    return int(head_dim * rope.partial_rotary_factor)


def _exponents(dim: int) -> torch.Tensor:
    """[dim // 2] float32: 0, 2/dim, 4/dim, … (the power of the base for each frequency)."""
    return torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim


def _base_freq(rope: RopeConfig, dim: int, theta: float | None = None) -> torch.Tensor:
    return 1.0 / ((rope.theta if theta is None else theta) ** _exponents(dim))


def inv_freq(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> torch.Tensor:
    """[rotary_dim // 2] float32 inverse frequencies (longrope: the SHORT table, see ``longrope_freqs``)."""
    if rope.kind not in SUPPORTED_ROPE:
        raise NotImplementedError(
            f"Architecture.rope.kind={rope.kind!r} is not implemented (have {SUPPORTED_ROPE})"
        )
    dim = rotary_dim(rope, head_dim)
    if rope.kind == "longrope":
        return longrope_freqs(rope, head_dim)[0]
    if rope.kind == "yarn":
        return yarn_freqs(rope, head_dim, max_position_embeddings)
    if rope.kind == "dynamic":  # the table below max_position_embeddings (see ``dynamic_freqs``)
        return _base_freq(rope, dim, dynamic_theta(rope, dim, max_position_embeddings))
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


def yarn_freqs(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> torch.Tensor:
    """[rotary_dim // 2] float32, as transformers' ``_compute_yarn_parameters``: per dim, a blend of
    the extrapolated (unscaled) and interpolated (``/ factor``) frequency. Dims that turn more than
    ``beta_fast`` times over ``original_max_position_embeddings`` extrapolate, fewer than
    ``beta_slow`` interpolate, a linear ramp in between (its ends rounded outwards if ``truncate``).
    Same float ops in the same order as transformers, so the same bits."""
    dim = rotary_dim(rope, head_dim)
    orig = rope.original_max_position_embeddings or max_position_embeddings
    fast, slow = rope.beta_fast or 32, rope.beta_slow or 1  # transformers: ``or`` defaults

    def dim_turning(turns: float) -> float:
        """The (fractional) dim whose wavelength fits ``turns`` times in ``orig`` positions."""
        return (dim * math.log(orig / (turns * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = dim_turning(fast), dim_turning(slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolated_share = 1 - ramp  # 1: the dim keeps its frequency; 0: divided by factor
    powers = rope.theta ** _exponents(dim)
    extrapolated, interpolated = 1.0 / powers, 1.0 / (rope.factor * powers)
    return interpolated * (1 - extrapolated_share) + extrapolated * extrapolated_share


def dynamic_theta(rope: RopeConfig, dim: int, max_position_embeddings: int) -> float:
    """dynamic's base at ``seq_len = max_position_embeddings`` (transformers' table at init, computed
    in Python floats): theta * (factor - (factor - 1)) ** (dim / (dim - 2)), theta itself for most
    factors."""
    ratio = rope.factor * max_position_embeddings / max_position_embeddings - (rope.factor - 1)
    return rope.theta * ratio ** (dim / (dim - 2))


def dynamic_freqs(
    rope: RopeConfig, head_dim: int, max_position_embeddings: int, seq_len: torch.Tensor
) -> torch.Tensor:
    """seq_len [B, 1] int64 -> [B, rotary_dim // 2] float32: each row's NTK-rescaled table, as
    transformers' ``_compute_dynamic_ntk_parameters`` computes it from a tensor ``seq_len`` (float32
    tensor arithmetic, same ops in the same order). Rows at or below max_position_embeddings must use
    the original table instead (``inv_freq``), as transformers does; the caller picks per row."""
    dim = rotary_dim(rope, head_dim)
    seq = torch.clamp(seq_len, min=max_position_embeddings)  # [B, 1] int64
    factor = rope.factor
    ratio = (factor * seq / max_position_embeddings) - (factor - 1)  # [B, 1] float32
    # pow one row at a time (B is static: an unrolled loop, not a branch on data). transformers
    # raises a one-element tensor to this power, which torch computes with the scalar libm pow;
    # over a tensor of 16+ elements it would use its vectorised pow, which can differ by an ulp.
    stretch = torch.stack([ratio[i] ** (dim / (dim - 2)) for i in range(ratio.shape[0])])  # [B, 1]
    base = rope.theta * stretch
    # [B, 1] ** [R/2]: each row's R/2 powers run as transformers' one-base ** [R/2] does
    return 1.0 / (base ** _exponents(dim).to(seq_len.device))  # [B, R/2]


def attention_scaling(rope: RopeConfig, max_position_embeddings: int) -> float:
    """The factor transformers multiplies cos and sin by (1.0 except for longrope and yarn).

    yarn: ``attention_factor`` if given; else with ``mscale`` and ``mscale_all_dim`` (both non-zero)
    m(factor, mscale) / m(factor, mscale_all_dim), else m(factor), where m(f, s) = 0.1 s ln f + 1
    (1 for f <= 1).

    longrope without ``attention_factor``: sqrt(1 + ln(factor) / ln(original_max)), where factor is
    rope.factor, or max_position_embeddings / original_max when the config gave none. (The frozen
    RopeConfig stores a missing factor as 1.0, so an explicit ``factor: 1.0`` is read as missing.)
    """
    if rope.kind == "yarn":
        return _yarn_attention_factor(rope)
    if rope.kind != "longrope":
        return 1.0
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    orig = rope.original_max_position_embeddings or max_position_embeddings
    factor = rope.factor if rope.factor != 1.0 else max_position_embeddings / orig
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(orig))


def _yarn_attention_factor(rope: RopeConfig) -> float:
    if rope.attention_factor is not None:
        return float(rope.attention_factor)

    def m(scale: float, mscale: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return float(m(rope.factor, rope.mscale) / m(rope.factor, rope.mscale_all_dim))
    return m(rope.factor)


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
    if arch.rope.kind == "dynamic" and dim <= 2:
        raise NotImplementedError(f"Architecture.rope kind 'dynamic' needs a rotary dim > 2, got {dim}")


def check_serving_shape(arch: Architecture, max_seq_len: int, largest_context_bucket: int) -> None:
    """Refuse a serving shape under which this rope kind would not be token-exact (ValueError).

    dynamic: a prompt of P tokens gets its table from P in transformers; a prefill chunk here gets it
    from the chunk's own end, which differs for a non-final chunk once P > max_position_embeddings.
    So every prompt longer than max_position_embeddings must fit one chunk: the largest context
    bucket or max_position_embeddings must be >= max_seq_len - 1 (the longest prompt). Other kinds:
    no rule here (longrope's is the engine's re-encode rule)."""
    if arch.rope.kind != "dynamic":
        return
    longest = max_seq_len - 1
    threshold = arch.max_position_embeddings
    if largest_context_bucket < longest and threshold < longest:
        raise ValueError(
            f"rope 'dynamic': the largest context bucket ({largest_context_bucket}) or "
            f"max_position_embeddings ({threshold}) must be >= max_seq_len - 1 ({longest}, max_seq_len "
            f"{max_seq_len}), so that every prompt longer than max_position_embeddings is prefilled in "
            "one chunk (its rope table depends on the whole prompt's length)"
        )


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
