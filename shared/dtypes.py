"""The weight dtypes an artifact can be prepared in and served with: one table for prep and exec.

The names are what the CLI, the RPCs and the manifest's ``target.dtype`` say; :func:`torch_dtype`
turns one into the torch dtype. torch is imported only there, so that the request types
(``prep_service.api``) and ``neuron-serve --help`` stay free of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
"""Supported names; each is also the name of its ``torch`` dtype attribute."""


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` → ``torch.bfloat16``; ``ValueError`` naming the supported names otherwise."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {name!r} (supported: {', '.join(DTYPE_NAMES)})")
    import torch

    return getattr(torch, name)
