"""Strict loading of one rank's shard, and the sources rank shards come from.

* ``ManifestShards``: the production path — the manifest (``shared.manifest``) from a store URI,
  the rank's ``shards/rank-…`` file checked against the manifest's sha256 *before* it is read.
* ``shards_from_hf_state_dict``: convert an in-memory HF state dict in process through
  ``shared.conversion``, the path prep uses (tests and development; the same tensors prep writes).

``load_strict`` refuses missing or extra keys, and any shape or dtype difference.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from shared import conversion, dtypes
from shared.families.base import Architecture
from shared.layout import Target
from shared.manifest import Manifest, shard_path
from shared.quantize import SCHEMES


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class ManifestShards:
    """Rank shards of a prepared artifact, addressed by its manifest URI (file:// or s3://)."""

    def __init__(self, manifest_uri: str) -> None:
        from shared.storage import split_uri

        self.manifest_uri = manifest_uri
        store, key = split_uri(manifest_uri)
        self.manifest = Manifest.from_json(store.get_bytes(key))
        self.arch, self.target = self.manifest.architecture, self.manifest.target
        if self.target.quantization not in (None, *SCHEMES):
            raise ShardLoadError(
                f"{manifest_uri}: unknown quantization scheme {self.target.quantization!r} "
                f"(this build serves {', '.join(SCHEMES)})"
            )

    def load(self, rank: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        from shared.storage import split_uri

        tp = self.target.tp_degree
        if not 0 <= rank < tp:
            raise ShardLoadError(f"rank {rank} out of range for tp {tp}")
        rel = shard_path(rank, tp)
        entry = self.manifest.file(rel)
        store, _ = split_uri(self.manifest_uri)
        local = store.local_path(rel)
        with tempfile.TemporaryDirectory(prefix="neuron-serve-shard-") as tmp:
            path = Path(local) if local is not None else Path(tmp) / "shard.safetensors"
            if local is None:
                store.download_file(rel, path)
            digest = _sha256(path)
            if digest != entry.sha256:
                raise ShardLoadError(f"{rel}: sha256 {digest} does not match the manifest's {entry.sha256}")
            return load_file(str(path))


def shards_from_hf_state_dict(
    hf_state: Mapping[str, torch.Tensor], arch: Architecture, target: Target
) -> list[dict[str, torch.Tensor]]:
    """Canonical rank state dicts (incl. ``rank``) straight from an in-memory HF state dict (the
    family is the architecture's): ``shared.conversion.rank_state_dicts``."""
    return conversion.rank_state_dicts(hf_state, arch, target)
