"""Strict loading of one rank's shard, and what a shard source is (the production source is
``exec_service.artifact.Artifact``: the model package does no storage I/O, it receives tensors).

* ``shards_from_hf_state_dict``: convert an in-memory HF state dict in process through
  ``shared.conversion``, the path prep uses (tests and development; the same tensors prep writes).

``load_strict`` refuses missing or extra keys, and any shape or dtype difference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn

from shared import conversion, dtypes
from shared.families.base import Architecture
from shared.layout import Target


class ShardLoadError(ValueError):
    """A shard that does not match the model: checksum, missing/extra keys, shape or dtype."""


def torch_dtype(name: str) -> torch.dtype:
    """``shared.dtypes.torch_dtype``; an unsupported name is the artifact's fault: ShardLoadError."""
    try:
        return dtypes.torch_dtype(name)
    except ValueError as e:
        raise ShardLoadError(str(e)) from None


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str = "shard") -> None:
    """Copy ``state`` into ``module``'s persistent parameters and buffers; no missing/extra keys,
    shapes and dtypes must match exactly."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ShardLoadError(
            f"{what}: missing keys {missing[:8]}{'…' if len(missing) > 8 else ''}, "
            f"unexpected keys {extra[:8]}{'…' if len(extra) > 8 else ''}"
        )
    for name, t in state.items():
        mine = own[name]
        if tuple(t.shape) != tuple(mine.shape):
            raise ShardLoadError(
                f"{what}: {name} has shape {tuple(t.shape)}, the model expects {tuple(mine.shape)}"
            )
        if t.dtype != mine.dtype:
            raise ShardLoadError(f"{what}: {name} has dtype {t.dtype}, the model expects {mine.dtype}")
    module.load_state_dict(dict(state), strict=True)


class ShardSource(Protocol):
    """Picklable: TP worker processes call ``load(rank)`` themselves."""

    arch: Architecture
    target: Target

    def load(self, rank: int) -> dict[str, torch.Tensor]: ...


def shards_from_hf_state_dict(
    hf_state: Mapping[str, torch.Tensor], arch: Architecture, target: Target
) -> list[dict[str, torch.Tensor]]:
    """Canonical rank state dicts (incl. ``rank``) straight from an in-memory HF state dict (the
    family is the architecture's): ``shared.conversion.rank_state_dicts``."""
    return conversion.rank_state_dicts(hf_state, arch, target)
