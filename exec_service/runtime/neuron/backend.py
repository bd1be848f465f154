"""``NeuronBackend``: the step graphs on TorchNeuron (torch-neuronx 2.13.3.x, torch 2.13.0).

* each graph spec is one ``torch.compile(graph, backend="neuron", fullgraph=True, dynamic=False)``
  (one NEFF per static shape; ``dynamic=True`` is rejected by the backend, ``fullgraph`` makes a
  graph break an error instead of a silent split);
* the model, the KV cache and the token counts live on the ``neuron`` device (the runner moves
  them there); step inputs are moved per step by ``place``, after ``check_int32``: TorchNeuron keeps
  int64 tensors as int32 on the device, so every id, position and slot must fit in int32;
* every graph is compiled (or loaded from the NEFF cache a graph set restored) and run once when the
  runner starts (``warm_up_at_start``); then ``torch.compiler.set_stance("fail_on_recompile")``:
  a step that would compile while serving fails instead;
* tensor parallelism: one process per NeuronCore (``sdk.NeuronEnv.for_rank`` sets its
  ``NEURON_RT_VISIBLE_CORES`` before torch is imported), the ``"neuron"`` process group initialised
  before any neuron tensor exists (``init_rank_groups``) and registered under the collectives'
  group name, so the functional collectives compiled into the graphs run on it; the step inputs are
  broadcast outside the graphs, host tensors over a gloo group.

Only ``NeuronBackend.__init__``, ``prepare``, ``place`` and ``init_rank_groups`` touch the SDK; the
rest (environment, int32 check, graph-set key fields) is plain code, tested without hardware.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from exec_service.model.collectives import GROUP_NAME
from exec_service.runtime.backends import allow_many_graphs
from exec_service.runtime.graphs import StepGraph
from exec_service.runtime.neuron import sdk
from exec_service.runtime.step_io import StepIOError

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
DEVICE = "neuron"  # the PrivateUse1 device TorchNeuron registers
HOST_GROUP = "neuron-serve-host"  # gloo, for the host-side broadcast of step inputs


def check_int32(args: Sequence[torch.Tensor], names: Sequence[str] | None = None) -> None:
    """Every int64 step input fits in int32 (the device narrows int64 to int32: a larger id would
    wrap silently). Raises ``StepIOError`` naming the input."""
    for i, t in enumerate(args):
        if t.dtype != torch.int64 or t.numel() == 0:
            continue
        lo, hi = int(t.min()), int(t.max())
        if lo < INT32_MIN or hi > INT32_MAX:
            name = names[i] if names is not None else f"input {i}"
            raise StepIOError(f"{name}: values {lo}..{hi} do not fit int32 on the neuron device")


def compile_graph(graph: StepGraph):
    """One static-shape compile of ``graph`` with TorchNeuron (built at its first call)."""
    allow_many_graphs()
    return torch.compile(graph, backend="neuron", fullgraph=True, dynamic=False)


class NeuronBackend:
    name = "neuron"
    warm_up_at_start = True
    compiles_every_graph = True  # op-by-op eager on the device is not a serving path

    def __init__(self, compile: bool = True) -> None:
        # ``compile`` is accepted for the common signature: on Neuron every graph is compiled
        sdk.require_sdk()  # BackendUnavailable naming the SDK
        self.device = torch.device(DEVICE)

    def prepare(self, graph: StepGraph):
        return compile_graph(graph)

    def place(self, args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        check_int32(args)
        return tuple(t.to(self.device) for t in args)

    def serving(self) -> None:
        torch.compiler.set_stance("fail_on_recompile")


def init_rank_groups(store, rank: int, tp: int):
    """This rank's groups, before any neuron tensor exists: the ``"neuron"`` process group (the
    default group of the process, also registered as ``GROUP_NAME`` for the functional collectives
    inside graphs) and the gloo group the host broadcasts step inputs on. Returns (graph, host)."""
    import torch.distributed as dist

    from exec_service.runtime.executor import gloo_group

    sdk.require_sdk()  # importing torch_neuronx registers the device and the "neuron" backend
    dist.init_process_group("neuron", store=dist.PrefixStore("neuron", store), rank=rank, world_size=tp)
    graph_group = dist.group.WORLD
    c10d = torch._C._distributed_c10d
    with contextlib.suppress(RuntimeError, ValueError):
        c10d._unregister_process_group(GROUP_NAME)
    c10d._register_process_group(GROUP_NAME, graph_group)
    host_group, _ = gloo_group(
        0, rank, tp, is_master=rank == 0, store=dist.PrefixStore("host", store), name=HOST_GROUP
    )
    return graph_group, host_group
