"""Trace the rank graphs of tp > 1 in one process: a fake process group of ``tp`` ranks registered
under the collectives' group name (``model.collectives.GROUP_NAME``) while a rank's graphs are
captured.

This is faithful for capture and lowering: every rank runs the same program (DESIGN §5: the rank is
a tensor, so rank-dependent values are data, not code), the graph only records each functional
collective with its group *name* and the group's size (all-gather's output shape), and nothing is
communicated while tracing. It is not an execution: a fake group's collectives return garbage, so a
graph run under it computes nothing meaningful at tp > 1 (tp = 1 has no collectives).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def rank_group(rank: int, tp: int, name: str | None = None) -> Iterator[object]:
    """A ``torch.distributed.ProcessGroup`` of ``tp`` fake ranks, this process being ``rank``,
    registered as ``name`` (default ``GROUP_NAME``) for the block; a group registered under that
    name before is registered again afterwards."""
    import torch
    import torch.distributed as dist
    from torch._C._distributed_c10d import FakeProcessGroup

    from exec_service.model.collectives import GROUP_NAME

    name = name or GROUP_NAME
    c10d = torch._C._distributed_c10d
    try:
        previous = c10d._resolve_process_group(name)
    except (RuntimeError, ValueError):
        previous = None
    store = dist.HashStore()
    backend = FakeProcessGroup._create_internal(rank, tp, FakeProcessGroup.Options())
    group = dist.ProcessGroup(store, rank, tp)
    group._set_default_backend(dist.ProcessGroup.BackendType.CUSTOM)
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.CUSTOM, backend)
    group._set_group_name(name)
    with contextlib.suppress(Exception):
        c10d._unregister_process_group(name)
    c10d._register_process_group(name, group)
    try:
        yield group
    finally:
        with contextlib.suppress(Exception):
            c10d._unregister_process_group(name)
        if previous is not None:
            c10d._register_process_group(name, previous)
