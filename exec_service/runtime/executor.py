"""Executors run a step graph on every rank.

* ``LocalExecutor``: tp = 1, one ``Runner`` in this process.
* ``TPExecutor``: tp > 1 on cpu (gloo on 127.0.0.1) — this process is rank 0 and drives: for each
  step it broadcasts a header (graph kind and shape) and the packed inputs; worker processes
  (``torch.multiprocessing`` spawn, ranks 1..tp-1) receive them and run the same graph, so every
  rank meets the same collectives. Workers load their own shard (the source is picklable), exit on a
  shutdown header, and also exit by themselves if this process disappears (no orphans).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import traceback
import weakref
from datetime import timedelta

import torch

from exec_service.model.collectives import Collectives
from exec_service.model.loading import ShardSource
from exec_service.runtime.graphs import CONTEXT, DECODE, GraphSpec, make_mask
from exec_service.runtime.runner import Runner, RuntimeConfig
from exec_service.runtime.sampling import NUM_PARAMS

_KINDS = (CONTEXT, DECODE)
_OP_STOP, _OP_RUN = 0, 1
_GLOO_TIMEOUT = timedelta(seconds=120)


class LocalExecutor:
    def __init__(self, source: ShardSource, config: RuntimeConfig) -> None:
        self.tp = 1
        self.runner = Runner(source.arch, source.target, source.load(0), config)

    def run(self, spec: GraphSpec, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return self.runner.run(spec, inputs)

    def close(self) -> None:
        pass


def _pack(spec: GraphSpec, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, pos, slots, _mask, last, params, uni, sup = inputs  # the mask is rebuilt from positions
    ints = torch.cat([t.reshape(-1).to(torch.int64) for t in (ids, pos, slots, last, sup)])
    floats = torch.cat([params.reshape(-1), uni.reshape(-1)]).to(torch.float32)
    return ints.contiguous(), floats.contiguous()


def _buffers(spec: GraphSpec) -> tuple[torch.Tensor, torch.Tensor]:
    b, s, m = spec.batch, spec.seq, spec.suppress
    return torch.zeros(2 * b * s + 2 * b + b * m, dtype=torch.int64), torch.zeros(b * NUM_PARAMS + b)


def _unpack(spec: GraphSpec, ints: torch.Tensor, floats: torch.Tensor) -> tuple[torch.Tensor, ...]:
    b, s, m = spec.batch, spec.seq, spec.suppress
    ids, pos, slots, last, sup = ints.split([b * s, b * s, b, b, b * m])
    params, uni = floats.split([b * NUM_PARAMS, b])
    pos = pos.view(b, s)
    mask = make_mask(pos, spec.kv_len)
    return ids.view(b, s), pos, slots, mask, last, params.view(b, NUM_PARAMS), uni, sup.view(b, m)


def _header(op: int, spec: GraphSpec | None = None) -> torch.Tensor:
    if spec is None:
        return torch.tensor([op, 0, 0, 0, 0, 0], dtype=torch.int64)
    kind = _KINDS.index(spec.kind)
    return torch.tensor([op, kind, spec.batch, spec.seq, spec.kv_len, spec.suppress], dtype=torch.int64)


def _gloo_group(
    port: int, rank: int, tp: int, is_master: bool, store: object | None = None
) -> tuple[object, object]:
    import torch.distributed as dist

    if store is None:
        store = dist.TCPStore("127.0.0.1", port, tp, is_master=is_master, timeout=_GLOO_TIMEOUT)
    return dist.ProcessGroupGloo(store, rank, tp, _GLOO_TIMEOUT), store


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
    try:
        runner = Runner(source.arch, source.target, source.load(rank), config, comm, rank)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", ""))
    group, _store = _gloo_group(port, rank, tp, is_master=False)
    comm.bind(group)
    while True:
        header = comm.broadcast(_header(_OP_STOP))
        if int(header[0]) != _OP_RUN:
            break
        kind, b, s, k, m = (int(x) for x in header[1:])
        spec = GraphSpec(_KINDS[kind], b, s, k, m)
        ints, floats = _buffers(spec)
        comm.broadcast(ints)
        comm.broadcast(floats)
        runner.run(spec, _unpack(spec, ints, floats))


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
        if config.backend != "cpu":
            raise NotImplementedError(
                f"tensor parallelism on backend {config.backend!r} is not implemented here"
            )
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
                p.start()
                child.close()
                self._procs.append(p)
                conns.append(parent)
            torch.set_num_threads(threads)
            comm = Collectives(tp)
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
            group, self._store = _gloo_group(port, 0, tp, is_master=True, store=store)
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

    def run(self, spec: GraphSpec, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if not self._alive[0]:
            raise RuntimeError("the TP executor is closed")
        assert self._comm is not None
        ints, floats = _pack(spec, inputs)
        self._comm.broadcast(_header(_OP_RUN, spec))
        self._comm.broadcast(ints)
        self._comm.broadcast(floats)
        return self.runner.run(spec, inputs)

    def close(self) -> None:
        self._finalizer()
        torch.set_num_threads(self._saved_threads)
