"""Executors run a step graph on every rank.

* ``LocalExecutor``: tp = 1, one ``Runner`` in this process.
* ``TPExecutor``: tp > 1 on cpu (gloo on 127.0.0.1) or neuron (the ``"neuron"`` process group for
  the graphs' collectives, gloo for the broadcast; each worker started with its own NeuronCore in
  ``NEURON_RT_VISIBLE_CORES``) — this process is rank 0 and drives: for each
  step it broadcasts a header (the op and the whole ``GraphSpec``, every field, so every graph
  variant — e.g. greedy — is carried) and then the step inputs the spec names, packed as one byte
  buffer in ``spec.input_names()`` order; worker processes (``torch.multiprocessing`` spawn, ranks
  1..tp-1) rebuild the spec and the ``StepInputs`` from them and run the same graph, so every rank
  meets the same collectives. Workers load their own shard (the source is picklable), exit on a
  shutdown header, and also exit by themselves if this process disappears (no orphans).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
import time
import traceback
import weakref
from datetime import timedelta

import torch

from exec_service.model.collectives import GROUP_NAME, Collectives
from exec_service.model.loading import ShardSource
from exec_service.runtime.graphs import KINDS, GraphSpec
from exec_service.runtime.runner import Runner, RuntimeConfig
from exec_service.runtime.step_io import INPUTS, StepInputs, StepOutputs

_OP_STOP, _OP_RUN = 0, 1
_GLOO_TIMEOUT = timedelta(seconds=120)


class LocalExecutor:
    def __init__(self, source: ShardSource, config: RuntimeConfig) -> None:
        self.tp = 1
        self.runner = Runner(source.arch, source.target, source.load(0), config)

    def run(self, spec: GraphSpec, inputs: StepInputs) -> StepOutputs:
        return self.runner.run(spec, inputs)

    def close(self) -> None:
        pass


# -- the step header: [op, *every GraphSpec field as an int] (kind: its index in KINDS) -----------
_SPEC_FIELDS = dataclasses.fields(GraphSpec)
if any(f.name != "kind" and f.type not in ("int", "bool") for f in _SPEC_FIELDS):
    raise TypeError("the TP step header carries GraphSpec's kind and int / bool fields only")


def _header(op: int, spec: GraphSpec | None = None) -> torch.Tensor:
    if spec is None:
        return torch.tensor([op] + [0] * len(_SPEC_FIELDS), dtype=torch.int64)
    values = [
        KINDS.index(spec.kind) if f.name == "kind" else int(getattr(spec, f.name)) for f in _SPEC_FIELDS
    ]
    return torch.tensor([op, *values], dtype=torch.int64)


def _spec_of(header: torch.Tensor) -> GraphSpec:
    def value(f: dataclasses.Field, v: int) -> object:
        return KINDS[v] if f.name == "kind" else bool(v) if f.type == "bool" else v

    values = header[1:].tolist()
    return GraphSpec(**{f.name: value(f, v) for f, v in zip(_SPEC_FIELDS, values, strict=True)})


# -- the step inputs: the spec's inputs, in its order, as one byte buffer ------------------------
def _sizes(spec: GraphSpec) -> list[int]:
    dims = spec.dims()
    return [math.prod(INPUTS[n].shape(dims)) * INPUTS[n].dtype.itemsize for n in spec.input_names()]


def _pack(spec: GraphSpec, inputs: StepInputs) -> torch.Tensor:
    """Checked (``StepInputs.args``) before anything is broadcast: a bad input never strands the
    workers half-way through a step."""
    parts = [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for t in inputs.args(spec)]
    return torch.cat(parts)


def _unpack(spec: GraphSpec, payload: torch.Tensor) -> StepInputs:
    dims = spec.dims()
    names = spec.input_names()
    # clone: each piece gets its own (aligned) storage before it is viewed as its dtype
    parts = payload.split(_sizes(spec))
    args = [
        p.clone().view(INPUTS[n].dtype).view(INPUTS[n].shape(dims)) for n, p in zip(names, parts, strict=True)
    ]
    return StepInputs.from_args(spec, args)


def gloo_group(
    port: int,
    rank: int,
    tp: int,
    is_master: bool,
    store: object | None = None,
    name: str = GROUP_NAME,
) -> tuple[object, object]:
    """A gloo process group registered under ``name`` in this process (compiled graphs'
    functional collectives find ``GROUP_NAME`` by that name); a previous registration is replaced."""
    import torch.distributed as dist

    if store is None:
        store = dist.TCPStore("127.0.0.1", port, tp, is_master=is_master, timeout=_GLOO_TIMEOUT)
    backend = dist.ProcessGroupGloo(store, rank, tp, _GLOO_TIMEOUT)
    group = dist.ProcessGroup(store, rank, tp)
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
    group._set_group_name(name)
    with contextlib.suppress(Exception):
        torch._C._distributed_c10d._unregister_process_group(name)
    torch._C._distributed_c10d._register_process_group(name, group)
    return group, store


def _neuron_groups(port: int, rank: int, tp: int, comm: Collectives, store: object | None = None) -> object:
    """neuron: the process groups come first (the ``"neuron"`` group must exist before any neuron
    tensor, i.e. before the runner loads the shard); ``comm`` runs the graphs' collectives on it and
    broadcasts step inputs on a gloo group."""
    import torch.distributed as dist

    from exec_service.runtime.neuron.backend import init_rank_groups

    if store is None:
        store = dist.TCPStore("127.0.0.1", port, tp, is_master=False, timeout=_GLOO_TIMEOUT)
    graph_group, host_group = init_rank_groups(store, rank, tp)
    comm.bind(graph_group, host_group=host_group)
    return store


def _rank_environment(rank: int, tp: int) -> dict[str, str]:
    from exec_service.runtime.neuron import sdk

    return sdk.from_environ().for_rank(rank, tp, sdk.container_cores())


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """``env`` set in ``os.environ`` for the block (a spawned child copies it at start)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)  # the driver is gone: never linger as an orphan
        time.sleep(0.5)


