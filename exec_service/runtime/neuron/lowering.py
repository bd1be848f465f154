"""A captured step graph -> StableHLO, through torch-mlir's FX importer: the compiler front half
TorchNeuron runs before neuronx-cc, verified here without the SDK.

    CapturedGraph (functional ATen, cache writes as aliased outputs)
      -> FxImporter.import_stateless_graph                      torch dialect
      -> collective_legalize (our pass; tp > 1)                 + stablehlo.all_reduce / all_gather
      -> torchdynamo-export-to-torch-backend-pipeline           torch backend contract
      -> torch-backend-to-stablehlo-backend-pipeline            stablehlo (+ chlo where it has no
                                                                  stablehlo form)
      -> constant folding (stablehlo-aggressive-simplification) and the f64 scalar constants
         narrowed to f32, as TorchNeuron narrows f64 on device    no f64 left
      -> arguments annotated: ``neuron_serve.input`` (the input's name) and, for each mutated
         input, ``tf.aliasing_output`` (XLA's input/output alias: the output reuses the buffer)

``LoweredGraph.check()`` is the contract a lowered graph must meet (``op_allowlist``): no torch
dialect op left, no f64, only allowlisted ops, and every aliased output an in-place update of its
input (reshape / scatter of the argument itself, never a computed copy of the cache).
A graph that does not lower raises ``LoweringError`` naming the graph, the op and where in our
code it comes from.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from exec_service.model.collectives import GROUP_NAME
from exec_service.runtime.neuron.capture import CapturedGraph, GraphInput
from exec_service.runtime.neuron.collective_legalize import Legalized, legalize_collectives, walk

TORCH_BACKEND = (
    "builtin.module(func.func(torch-match-quantized-custom-ops),"
    " torchdynamo-export-to-torch-backend-pipeline{ extra-library=})"
)
TO_STABLEHLO = "builtin.module(torch-backend-to-stablehlo-backend-pipeline{allow-non-finites=true})"
PARTIAL_STABLEHLO = "builtin.module(func.func(convert-torch-to-stablehlo))"
# constant folding: torch-mlir computes arange's length as f64 arithmetic on constants, and
# materializes Python float scalars as f64 constants converted to the tensor's dtype (below)
SIMPLIFY = "builtin.module(func.func(stablehlo-aggressive-simplification, canonicalize, cse))"
INPUT_ATTR = "neuron_serve.input"
ALIAS_ATTR = "tf.aliasing_output"
# ops an aliased output may pass through from its argument: views and in-place writes
_IN_PLACE = ("stablehlo.reshape", "stablehlo.scatter", "stablehlo.dynamic_update_slice")


class LoweringError(RuntimeError):
    def __init__(self, graph: str, op: str, detail: str) -> None:
        self.graph, self.op, self.detail = graph, op, detail
        super().__init__(f"graph {graph}: cannot lower {op}: {detail}")


@dataclass(frozen=True)
class LoweredGraph:
    name: str
    text: str  # the StableHLO module (MLIR assembly)
    ops: dict[str, int]  # op name -> count, every nesting level
    inputs: tuple[GraphInput, ...]
    num_outputs: int  # the graph's own outputs; the aliased new states follow
    aliases: tuple[tuple[int, int], ...]  # (input index, output index)
    collectives: Legalized
    in_place: dict[str, str | None]  # mutated input -> None if its output updates it in place, else why not

    def check(self) -> list[str]:
        """Every violation of the lowered-graph contract (empty: the graph passes)."""
        from exec_service.runtime.neuron.op_allowlist import violations

        return violations(self)


def _loaded_context():
    """A context with torch, torch_c, stablehlo and chlo loaded (the legalization creates their
    ops before any pipeline would load them): lowering an empty function loads them all."""
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_d
    from torch_mlir.passmanager import PassManager

    ctx = ir.Context()
    torch_d.register_dialect(ctx)
    with ctx:
        warm = ir.Module.parse(
            "func.func @f(%a: !torch.vtensor<[1],f32>) -> !torch.vtensor<[1],f32> {"
            " return %a : !torch.vtensor<[1],f32> }"
        )
        PassManager.parse(TO_STABLEHLO).run(warm.operation)
    return ctx


def _our_location(location: str) -> str:
    """The innermost frame of this package in an MLIR call-site location, e.g.
    ``exec_service/runtime/sampling.py:88``."""
    frames = re.findall(r'"([^"]*exec_service/[^"]*)":(\d+)', location)
    if not frames:
        return ""
    path, line = frames[0]
    return f"{path[path.rindex('exec_service/') :]}:{line}"


def _culprit(diagnostics: list[tuple[str, str]]) -> tuple[str, str]:
    """(op, where) of the first op that failed to legalize."""
    for message, location in diagnostics:
        m = re.search(r"failed to legalize operation '([^']+)'", message)
        if m is None:
            continue
        op = m.group(1)
        named = re.search(r'name = "([^"]+)"', message)
        if op == "torch.operator" and named:
            op = named.group(1)
        return op, _our_location(location)
    if diagnostics:
        return "?", _our_location(diagnostics[0][1])
    return "?", ""


def _unconverted(torch_backend_asm: str) -> list[str]:
    """The torch ops StableHLO conversion leaves behind (a failing pipeline reports only the first
    casualty, often a constant whose user did not convert)."""
    from torch_mlir import ir

    ctx = _loaded_context()
    with ctx:
        module = ir.Module.parse(torch_backend_asm)
        from torch_mlir.passmanager import PassManager

        PassManager.parse(PARTIAL_STABLEHLO).run(module.operation)
        left = {op.name for op in walk(module.operation) if op.name.startswith("torch.aten.")}
        left |= {
            ir.StringAttr(op.attributes["name"]).value
            for op in walk(module.operation)
            if op.name == "torch.operator"
        }
    return sorted(left)


def _constants_as_stablehlo(module) -> None:
    """``arith.constant`` (which torch-mlir emits for some scalars) -> ``stablehlo.constant`` of the
    same value, so that StableHLO's folders see them (``convert`` of an f64 constant -> an f32
    constant)."""
    from torch_mlir import ir

    for op in [op for op in walk(module.operation) if op.name == "arith.constant"]:
        with ir.InsertionPoint(op), op.location:
            new = ir.Operation.create(
                "stablehlo.constant",
                results=[op.results[0].type],
                attributes={"value": op.attributes["value"]},
            )
        op.results[0].replace_all_uses_with(new.result)
        op.erase()


def _narrow_f64_constants(module) -> int:
    """Every f64 constant that is only ever converted to another type (through reshapes and
    broadcasts) becomes the f32 constant of its value, as TorchNeuron narrows f64 on device: these
    are the Python float scalars of the graph (``x * 0.5``, an epsilon), which torch-mlir imports as
    ``!torch.float`` = f64. An f64 value computed from tensors is left alone (the check then fails
    on it). Returns how many constants were narrowed."""
    from torch_mlir import ir

    f64, f32 = ir.F64Type.get(), ir.F32Type.get()

    def chain(value) -> list | None:
        """The reshape / broadcast results between ``value`` and its converts, or None when some
        use is anything else."""
        out = []
        for use in value.uses:
            user = use.owner.operation
            if user.name == "stablehlo.convert":
                continue
            if user.name not in ("stablehlo.reshape", "stablehlo.broadcast_in_dim"):
                return None
            rest = chain(user.results[0])
            if rest is None:
                return None
            out += [user.results[0], *rest]
        return out

    def as_f32(t):
        t = ir.RankedTensorType(t)
        return ir.RankedTensorType.get(t.shape, f32)

    narrowed = 0
    for op in list(walk(module.operation)):
        if op.name != "stablehlo.constant" or ir.RankedTensorType(op.results[0].type).element_type != f64:
            continue
        views = chain(op.results[0])
        if views is None:
            continue
        attr = ir.DenseFPElementsAttr(op.attributes["value"])
        new_type = as_f32(op.results[0].type)
        if attr.is_splat:
            value = ir.DenseElementsAttr.get_splat(
                new_type, ir.FloatAttr.get(f32, attr.get_splat_value().value)
            )
        else:
            import numpy as np

            arr = np.array([attr[i] for i in range(len(attr))], dtype=np.float64).astype(np.float32)
            value = ir.DenseElementsAttr.get(arr.reshape(new_type.shape), type=f32)
        op.attributes["value"] = value
        for v in [op.results[0], *views]:
            v.set_type(as_f32(v.type))
        narrowed += 1
    return narrowed


def _annotate_arguments(func, captured: CapturedGraph) -> None:
    from torch_mlir import ir

    alias_of = dict(captured.aliases)
    entries = []
    for i, inp in enumerate(captured.inputs):
        attrs = [f'{INPUT_ATTR} = "{inp.name}"']
        if i in alias_of:
            attrs.append(f"{ALIAS_ATTR} = {alias_of[i]} : i32")
        entries.append("{" + ", ".join(attrs) + "}")
    func.attributes["arg_attrs"] = ir.Attribute.parse("[" + ", ".join(entries) + "]")


def _in_place(func, arg: int, out: int) -> str | None:
    """None when the function's output ``out`` is argument ``arg`` updated in place (only views and
    scatters between them), else the first op that makes it something else."""
    from torch_mlir import ir

    ret = next(op for op in walk(func) if op.name == "func.return")
    value = ret.operands[out]
    while True:
        value = value.maybe_downcast()
        if isinstance(value, ir.BlockArgument):
            n = value.arg_number
            return None if n == arg else f"it is argument {n}, not {arg}"
        owner = value.owner
        if owner.name not in _IN_PLACE:
            return f"it is computed by {owner.name}, not written in place"
        value = owner.operands[0]  # the updated / reshaped operand


def lower(captured: CapturedGraph, tp: int = 1, group_name: str = GROUP_NAME) -> LoweredGraph:
    from torch_mlir import ir
    from torch_mlir.extras.fx_importer import FxImporter
    from torch_mlir.passmanager import PassManager

    ctx = _loaded_context()
    diagnostics: list[tuple[str, str]] = []

    def collect(d) -> bool:
        notes = "".join(f"\n  {n.message}" for n in d.notes)
        diagnostics.append((d.message + notes, str(d.location)))
        return True

    handler = ctx.attach_diagnostic_handler(collect)
    try:
        importer = FxImporter(context=ctx)
        importer.import_stateless_graph(captured.gm.graph, func_name=captured.name)
        module = importer.module
        with ctx, ir.Location.unknown():
            legalized = legalize_collectives(module, tp, group_name)
            try:
                PassManager.parse(TORCH_BACKEND).run(module.operation)
            except ir.MLIRError:
                op, where = _culprit(diagnostics)
                raise LoweringError(captured.name, op, f"torch backend contract ({where})") from None
            torch_backend = module.operation.get_asm()
            try:
                PassManager.parse(TO_STABLEHLO).run(module.operation)
            except ir.MLIRError:
                op, where = _culprit(diagnostics)
                left = _unconverted(torch_backend)
                detail = f"no StableHLO conversion for {', '.join(left)}" if left else f"at {where}"
                raise LoweringError(captured.name, ", ".join(left) or op, detail) from None
            _constants_as_stablehlo(module)
            PassManager.parse(SIMPLIFY).run(module.operation)
            if _narrow_f64_constants(module):
                PassManager.parse(SIMPLIFY).run(module.operation)  # drops the f32 -> f32 converts
            func = next(op for op in walk(module.operation) if op.name == "func.func")
            _annotate_arguments(func, captured)
            if not module.operation.verify():
                raise LoweringError(captured.name, "module", "the StableHLO module does not verify")
            ops = Counter(op.name for op in walk(module.operation))
            in_place = {captured.inputs[i].name: _in_place(func, i, o) for i, o in captured.aliases}
            text = module.operation.get_asm()
    finally:
        handler.detach()
    return LoweredGraph(
        captured.name,
        text,
        dict(sorted(ops.items())),
        captured.inputs,
        captured.num_outputs,
        captured.aliases,
        legalized,
        in_place,
    )
