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

One exception inside compiled cpu graphs: a linear of at most ``REDUCTION_MAX_ROWS`` rows (batch-1
and batch-2 decode) is written as one reduction per row, ``(x_r * w).sum(-1)``, which Inductor turns
into one vectorised, OpenMP-parallel C++ loop that streams the weight once for all rows at the
memory bandwidth, fused with its neighbours (``reduction_linear``). SmolLM2's 121 decode matrices,
one compiled function, this 2-core AVX2 CPU, idle: 1 row 21.8 ms (45.9 steps/s, ``bench.roofline``)
vs oneDNN 29.8 ms; 2 rows 18.1 vs 28.4 ms; 4 rows 22.6 vs 22.9 ms (a tie: oneDNN is kept); 8 rows
35.0 vs 29.3 ms (oneDNN wins). int8 weights (``parallel.int8_linear``) gain more and longer: the
loop converts them in registers, reading a quarter of the bytes (docs/PERFORMANCE.md).
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


# Registered with the dispatcher directly (a CPU kernel + a fake), not with ``torch.library.custom_op``:
# its Python wrapper layers cost ~15 us more per call here, x 121 linears per decode step.
_LIB = torch.library.Library("neuron_serve", "DEF")
_LIB.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    packed = _lookup(weight)
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


_LIB.impl("onednn_linear", onednn_linear, "CPU")


@torch.library.register_fake("neuron_serve::onednn_linear", lib=_LIB)
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# Rows up to which compiled cpu graphs compute an fp32 linear as reductions rather than a oneDNN call.
REDUCTION_MAX_ROWS = 2


def reduction_rows(x: torch.Tensor, max_rows: int = REDUCTION_MAX_ROWS) -> bool:
    """Whether a compiled cpu graph computes ``x @ W^T`` as reductions (a trace-time, shape-only
    choice: static shapes fix it per graph)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.numel() // x.shape[-1] <= max_rows
        and torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
    )


def reduction_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` as one elementwise product summed over the input dim per row of ``x``:
    [..., in] x [out, in] -> [..., out]. Inside a compiled graph the rows' reductions share one loop
    over the weight's rows, which reads the weight once for all of them (the weight may be int8: the
    conversion happens in the loop, so only its bytes are read). Meant for few rows (one reduction
    each, unrolled at trace time)."""
    w = weight.to(x.dtype)
    rows = x.reshape(-1, x.shape[-1])  # [R, in]
    out = torch.stack([(row * w).sum(-1) for row in rows.unbind(0)])  # [R, out]
    return out.view(*x.shape[:-1], weight.shape[0])


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through oneDNN when ``weight`` has a packed copy (``packed``: the
    cpu backend's kernels); then in compiled cpu graphs with few rows, as a reduction
    (``reduction_rows``). Without a packed copy (other backends, Neuron tracing, ``cpu_linear="aten"``)
    always the plain op."""
    if packed is not None and reduction_rows(x):
        y = reduction_linear(x, weight)
        return y if bias is None else y + bias
    if packed is None or torch.compiler.is_exporting():  # export / Neuron tracing: the plain op
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return torch.ops.neuron_serve.onednn_linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
