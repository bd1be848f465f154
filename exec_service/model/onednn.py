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

One exception inside compiled cpu graphs: a linear of one row (batch-1 decode,
``REDUCTION_MAX_ROWS``) is written as the reduction ``(x * w).sum(-1)``, which Inductor turns into
one vectorised, OpenMP-parallel C++ loop over the weight's rows that streams the weight at the
memory bandwidth, fused with its neighbours (``reduction_linear``). SmolLM2's 121 decode matrices,
one compiled function, this 2-core AVX2 CPU, idle: 21.8 ms (45.9 steps/s, ``bench.roofline``) vs
oneDNN 29.8 ms; the whole batch-1 decode graph 18.2 ms vs 41.4 ms eager. int8 weights
(``parallel.int8_linear``) go the same way: the loop converts them in registers, reading a quarter
of the bytes. Not at 2 rows or more: alone, 2-8 rows of reductions beat oneDNN / int8pack too, but
inside a decode graph Inductor inlines the producer (the RMSNorm) into the reduction loop, computing
it again for every output element, and picks a poor loop order at 2 rows: whole decode steps,
idle, fp32 batch 2 30.8 vs 27.9 ms with oneDNN, int8 batch 2 31.0 vs 26.4 ms and batch 8 93.8 vs
54.3 ms with int8pack (docs/PERFORMANCE.md).
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


# Rows up to which compiled cpu graphs compute a linear as a reduction rather than a oneDNN / int8pack
# call (see above: measured inside whole decode graphs).
REDUCTION_MAX_ROWS = 1


def reduction_rows(x: torch.Tensor) -> bool:
    """Whether a compiled cpu graph computes ``x @ W^T`` as a reduction (a trace-time, shape-only
    choice: static shapes fix it per graph)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.numel() // x.shape[-1] <= REDUCTION_MAX_ROWS
        and torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
    )


def reduction_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` as an elementwise product summed over the input dim: [..., in] x [out, in] ->
    [..., out]. Inside a compiled graph this is one fused loop over the weight's rows (the weight may
    be int8: the conversion happens in the loop, so only its bytes are read)."""
    return (x.unsqueeze(-2) * weight.to(x.dtype)).sum(-1)


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
