"""Tensor-parallel layers. Each knows its local (per-rank) shape and fails early when sizes don't
divide; row-parallel layers do their own all-reduce (nano-vllm ``layers/linear.py`` style).

Parameter shapes match the canonical shard layout of ``shared.layout`` exactly, so a rank's shard
file loads with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from exec_service.model.collectives import Collectives
from exec_service.model.layers import zeros_param as _empty
from exec_service.model.onednn import (
    onednn_available,
    pack_weight,
    packed_linear,
    reduction_linear,
    reduction_rows,
    register_packed,
)  # weights always come from a shard
from shared.layout import LayoutError as ParallelSizeError  # a size that tp does not divide
from shared.layout import divide  # the one per-rank size check, shared with prep's planning

__all__ = ["ParallelSizeError", "divide", "onednn_available", "pack_weight"]


# ---- int8 weight-only linears (shared/quantize.py: W ~= q * scale[out, None]) ----------------------

INT8_KERNELS = ("int8pack", "dequant")
# Above this many rows (prefill chunks) the dequantize-then-fp32-GEMM path wins: the int8 kernel's
# cost grows ~linearly with the rows on AVX2 (one step's linears, loaded machine: 128 rows 1.6 s
# int8pack vs 0.8 s dequant; 64 rows 0.85 s vs 2.2 s).
INT8PACK_MAX_ROWS = 64


def int8_linear(
    x: torch.Tensor,
    q: torch.Tensor,  # int8 [out, in]
    scale: torch.Tensor,  # float32 [out]
    kernel_scale: torch.Tensor,  # the scales in the int8 kernel's dtype (bfloat16) [out]
    bias: torch.Tensor | None,
    kernel: str,
) -> torch.Tensor:
    """``x (q * scale)^T + bias`` for a weight-only int8 linear; the result is in ``x``'s dtype.

    * ``int8pack`` (cpu): ``aten._weight_int8pack_mm`` — int8 weights streamed from memory, the
      activations rounded to bfloat16 and the per-channel scale applied inside the kernel (on this
      AVX2 CPU ~1.6x our oneDNN fp32 linears at 1 row, equal at 8: docs/QUANTIZATION.md). Used up
      to ``INT8PACK_MAX_ROWS`` rows.
    * ``dequant`` (cuda, neuron tracing, large prefills, and every other case): the per-output-channel
      scale factors out of the matmul, ``(x q^T) * scale``: one int8 -> x.dtype conversion of the
      weight per call, the GEMM in x's dtype, exact up to that dtype's rounding.
    * ``int8pack`` in compiled cpu graphs with one row (batch-1 decode, ``onednn.reduction_rows``):
      ``(x q^T) * scale`` as one fused reduction loop that reads the int8 bytes
      and converts them in registers (``onednn.reduction_linear``), exact like ``dequant``.
    The static shapes of a graph fix the branch taken (shape-only Python control flow)."""
    rows = x.numel() // x.shape[-1]
    if kernel == "int8pack" and reduction_rows(x):
        y = reduction_linear(x, q) * scale.to(x.dtype)
    elif kernel == "int8pack" and rows <= INT8PACK_MAX_ROWS and x.device.type == "cpu":
        y = torch.ops.aten._weight_int8pack_mm(
            x.reshape(rows, x.shape[-1]).to(torch.bfloat16), q, kernel_scale
        )
        y = y.to(x.dtype).view(*x.shape[:-1], q.shape[0])
    else:
        y = F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias


def int8pack_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


class _Int8Weight(nn.Module):
    """Mixin state for a weight-only int8 linear: ``weight`` int8, ``weight_scale`` float32 (both
    loaded from the shard), ``kernel_scale`` (derived, not state) and the kernel choice."""

    def _init_int8(self, out: int, inp: int) -> None:
        self.weight = _empty(out, inp, dtype=torch.int8)
        self.weight_scale = _empty(out, dtype=torch.float32)
        self.register_buffer("kernel_scale", torch.zeros(out, dtype=torch.bfloat16), persistent=False)
        self.kernel = "dequant"

    @property
    def quantized(self) -> bool:
        return self.weight.dtype == torch.int8


class ColumnParallelLinear(_Int8Weight):
    """y_local = x W_local^T (+ b_local); W split on the output dim. No communication.
    ``quantized``: W is int8 with per-output-channel ``weight_scale`` (its rows' scales)."""

    def __init__(
        self, in_features: int, out_local: int, bias: bool, dtype: torch.dtype, quantized: bool = False
    ) -> None:
        super().__init__()
        if quantized:
            self._init_int8(out_local, in_features)
        else:
            self.weight = _empty(out_local, in_features, dtype=dtype)  # [out/tp, in]
        self.bias = _empty(out_local, dtype=dtype) if bias else None
        self.packed: torch.Tensor | None = None  # set by pack_linears (cpu backend); not state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            return int8_linear(x, self.weight, self.weight_scale, self.kernel_scale, self.bias, self.kernel)
        return packed_linear(x, self.packed, self.weight, self.bias)


class RowParallelLinear(_Int8Weight):
    """y = all_reduce(x_local W_local^T) + b; W split on the input dim. The bias is added once, after
    the reduction. ``quantized``: every rank holds the whole rows' scales, which factor out of each
    rank's partial sum."""

    def __init__(
        self,
        in_local: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        comm: Collectives,
        quantized: bool = False,
    ) -> None:
        super().__init__()
        if quantized:
            self._init_int8(out_features, in_local)
        else:
            self.weight = _empty(out_features, in_local, dtype=dtype)  # [out, in/tp]
        self.bias = _empty(out_features, dtype=dtype) if bias else None
        self.comm = comm
        self.packed: torch.Tensor | None = None  # set by pack_linears (cpu backend); not state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            y = int8_linear(x, self.weight, self.weight_scale, self.kernel_scale, None, self.kernel)
        else:
            y = packed_linear(x, self.packed, self.weight, None)
        y = self.comm.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding split on the (padded) vocab dim; ids outside this rank's range contribute zeros and
    the ranks' partial results are summed. The vocab offset comes from the ``rank`` tensor."""

    def __init__(self, vocab_per_rank: int, hidden: int, dtype: torch.dtype, comm: Collectives) -> None:
        super().__init__()
        self.weight = _empty(vocab_per_rank, hidden, dtype=dtype)  # [V_pad/tp, hidden]
        self.vocab_per_rank = vocab_per_rank
        self.comm = comm

    def forward(self, ids: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        if self.comm.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - rank.to(ids.dtype) * self.vocab_per_rank
        inside = (local >= 0) & (local < self.vocab_per_rank)
        out = F.embedding(torch.where(inside, local, torch.zeros_like(local)), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return self.comm.all_reduce(out)


class ParallelLMHead(_Int8Weight):
    """Column-parallel LM head over the padded vocab: returns this rank's logits [.., V_pad/tp]; the
    sampler merges ranks. ``weight`` is None when tied to the embedding (set by the model).
    ``quantized`` (``--quantize-lm-head``): its own int8 weight even when the embedding is tied."""

    def __init__(
        self, vocab_per_rank: int, hidden: int, dtype: torch.dtype, tied: bool, quantized: bool = False
    ) -> None:
        super().__init__()
        if quantized:
            self._init_int8(vocab_per_rank, hidden)
        else:
            self.weight = None if tied else _empty(vocab_per_rank, hidden, dtype=dtype)
        self.packed: torch.Tensor | None = None  # set by pack_linears (of the tied weight when tied)

    @property
    def quantized(self) -> bool:
        return self.weight is not None and self.weight.dtype == torch.int8

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.quantized:
            return int8_linear(x, self.weight, self.weight_scale, self.kernel_scale, None, self.kernel)
        w = self.weight if weight is None else weight
        return packed_linear(x, self.packed, w, None)


def pack_linears(model: nn.Module, batch_hint: int | None = None) -> int:
    """Prepack every parallel linear's (and the LM head's, tied or not) fp32 weight for oneDNN;
    returns how many were packed. The original weights stay (state dict, embedding, export)."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
            mod.packed = pack_weight(mod.weight, batch_hint)
            w = mod.weight
        elif isinstance(mod, ParallelLMHead):
            w = (
                mod.weight
                if mod.weight is not None
                else getattr(getattr(model, "embed", None), "weight", None)
            )
            mod.packed = None if w is None else pack_weight(w, batch_hint)
        else:
            continue
        if mod.packed is not None:
            register_packed(w, mod.packed)  # what compiled graphs use (onednn.onednn_linear)
            n += 1
    return n


def prepare_int8(model: nn.Module, kernel: str) -> int:
    """After loading a quantized shard: derive each int8 linear's kernel scales and set its kernel
    (``INT8_KERNELS``); returns how many int8 linears the model has."""
    if kernel not in INT8_KERNELS:
        raise ValueError(f"int8 kernel must be one of {INT8_KERNELS}, got {kernel!r}")
    n = 0
    for mod in model.modules():
        if isinstance(mod, _Int8Weight) and mod.quantized:
            mod.kernel_scale.copy_(mod.weight_scale.to(torch.bfloat16))
            mod.kernel = kernel
            n += 1
    return n
