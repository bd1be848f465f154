"""Typed request/result objects of the prep pipeline (shared by the CLI and the gRPC server)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from shared.dtypes import DTYPE_NAMES

DTYPES = DTYPE_NAMES  # the target dtypes a request may name (shared/dtypes.py)
GQA_STRATEGIES = ("replicate_to_tp_degree", "convert_to_mha")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # one store path segment, never '..'
MAX_SOURCE_BYTES = 4096


class PrepError(Exception):
    """Bad input or a failed preparation; the message names the offending file or tensor."""


class PrepCancelled(Exception):
    """The preparation was cancelled; nothing was published."""


@dataclass(frozen=True)
class PrepareRequest:
    source: str
    revision: str | None = None
    output: str | None = None  # store URI; None = the default store
    tp_degree: int = 1
    dtype: str = "float32"
    gqa_strategy: str | None = None  # None = chosen from the head counts
    force: bool = False
    allow_pickle: bool = False
    name: str | None = None  # model name in the store; None = derived from the source
    quantize: str | None = None  # None or "int8" (weight-only, per output channel)
    quantize_lm_head: bool = False  # with quantize: also the LM head (default: model dtype)

    def __post_init__(self) -> None:
        if not self.source or not self.source.strip():
            raise PrepError("source is empty")
        if len(self.source.encode()) > MAX_SOURCE_BYTES or "\x00" in self.source:
            raise PrepError(f"source must be at most {MAX_SOURCE_BYTES} bytes without NUL characters")
        if self.name is not None and not NAME_PATTERN.match(self.name):
            raise PrepError(f"name {self.name!r} must match {NAME_PATTERN.pattern}")
        if self.quantize is not None and self.quantize not in ("int8",):
            raise PrepError(f"quantize must be 'int8' or unset, got {self.quantize!r}")
        if self.quantize_lm_head and self.quantize is None:
            raise PrepError("quantize_lm_head needs quantize")
        if self.revision is not None and (len(self.revision) > 256 or not self.revision.isprintable()):
            raise PrepError("revision must be at most 256 printable characters")
        if self.tp_degree < 1 or self.tp_degree > 128:
            raise PrepError(f"tp_degree must be in [1, 128], got {self.tp_degree}")
        if self.dtype not in DTYPES:
            raise PrepError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.gqa_strategy is not None and self.gqa_strategy not in GQA_STRATEGIES:
            raise PrepError(
                f"gqa_strategy must be one of {', '.join(GQA_STRATEGIES)}, got {self.gqa_strategy!r}"
            )


@dataclass
class Progress:
    stage: str = "pending"
    bytes_done: int = 0
    bytes_total: int = 0
    tensors_done: int = 0
    tensors_total: int = 0
    graphs_done: int = 0  # CompileGraphs
    graphs_total: int = 0


@dataclass(frozen=True)
class PrepareResult:
    manifest_uri: str
    artifact_key: str
    reused: bool
    manifest: dict = field(default_factory=dict, compare=False)
