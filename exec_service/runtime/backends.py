"""Backends: how a step graph is run (``Backend``).

* ``cpu``: eager PyTorch, or ``torch.compile`` per static shape (``compile=True``; slow to build here).
* ``cuda``: the same graphs on ``device="cuda"`` (UNVERIFIED: no GPU on the development machines).
* ``neuron``: TorchNeuron (torch-neuronx 2.13.3.x): ``torch.compile(backend="neuron", fullgraph=True,
  dynamic=False)`` per graph spec on the ``neuron`` device (``runtime/neuron/backend.py``; imported
  only when asked for: without ``torch_neuronx`` it raises ``BackendUnavailable`` naming the SDK).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from exec_service.runtime.graphs import StepGraph

GraphFn = Callable[..., tuple[torch.Tensor, ...]]


class Backend(Protocol):
    name: str
    device: torch.device
    # every graph is compiled (or loaded) and called once when the runner starts, not at its first
    # step (neuron: no compile may happen while serving)
    warm_up_at_start: bool
    # every graph runs compiled whatever ``RuntimeConfig.compile`` says (neuron: no eager path)
    compiles_every_graph: bool

    def prepare(self, graph: StepGraph) -> GraphFn: ...

    def place(self, args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """A step's inputs (host tensors, ``spec.input_names()`` order) on this backend's device."""
        ...

    def serving(self) -> None:
        """Called once every graph has been warmed up (neuron: recompiling becomes an error)."""
        ...


# Every step graph is one more compiled entry of the same code object (StepGraph.forward, guarded on
# the graph's spec): Dynamo's default limit of 8 entries per code object would refuse the 9th graph
# of a serving shape ("recompile limit exceeded"); a default shape has dozens.
MAX_GRAPHS_PER_PROCESS = 4096


def allow_many_graphs() -> None:
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, MAX_GRAPHS_PER_PROCESS)
    dynamo_config.accumulated_recompile_limit = max(
        dynamo_config.accumulated_recompile_limit, MAX_GRAPHS_PER_PROCESS
    )


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine."""


class CpuBackend:
    name = "cpu"
    warm_up_at_start = False
    compiles_every_graph = False

    def __init__(self, compile: bool = False) -> None:
        self.compile = compile
        self.device = torch.device("cpu")

    def place(self, args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device) for t in args)

    def serving(self) -> None:
        pass

    def prepare(self, graph: StepGraph) -> GraphFn:
        """The graph compiled (``compile``: one ``torch.compile`` per static shape, built at its
        first call or found in the compiler caches a graph set filled), else the graph itself."""
        if not self.compile:
            return graph
        allow_many_graphs()
        return torch.compile(graph, fullgraph=True, dynamic=False)


class CudaBackend(CpuBackend):
    """UNVERIFIED: same code on a CUDA device; tp > 1 would use nccl."""

    name = "cuda"

    def __init__(self, compile: bool = False) -> None:
        if not torch.cuda.is_available():
            raise BackendUnavailable("backend 'cuda' needs a CUDA device and a CUDA build of torch")
        super().__init__(compile)
        self.device = torch.device("cuda")


def _neuron(compile: bool = True) -> Backend:
    from exec_service.runtime.neuron.backend import NeuronBackend  # imports torch_neuronx, guarded

    return NeuronBackend(compile)


BACKENDS: dict[str, Callable[[bool], Backend]] = {"cpu": CpuBackend, "cuda": CudaBackend, "neuron": _neuron}


def get_backend(name: str, compile: bool = False) -> Backend:
    try:
        make = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r} (have {', '.join(BACKENDS)})") from None
    return make(compile)
