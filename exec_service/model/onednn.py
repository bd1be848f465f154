"""oneDNN (mkldnn) fp32 linears with prepacked weights, eager and inside compiled graphs.

On this 2-core AVX2 CPU MKL's sgemm for M = 1..16 rows streams the weights at ~6-12 GB/s; oneDNN's
prepacked inner product reaches ~20 GB/s at M = 1 and ~2x MKL at M = 8 (docs/PERFORMANCE.md). The
packed weight is an opaque mkldnn tensor, which neither Dynamo nor export can trace, so:

* eager: ``torch.ops.mkldnn._linear_pointwise(x, packed, bias)``;
* ``torch.compile``: the custom op ``neuron_serve::onednn_linear(x, weight, bias)``. Its inputs are
  the plain weight (a graph input like every parameter, so no weight enters the compiled code or
  the graph key); at run time it finds the weight's packed copy in a side table keyed by the
  weight's storage (``register_packed``), or falls back to ``F.linear``. Inductor calls it as an
  extern kernel and fuses everything around it;
* ``torch.export`` (StableHLO lowering, Neuron): plain ``F.linear``.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

# weight storage pointer -> (shape, stride, packed weight); entries leave with their weight
_PACKED: dict[int, tuple[torch.Size, tuple[int, ...], torch.Tensor]] = {}


def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_weight(weight: torch.Tensor, batch_hint: int | None = None) -> torch.Tensor | None:
    """The weight reordered into oneDNN's blocked layout (fp32 on CPU only; None where unsupported)."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not onednn_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
    except RuntimeError:
        return None


def register_packed(weight: torch.Tensor, packed: torch.Tensor) -> None:
    """Make ``packed`` what compiled graphs use for ``weight`` (until ``weight`` is freed)."""
    ptr = weight.data_ptr()
    _PACKED[ptr] = (weight.shape, weight.stride(), packed)
    weakref.finalize(weight, _PACKED.pop, ptr, None)


def _lookup(weight: torch.Tensor) -> torch.Tensor | None:
    entry = _PACKED.get(weight.data_ptr())
    if entry is None or entry[0] != weight.shape or entry[1] != weight.stride():
        return None
    return entry[2]


@torch.library.custom_op("neuron_serve::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    packed = _lookup(weight)
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through oneDNN when ``weight`` has a packed copy (``packed``)."""
    if packed is None or torch.compiler.is_exporting():  # export / Neuron tracing: the plain op
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return torch.ops.neuron_serve.onednn_linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
