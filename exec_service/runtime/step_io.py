"""Named step inputs and outputs: what the engine hands a step graph and what it gets back.

A graph module keeps plain positional tensor arguments (torch.export, torch.compile and Neuron
tracing need them: one static signature per graph). Its spec says which inputs it takes, in which
order (``GraphSpec.input_names()``), and which outputs it returns (``StepGraph.output_names``); the
conversions happen here only: ``StepInputs.args(spec)`` -> the graph's arguments, and
``StepOutputs.from_graph(names, outputs)`` <- what it returned.

``INPUTS`` gives every input's dtype and symbolic shape; ``GraphSpec.dims()`` sizes the symbols
(B batch rows, S tokens per row, K KV length read, M suppressed ids per row, P sampling params,
D = S - 1 draft tokens per row and Q the width of a drafter's q, for the verify graph).
A new graph kind adds its inputs to ``INPUTS`` and ``StepInputs`` (default None), its outputs to
``StepOutputs`` (default None), and names them in its spec; the engine, the runner and the TP
broadcast need no other change (the speculation graph came in that way).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from exec_service.runtime.graphs import GraphSpec


class StepIOError(ValueError):
    """Step inputs or outputs that do not fit a graph (or each other)."""


@dataclass(frozen=True)
class InputDef:
    dtype: torch.dtype
    dims: tuple[str, ...]  # symbolic shape, sized by GraphSpec.dims()

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] for d in self.dims)

    def describe(self) -> str:
        return f"[{','.join(self.dims)}] {str(self.dtype).removeprefix('torch.')}"


INPUTS: dict[str, InputDef] = {
    "input_ids": InputDef(torch.int64, ("B", "S")),
    "positions": InputDef(torch.int64, ("B", "S")),
    "slots": InputDef(torch.int64, ("B",)),  # the cache slot each row reads and writes
    "mask": InputDef(torch.bool, ("B", "S", "K")),  # True = may attend (make_mask)
    "last_idx": InputDef(torch.int64, ("B",)),  # the row's last real token (its logits are sampled)
    "suppress_ids": InputDef(torch.int64, ("B", "M")),  # ids that must not be chosen (-1 = none)
    "params": InputDef(torch.float32, ("B", "P")),  # sampling.PARAM_FIELDS per row
    "uniforms": InputDef(torch.float32, ("B",)),  # one seeded draw per row (inverse CDF)
    # the verify graph (speculation): real drafts per row, its seeded draws (acceptance of each
    # draft, then the final token), and the drafter's q per draft (support ids, probabilities)
    "num_drafts": InputDef(torch.int64, ("B",)),
    "draws": InputDef(torch.float32, ("B", "S")),
    "draft_ids": InputDef(torch.int64, ("B", "D", "Q")),
    "draft_probs": InputDef(torch.float32, ("B", "D", "Q")),
}


@dataclass(frozen=True)
class StepInputs:
    """The tensors of one step. The sampling inputs (``params``, ``uniforms``) are taken by the full
    sampler only, ``num_drafts`` / ``draws`` / ``draft_ids`` / ``draft_probs`` by the verify graph
    (which takes no ``last_idx``); an input the graph does not take must be None (``check``)."""

    input_ids: torch.Tensor  # [B, S] int64
    positions: torch.Tensor  # [B, S] int64
    slots: torch.Tensor  # [B] int64
    mask: torch.Tensor  # [B, S, K] bool
    last_idx: torch.Tensor | None = None  # [B] int64 (every graph but the verify graph)
    suppress_ids: torch.Tensor | None = None  # [B, M] int64 (every graph)
    params: torch.Tensor | None = None  # [B, P] float32
    uniforms: torch.Tensor | None = None  # [B] float32
    num_drafts: torch.Tensor | None = None  # [B] int64
    draws: torch.Tensor | None = None  # [B, S] float32
    draft_ids: torch.Tensor | None = None  # [B, D, Q] int64
    draft_probs: torch.Tensor | None = None  # [B, D, Q] float32

    def __post_init__(self) -> None:
        """The inputs agree with each other: dtypes, ranks, and every symbol (B, S, ...) one size."""
        sizes: dict[str, tuple[int, str]] = {}
        for name, t in self.present().items():
            d = INPUTS[name]
            if t.dtype != d.dtype or t.dim() != len(d.dims):
                raise StepIOError(
                    f"{name} must be {d.describe()}, got {list(t.shape)} {str(t.dtype).removeprefix('torch.')}"
                )
            for sym, n in zip(d.dims, t.shape, strict=True):
                seen = sizes.setdefault(sym, (n, name))
                if seen[0] != n:
                    raise StepIOError(f"{sym} is {seen[0]} in {seen[1]} but {n} in {name}")

    def present(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def check(self, spec: GraphSpec) -> None:
        """The inputs are exactly what graph ``spec`` takes, at its shapes."""
        takes = spec.input_names()
        for name in INPUTS:
            t = getattr(self, name)
            if name not in takes:
                if t is not None:
                    raise StepIOError(f"graph {spec.name} takes no {name}")
                continue
            if t is None:
                raise StepIOError(f"graph {spec.name} needs {name}")
            want = INPUTS[name].shape(spec.dims())
            if tuple(t.shape) != want:
                raise StepIOError(
                    f"graph {spec.name}: {name} has shape {list(t.shape)}, expected {list(want)} "
                    f"{INPUTS[name].describe()}"
                )

    def args(self, spec: GraphSpec) -> tuple[torch.Tensor, ...]:
        """The graph's positional arguments, in ``spec.input_names()`` order (checked)."""
        self.check(spec)
        return tuple(getattr(self, name) for name in spec.input_names())

    @classmethod
    def from_args(cls, spec: GraphSpec, args: Sequence[torch.Tensor]) -> StepInputs:
        names = spec.input_names()
        if len(args) != len(names):
            raise StepIOError(f"graph {spec.name} takes {len(names)} inputs {names}, got {len(args)}")
        return cls(**dict(zip(names, args, strict=True)))