def _worker_main(
    rank: int,
    tp: int,
    port: int,
    source: ShardSource,
    config: RuntimeConfig,
    conn,
    parent_pid: int,
    threads: int,
) -> None:
    torch.set_num_threads(threads)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    comm = Collectives(tp)
    neuron = config.backend == "neuron"
    try:
        if neuron:  # groups first; the runner warms every graph up, meeting rank 0's collectives
            _store = _neuron_groups(port, rank, tp, comm)
        runner = Runner(source.arch, source.target, source.load(rank), config, comm, rank)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", ""))
    if not neuron:
        group, _store = gloo_group(port, rank, tp, is_master=False)
        comm.bind(group)
    while True:
        header = comm.broadcast(_header(_OP_STOP))
        if int(header[0]) != _OP_RUN:
            break
        spec = _spec_of(header)
        payload = comm.broadcast(torch.empty(sum(_sizes(spec)), dtype=torch.uint8))
        runner.run(spec, _unpack(spec, payload))


def _shutdown(procs: list, comm: Collectives | None, alive: list[bool]) -> None:
    told = False
    if alive[0] and comm is not None and comm.group is not None:
        with contextlib.suppress(Exception):
            comm.broadcast(_header(_OP_STOP))
            told = True
    alive[0] = False
    for p in procs:
        p.join(timeout=10 if told else 0)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


class TPExecutor:
    def __init__(self, source: ShardSource, config: RuntimeConfig, start_timeout_s: float = 300.0) -> None:
        import torch.distributed as dist
        import torch.multiprocessing as mp

        tp = source.target.tp_degree
        if tp < 2:
            raise ValueError("TPExecutor needs tp >= 2")
        if config.backend not in ("cpu", "neuron"):
            raise NotImplementedError(
                f"tensor parallelism on backend {config.backend!r} is not implemented here"
            )
        neuron = config.backend == "neuron"
        self.tp = tp
        self._saved_threads = torch.get_num_threads()
        threads = max(1, (os.cpu_count() or 1) // tp)
        store = dist.TCPStore(
            "127.0.0.1", 0, tp, is_master=True, timeout=_GLOO_TIMEOUT, wait_for_workers=False
        )
        port = store.port
        ctx = mp.get_context("spawn")
        self._procs: list = []
        self._alive = [True]
        self._comm: Collectives | None = None
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, None, self._alive)
        try:
            conns = []
            for rank in range(1, tp):
                parent, child = ctx.Pipe()
                p = ctx.Process(
                    target=_worker_main,
                    args=(rank, tp, port, source, config, child, os.getpid(), threads),
                    daemon=True,
                    name=f"neuron-serve-tp-rank{rank}",
                )
                # neuron: the child's own NeuronCore, set before it first imports torch
                with _environment(_rank_environment(rank, tp) if neuron else {}):
                    p.start()
                child.close()
                self._procs.append(p)
                conns.append(parent)
            torch.set_num_threads(threads)
            comm = Collectives(tp)
            if neuron:
                _neuron_groups(port, 0, tp, comm, store)
            self.runner = Runner(source.arch, source.target, source.load(0), config, comm)
            deadline = time.monotonic() + start_timeout_s
            for rank, (p, conn) in enumerate(zip(self._procs, conns, strict=True), start=1):
                while not conn.poll(0.2):
                    if not p.is_alive():
                        raise RuntimeError(
                            f"TP worker rank {rank} exited with code {p.exitcode} while loading"
                        )
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"TP worker rank {rank} did not load within {start_timeout_s:.0f} s"
                        )
                status, detail = conn.recv()
                if status != "ok":
                    raise RuntimeError(f"TP worker rank {rank} failed to load:\n{detail}")
            self._store = store
            if not neuron:
                group, _ = gloo_group(port, 0, tp, is_master=True, store=store)
                comm.bind(group)
            self._comm = comm
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _shutdown, self._procs, comm, self._alive)
        except BaseException:
            self.close()
            raise

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def run(self, spec: GraphSpec, inputs: StepInputs) -> StepOutputs:
        if not self._alive[0]:
            raise RuntimeError("the TP executor is closed")
        assert self._comm is not None
        if spec not in self.runner.graphs:
            raise KeyError(f"no graph {spec.name} in this runtime's graph set")
        payload = _pack(spec, inputs)
        self._comm.broadcast(_header(_OP_RUN, spec))
        self._comm.broadcast(payload)
        return self.runner.run(spec, inputs)

    def close(self) -> None:
        self._finalizer()
        torch.set_num_threads(self._saved_threads)
