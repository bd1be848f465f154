"""Our legalization of the functional collectives, the one step public torch-mlir lacks.

Compiled at tp > 1, a step graph holds ``_c10d_functional`` ops (``model.collectives`` calls them
inside graphs): ``all_reduce(x, op, group)`` and ``all_gather_into_tensor(x, group_size, group)``
(rank order along dim 0), each followed by ``wait_tensor``. torch-mlir's FX importer keeps them as
``torch.operator`` and its StableHLO conversion fails on them ("failed to legalize operation
'torch.operator'"); TorchNeuron has a pass of its own. This one runs on the imported ``torch``
dialect, before torch-mlir's pipelines:

* ``wait_tensor(x)`` -> ``x``: StableHLO collectives are synchronous values;
* ``all_reduce`` -> ``stablehlo.all_reduce`` with the reduction as its region (sum -> ``add``,
  max -> ``maximum``, min -> ``minimum``, product -> ``multiply``);
* ``all_gather_into_tensor`` -> ``stablehlo.all_gather`` (``all_gather_dim = 0``);

each between ``torch_c.to_builtin_tensor`` / ``torch_c.from_builtin_tensor``, which torch-mlir's
backend type conversion folds away. Replica groups: one group of every rank, ``[[0, ..., tp-1]]``,
in cross-replica mode (no channel handle) — one program per NeuronCore, each process a replica —
and the module carries ``mhlo.num_replicas = tp``, ``mhlo.num_partitions = 1``. The group *name*
the graph was traced with must be the serving group's (``GROUP_NAME``): a graph that reduces over
another group is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

ALL_REDUCE = "torch._c10d_functional.all_reduce"
ALL_GATHER = "torch._c10d_functional.all_gather_into_tensor"
WAIT = "torch._c10d_functional.wait_tensor"
COLLECTIVES = (ALL_REDUCE, ALL_GATHER, WAIT)
COMBINERS = {
    "sum": "stablehlo.add",
    "max": "stablehlo.maximum",
    "min": "stablehlo.minimum",
    "product": "stablehlo.multiply",
}


class CollectiveError(ValueError):
    """A collective this legalization does not map (named with its operands)."""


@dataclass(frozen=True)
class Legalized:
    all_reduce: int
    all_gather: int

    def __bool__(self) -> bool:
        return bool(self.all_reduce or self.all_gather)


def walk(op) -> Iterator:
    """Every operation nested in ``op`` (``op`` first), in order, as ``ir.Operation`` (an
    ``OpView``'s ``name`` may be its symbol's, e.g. a function's)."""
    op = op.operation
    yield op
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield from walk(child)


def operator_name(op) -> str | None:
    """The ATen name of a ``torch.operator`` (``torch._c10d_functional.all_reduce``), else None."""
    from torch_mlir import ir

    if op.name != "torch.operator":
        return None
    return ir.StringAttr(op.attributes["name"]).value


def _constant(value) -> str | int:
    """The Python value of a ``torch.constant.str`` / ``torch.constant.int`` operand."""
    from torch_mlir import ir

    owner = value.owner
    if owner.name == "torch.constant.str":
        return ir.StringAttr(owner.attributes["value"]).value
    if owner.name == "torch.constant.int":
        return ir.IntegerAttr(owner.attributes["value"]).value
    raise CollectiveError(f"expected a constant operand, got {owner.name}")


def builtin_tensor_type(vtensor_type) -> object:
    """``!torch.vtensor<[2,1,64],f32>`` -> ``tensor<2x1x64xf32>`` (signed ints -> signless)."""
    from torch_mlir import ir

    m = re.fullmatch(r"!torch\.vtensor<\[([0-9,]*)\],(\w+)>", str(vtensor_type))
    if m is None:
        raise CollectiveError(f"a collective's operand must be a static-shaped tensor, got {vtensor_type}")
    dims = [d for d in m.group(1).split(",") if d]
    elem = re.sub(r"^si(\d+)$", r"i\1", m.group(2))
    return ir.Type.parse(f"tensor<{'x'.join([*dims, elem])}>")


def _replica_groups(tp: int):
    from torch_mlir import ir

    ranks = ", ".join(str(r) for r in range(tp))
    return ir.Attribute.parse(f"dense<[[{ranks}]]> : tensor<1x{tp}xi64>")


def legalize_collectives(module, tp: int, group_name: str) -> Legalized:
    """Rewrite every ``_c10d_functional`` op of ``module`` (torch dialect, as imported) in place.

    The context must have the ``stablehlo`` and ``torch_c`` dialects loaded (``lowering``
    does). Raises ``CollectiveError`` for a collective of another group or reduction."""
    from torch_mlir import ir

    found = [op for op in walk(module.operation) if operator_name(op) in COLLECTIVES]
    reduced = gathered = 0
    for op in found:
        kind = operator_name(op)
        result = op.results[0]
        if kind == WAIT:
            result.replace_all_uses_with(op.operands[0])
            op.erase()
            continue
        group = _constant(op.operands[2])
        if group != group_name:
            raise CollectiveError(f"{kind} over group {group!r}: graphs reduce over {group_name!r} only")
        operand = op.operands[0]
        in_type, out_type = builtin_tensor_type(operand.type), builtin_tensor_type(result.type)
        with ir.InsertionPoint(op), op.location:
            x = ir.Operation.create("torch_c.to_builtin_tensor", results=[in_type], operands=[operand])
            if kind == ALL_REDUCE:
                reduce_op = _constant(op.operands[1])
                if reduce_op not in COMBINERS:
                    raise CollectiveError(f"{kind}: reduction {reduce_op!r} is not mapped")
                new = ir.Operation.create(
                    "stablehlo.all_reduce",
                    results=[out_type],
                    operands=[x.result],
                    attributes={"replica_groups": _replica_groups(tp)},
                    regions=1,
                )
                scalar = ir.RankedTensorType.get([], ir.RankedTensorType(in_type).element_type)
                block = new.regions[0].blocks.append(scalar, scalar)
                with ir.InsertionPoint(block):
                    combined = ir.Operation.create(
                        COMBINERS[reduce_op], results=[scalar], operands=list(block.arguments)
                    )
                    ir.Operation.create("stablehlo.return", results=[], operands=[combined.result])
                reduced += 1
            else:
                if _constant(op.operands[1]) != tp:
                    raise CollectiveError(f"{kind} of group size {_constant(op.operands[1])}, not tp={tp}")
                new = ir.Operation.create(
                    "stablehlo.all_gather",
                    results=[out_type],
                    operands=[x.result],
                    attributes={
                        "all_gather_dim": ir.IntegerAttr.get(ir.IntegerType.get_signless(64), 0),
                        "replica_groups": _replica_groups(tp),
                    },
                )
                gathered += 1
            back = ir.Operation.create(
                "torch_c.from_builtin_tensor", results=[result.type], operands=[new.result]
            )
        result.replace_all_uses_with(back.result)
        op.erase()
    if reduced or gathered:
        i32 = ir.IntegerType.get_signless(32)
        module.operation.attributes["mhlo.num_replicas"] = ir.IntegerAttr.get(i32, tp)
        module.operation.attributes["mhlo.num_partitions"] = ir.IntegerAttr.get(i32, 1)
    return Legalized(reduced, gathered)