@dataclass(frozen=True)
class StepOutputs:
    """What a step graph returned, by name; an output the graph does not produce is None (the
    greedy graph returns tokens only; logits only with ``RuntimeConfig.return_logits``). The verify
    graph's are per window position: tokens [B, S], logprob [B, S], top_* [B, S, n], logits
    [B, S, V], with ``num_accepted``."""

    tokens: torch.Tensor  # [B] int64 global ids ([B, S] from the verify graph, -1 after the output)
    logprob: torch.Tensor | None = None  # [B] float32, the chosen token's raw logprob
    top_ids: torch.Tensor | None = None  # [B, n] int64
    top_logprobs: torch.Tensor | None = None  # [B, n] float32
    num_accepted: torch.Tensor | None = None  # [B] int64 accepted drafts (verify graph)
    cand_ids: torch.Tensor | None = None  # [B, C] the distribution sampled from (return_candidates)
    cand_probs: torch.Tensor | None = None  # [B, C]
    logits: torch.Tensor | None = None  # [B, V] the full (gathered, unpadded) vocab

    def __post_init__(self) -> None:
        rows = self.tokens.shape[0]
        for f in fields(self):
            t = getattr(self, f.name)
            if t is not None and (t.dim() == 0 or t.shape[0] != rows):
                raise StepIOError(f"output {f.name} has shape {list(t.shape)}: not {rows} rows")

    @classmethod
    def from_graph(cls, names: Sequence[str], outputs: Sequence[torch.Tensor]) -> StepOutputs:
        if len(outputs) != len(names):
            raise StepIOError(f"the graph returned {len(outputs)} outputs, expected {tuple(names)}")
        return cls(**dict(zip(names, outputs, strict=True)))
