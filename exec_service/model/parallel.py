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


class ParallelSizeError(ValueError):
    """A layer size is not divisible by the tensor-parallel degree."""


def divide(n: int, tp: int, what: str) -> int:
    if tp < 1 or n % tp != 0:
        raise ParallelSizeError(f"{what} ({n}) is not divisible by tp ({tp})")
    return n // tp


def _empty(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    # weights always come from a shard; empty (not random) so that a forgotten load shows up
    return nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)


def onednn_available() -> bool:
    """oneDNN (mkldnn) fp32 linear with prepacked weights: the fastest CPU GEMV/small-GEMM here."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_weight(weight: torch.Tensor, batch_hint: int | None = None) -> torch.Tensor | None:
    """The weight reordered into oneDNN's blocked layout (fp32 on CPU only; None where unsupported)."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not onednn_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
    except RuntimeError:
        return None


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear`` through oneDNN with a prepacked weight (``packed``), or plain ``F.linear``.

    On this 2-core AVX2 CPU MKL's sgemm for M = 1..16 rows streams the weights at ~6-12 GB/s;
    oneDNN's prepacked inner product reaches ~20 GB/s at M = 1 and ~2x MKL at M = 8 (bench/)."""
    if packed is None or _tracing():  # export / compile / Neuron tracing see the plain op
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T (+ b_local); W split on the output dim. No communication."""

    def __init__(self, in_features: int, out_local: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = _empty(out_local, in_features, dtype=dtype)  # [out/tp, in]
        self.bias = _empty(out_local, dtype=dtype) if bias else None
        self.packed: torch.Tensor | None = None  # set by pack_linears (cpu backend); not state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local W_local^T) + b; W split on the input dim. The bias is added once, after
    the reduction."""

    def __init__(
        self, in_local: int, out_features: int, bias: bool, dtype: torch.dtype, comm: Collectives
    ) -> None:
        super().__init__()
        self.weight = _empty(out_features, in_local, dtype=dtype)  # [out, in/tp]
        self.bias = _empty(out_features, dtype=dtype) if bias else None
        self.comm = comm
        self.packed: torch.Tensor | None = None  # set by pack_linears (cpu backend); not state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.comm.all_reduce(packed_linear(x, self.packed, self.weight, None))
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


class ParallelLMHead(nn.Module):
    """Column-parallel LM head over the padded vocab: returns this rank's logits [.., V_pad/tp]; the
    sampler merges ranks. ``weight`` is None when tied to the embedding (set by the model)."""

    def __init__(self, vocab_per_rank: int, hidden: int, dtype: torch.dtype, tied: bool) -> None:
        super().__init__()
        self.weight = None if tied else _empty(vocab_per_rank, hidden, dtype=dtype)
        self.packed: torch.Tensor | None = None  # set by pack_linears (of the tied weight when tied)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if weight is None else weight
        return packed_linear(x, self.packed, w, None)


def pack_linears(model: nn.Module, batch_hint: int | None = None) -> int:
    """Prepack every parallel linear's (and the LM head's, tied or not) fp32 weight for oneDNN;
    returns how many were packed. The original weights stay (state dict, embedding, export)."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
            mod.packed = pack_weight(mod.weight, batch_hint)
        elif isinstance(mod, ParallelLMHead):
            w = (
                mod.weight
                if mod.weight is not None
                else getattr(getattr(model, "embed", None), "weight", None)
            )
            mod.packed = None if w is None else pack_weight(w, batch_hint)
        else:
            continue
        n += mod.packed is not None
    return n


def unpack_linears(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)):
            mod.packed = None
