"""Collectives used by the parallel layers and the sampler.

At tp == 1 every operation is the identity (and the graphs stay exportable); at tp > 1 they run over
a torch.distributed process group (gloo on cpu, nccl on cuda, the ``"neuron"`` group on Neuron). Graph code never asks for the rank:
rank-dependent values come from the model's ``rank`` tensor (DESIGN §5).

Inside ``torch.compile`` the reductions are ``torch.distributed._functional_collectives`` (the only
collectives Dynamo traces into a graph; TorchNeuron needs them too), addressed by the group's
registered *name*. The name is part of the compiled code, so it is one constant (``GROUP_NAME``) on
every rank and in every process: a graph set compiled by one process serves any other.
"""

from __future__ import annotations

import torch

GROUP_NAME = "neuron-serve-tp"


class Collectives:
    """All-reduce / all-gather over ``group`` (a ``torch.distributed.ProcessGroup``) of ``tp`` ranks."""

    def __init__(self, tp: int = 1, group: object | None = None) -> None:
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        self.tp = tp
        self.group = group  # may be bound later (``bind``): layers hold this object, not the group
        self.group_name = GROUP_NAME  # the group's registered name (functional collectives)
        self.host_group: object | None = None  # broadcasts of host tensors, when not ``group``

    def bind(self, group: object, name: str = GROUP_NAME, host_group: object | None = None) -> None:
        """``host_group``: where ``broadcast`` runs when ``group`` cannot carry host tensors (the
        neuron group moves device tensors; step inputs are broadcast over gloo)."""
        self.group, self.group_name, self.host_group = group, name, host_group

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Elementwise sum (or max) over ranks; returns a new tensor."""
        if self.tp == 1:
            return x
        if torch.compiler.is_compiling():
            import torch.distributed._functional_collectives as funcol

            return funcol.all_reduce(x, op, self.group_name)
        import torch.distributed as dist

        out = x.contiguous().clone()
        opts = dist.AllreduceOptions()
        opts.reduceOp = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        self.group.allreduce([out], opts).wait()
        return out

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenation of every rank's ``x`` along ``dim``, in rank order."""
        if self.tp == 1:
            return x
        x = x.contiguous()
        if torch.compiler.is_compiling():
            import torch.distributed._functional_collectives as funcol

            return funcol.all_gather_tensor(x, dim % x.dim(), self.group_name)
        outs = [torch.empty_like(x) for _ in range(self.tp)]
        self.group.allgather([outs], [x]).wait()
        return torch.cat(outs, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place: every rank's ``x`` becomes rank ``src``'s (host-side step inputs, not graphs)."""
        if self.tp == 1:
            return x
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = src
        (self.host_group or self.group).broadcast([x], opts).wait()
        return x


SINGLE = Collectives(1)
