"""Backends: how a step graph is run.

* ``cpu``: eager PyTorch, or ``torch.compile`` per static shape (``compile=True``; slow to build here).
* ``cuda``: the same graphs on ``device="cuda"`` (UNVERIFIED: no GPU on the development machines).
* ``neuron``: import-guarded stub. The target is TorchNeuron (torch-neuronx 2.13.3.x, ``torch.compile(
  backend="neuron")``); the backend itself is not written yet (issue 16). NxD is not a target.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from exec_service.runtime.graphs import StepGraph

GraphFn = Callable[..., tuple[torch.Tensor, ...]]


# Every step graph is one more compiled entry of the same code object (StepGraph.forward, guarded on
# the graph's spec): Dynamo's default limit of 8 entries per code object would refuse the 9th graph
# of a serving shape ("recompile limit exceeded"); a default shape has dozens.
MAX_GRAPHS_PER_PROCESS = 4096


def _allow_many_graphs() -> None:
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, MAX_GRAPHS_PER_PROCESS)
    dynamo_config.accumulated_recompile_limit = max(
        dynamo_config.accumulated_recompile_limit, MAX_GRAPHS_PER_PROCESS
    )


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine."""


class CpuBackend:
    name = "cpu"

    def __init__(self, compile: bool = False) -> None:
        self.compile = compile
        self.device = torch.device("cpu")

    def prepare(self, graph: StepGraph) -> GraphFn:
        """The graph compiled (``compile``: one ``torch.compile`` per static shape, built at its
        first call or found in the compiler caches a graph set filled), else the graph itself."""
        if not self.compile:
            return graph
        _allow_many_graphs()
        return torch.compile(graph, fullgraph=True, dynamic=False)


class CudaBackend(CpuBackend):
    """UNVERIFIED: same code on a CUDA device; tp > 1 would use nccl."""

    name = "cuda"

    def __init__(self, compile: bool = False) -> None:
        if not torch.cuda.is_available():
            raise BackendUnavailable("backend 'cuda' needs a CUDA device and a CUDA build of torch")
        super().__init__(compile)
        self.device = torch.device("cuda")


class NeuronBackend:
    name = "neuron"

    def __init__(self, compile: bool = True) -> None:
        try:
            __import__("torch_neuronx")
        except ImportError:
            raise BackendUnavailable(
                "backend 'neuron' needs the Neuron SDK (TorchNeuron): cannot import torch_neuronx "
                "(install torch-neuronx 2.13.3.x from AWS's Neuron index on a Trainium/Inferentia host)"
            ) from None
        raise NotImplementedError("backend 'neuron': the TorchNeuron backend is not implemented yet")


BACKENDS = {"cpu": CpuBackend, "cuda": CudaBackend, "neuron": NeuronBackend}


def get_backend(name: str, compile: bool = False) -> CpuBackend | NeuronBackend:
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r} (have {', '.join(BACKENDS)})") from None
    return cls(compile)
