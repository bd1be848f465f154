"""Dynamo fullgraph capture -> AOTAutograd with the input mutations kept: the front of TorchNeuron's
``torch.compile(backend="neuron")``, run here on CPU.

A step graph updates state it does not return: the KV cache (``KVCache.write``: an ``index_copy_``
into a view of each layer's K / V buffer) and the token counts. Dynamo lifts the model's parameters
and buffers to graph inputs; AOTAutograd, with ``keep_inference_input_mutations``, functionalizes
every in-place write and ends the graph with one ``copy_(input, new_value)`` per mutated input.
``CapturedGraph`` turns each of those into an extra output aliased to its input — the form a
compiler reuses the input buffer for (TorchNeuron: "the KV cache input buffer is reused as the
output"; XLA: ``tf.aliasing_output``) — and its ``__call__`` performs the write-back, so a second
call reads what the first one wrote exactly as on the device.

Decompositions are torch-mlir's table (core ATen + the overloads its FX importer needs), so the
graph that is captured is the graph that is lowered: ``index_copy`` becomes ``index_put`` (a
StableHLO scatter), SDPA its matmul / softmax form.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

_CONTAINERS = ("_modules", "_parameters", "_buffers")


class CaptureError(RuntimeError):
    """A graph that cannot be captured as one static, functional graph."""


@dataclass(frozen=True)
class GraphInput:
    name: str  # dotted: "model.layers.0.attn.qkv.weight", "cache.k0", "counts.counts", "input_ids"
    shape: tuple[int, ...]
    dtype: str  # "float32", "int64", ...
    mutated: bool  # written by the graph (its new value is an aliased output)


@dataclass
class CapturedGraph:
    """One step graph as a functional ATen graph.

    ``gm(*inputs)`` returns the graph's own outputs followed by the new value of every mutated input;
    ``aliases`` pairs each mutated input with its output: (input index, output index)."""

    name: str
    gm: fx.GraphModule
    inputs: tuple[GraphInput, ...]
    num_outputs: int
    aliases: tuple[tuple[int, int], ...]
    # the module compiled through this graph (``capture``): calling it runs ``__call__`` on the
    # module's own parameters and buffers, so state written by one call is read by the next
    compiled: Callable[..., Any] | None = None

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.gm(*args)
        for i, o in self.aliases:  # the device reuses the input buffer for the output: same effect
            args[i].copy_(outs[o])
        return tuple(outs[: self.num_outputs])

    @property
    def mutated(self) -> tuple[str, ...]:
        return tuple(self.inputs[i].name for i, _ in self.aliases)


def source_name(node: fx.Node) -> str:
    """Dynamo's source of a graph input as a dotted module path (``L['self']._modules['cache'].
    _buffers['k0']`` -> ``cache.k0``); the node's own name when it has none."""
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return node.name
    parts = [p for p in re.findall(r"\['([^']*)'\]", grapharg.source.name) if p not in _CONTAINERS]
    if parts and parts[0] == "self":
        parts = parts[1:]
    return ".".join(parts) or node.name


def decompositions() -> dict[Any, Callable]:
    """torch-mlir's decomposition table (what its FX importer and StableHLO conversion expect)."""
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    return get_decomposition_table()


def mutations_as_outputs(gm: fx.GraphModule, names: Sequence[str], name: str) -> CapturedGraph:
    """Replace each trailing ``copy_(input, value)`` of an AOTAutograd inference graph by an output.

    Refuses any other in-place op (a functionalized graph has none) and a write whose value does not
    have its input's shape and dtype (it would not be a buffer reuse)."""
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(names):
        raise CaptureError(
            f"{name}: AOTAutograd has {len(placeholders)} inputs but Dynamo {len(names)} "
            "(duplicated or subclass inputs are not supported)"
        )
    output = graph.find_nodes(op="output")[0]
    outs = list(output.args[0])
    num_outputs = len(outs)
    aliases: list[tuple[int, int]] = []
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if not node.target._schema.is_mutable:
            continue
        dst = node.args[0]
        if node.target is not torch.ops.aten.copy_.default or dst.op != "placeholder":
            raise CaptureError(f"{name}: in-place op {node.target} left in the functional graph")
        src = node.args[1]
        want, got = dst.meta["val"], src.meta["val"]
        if tuple(want.shape) != tuple(got.shape) or want.dtype != got.dtype:
            raise CaptureError(
                f"{name}: {names[placeholders.index(dst)]} is written with {list(got.shape)} {got.dtype}, "
                f"not its own {list(want.shape)} {want.dtype}"
            )
        aliases.append((placeholders.index(dst), len(outs)))
        outs.append(src)
        graph.erase_node(node)
    output.args = (tuple(outs),)
    graph.lint()
    gm.recompile()
    written = {i for i, _ in aliases}
    inputs = tuple(
        GraphInput(
            n, tuple(p.meta["val"].shape), str(p.meta["val"].dtype).removeprefix("torch."), i in written
        )
        for i, (n, p) in enumerate(zip(names, placeholders, strict=True))
    )
    return CapturedGraph(name, gm, inputs, num_outputs, tuple(aliases))


def capture(module: nn.Module, args: Sequence[torch.Tensor], name: str) -> CapturedGraph:
    """Capture ``module(*args)`` (one static shape, no graph break) and run it once.

    The run goes through the captured graph (``CapturedGraph.__call__``): ``module``'s buffers are
    updated as its eager forward would update them."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from exec_service.runtime.backends import allow_many_graphs

    box: dict[str, CapturedGraph] = {}

    def backend(dynamo_gm: fx.GraphModule, example_inputs: list[torch.Tensor]):
        names = [source_name(n) for n in dynamo_gm.graph.find_nodes(op="placeholder")]

        def inference_compiler(aot_gm: fx.GraphModule, _inputs: list[torch.Tensor]):
            captured = mutations_as_outputs(aot_gm, names, name)
            box["graph"] = captured

            def run(*flat: torch.Tensor) -> list[torch.Tensor]:
                return list(captured(*flat))

            return make_boxed_func(run)  # called with the inputs as one list

        return aot_autograd(
            fw_compiler=inference_compiler,
            decompositions=decompositions(),
            keep_inference_input_mutations=True,
        )(dynamo_gm, example_inputs)

    allow_many_graphs()
    compiled = torch.compile(module, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled(*args)
    if "graph" not in box:
        raise CaptureError(f"{name}: Dynamo produced no graph")
    box["graph"].compiled = compiled
    return box["graph"]
