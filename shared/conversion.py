"""The one conversion path: a family's rule → cast → quantize → TP shards.

Prep runs it three ways — on meta tensors to plan every shard file from the checkpoint's headers,
and tensor by tensor to stream a checkpoint into the shard writers — and exec's in-memory loader
(tests, development) runs :func:`rank_state_dicts` over an HF state dict; all of them therefore
store the same tensors under the same names.

Per rule (``shared.families.base.ParamRule``):

    rule.build(hf tensors)          the canonical tensor, unsharded and unpadded
    cast                            floating tensors to the target dtype; integer ones as they are
    shared.quantize                 the tensor itself, or int8 values + ``<name>_scale``
    shared.layout.shard             one tensor per rank (heads remapped, vocab padded)

Every rank's shard also holds ``rank`` (int32 ``[1]``): graph code reads its rank as a tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from shared.dtypes import torch_dtype
from shared.families.base import Architecture, ParamRule
from shared.layout import Target, shard
from shared.quantize import canonical_tensors, target_rules

RANK_KEY = "rank"
RANK_DTYPE = torch.int32
RANK_SHAPE = (1,)


def rank_tensor(rank: int) -> torch.Tensor:
    """The ``rank`` entry of rank ``rank``'s shard."""
    return torch.tensor([rank], dtype=RANK_DTYPE)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors in ``dtype``; anything else (integer ids, masks) is left as it is."""
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def shard_built(
    name: str, built: torch.Tensor, arch: Architecture, target: Target
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """From rule ``name``'s built (canonical, full-size) tensor: per stored tensor name, its
    ``tp_degree`` rank shards — ``name`` itself, or ``name`` and ``name_scale`` when the target
    quantizes it. Works on meta tensors (planning)."""
    full = cast(built, torch_dtype(target.dtype))
    del built  # not kept alive beside its cast copy while the shards are made
    for stored, tensor in canonical_tensors(name, full, target):
        yield stored, shard(stored, tensor, arch, target)


def convert_rule(
    rule: ParamRule, tensors: Mapping[str, torch.Tensor], arch: Architecture, target: Target
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """:func:`shard_built` of ``rule.build(tensors)``: one rule from HF tensors to rank shards."""
    yield from shard_built(rule.name, rule.build(tensors), arch, target)


def rank_state_dicts(
    hf_state: Mapping[str, torch.Tensor], arch: Architecture, target: Target
) -> list[dict[str, torch.Tensor]]:
    """Every rank's state dict (canonical names, then ``rank``) from an in-memory HF state dict;
    the family is the architecture's."""
    from shared.families import REGISTRY

    rules = target_rules(REGISTRY[arch.family].rules(arch), arch, target)
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(target.tp_degree)]
    for rule in rules:
        for name, parts in convert_rule(rule, hf_state, arch, target):
            for r, part in enumerate(parts):
                ranks[r][name] = part
    for r, state in enumerate(ranks):
        state[RANK_KEY] = rank_tensor(r)
    return ranks
