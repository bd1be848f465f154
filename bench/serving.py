"""c) Serving: 1, 8 and 32 concurrent gRPC streams through exec-server (SmolLM2-135M fp32, greedy,
P-token prompts, N new tokens, EOS masked): aggregate tokens/s, TTFT p50/p99, inter-token latency
p50/p99 -- against the same engine driven directly (same closed loop: at most C requests in flight),
and the gRPC cost per token (the same server over a no-op engine that emits a token per running
request per step without computing anything).

    .venv/bin/python -m bench.serving [--streams 1,8,32] [--new 64] [--requests-per-stream 2]

The server runs in a child process (its own GIL; the client is this process). Both share the 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time

from bench.common import prompt_ids, record, smollm2_manifest, table

MAX_BATCH = 8


def _rc(max_batch: int, prompt: int, new: int):
    from exec_service.engine import RuntimeConfig

    return RuntimeConfig(max_batch_size=max_batch, max_seq_len=_seq(prompt, new), context_buckets=(prompt,))


def _seq(prompt: int, new: int) -> int:
    return -(-(prompt + new) // prompt) * prompt  # a multiple of the context bucket


class NoopEngine:
    """The Engine surface the server's loop uses; a step costs nothing but the bookkeeping."""

    def __init__(self, config, eos_token_ids=(2,), vocab_size=49152) -> None:
        from exec_service.engine.limits import EngineLimits

        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.limits = EngineLimits(
            config.max_seq_len,
            vocab_size,
            config.num_top_logprobs,
            config.max_suppressed_ids,
            self.eos_token_ids,
        )
        self._waiting: list = []
        self._running: dict = {}
        self._aborted: set = set()
        self._n = 0

    def add_request(self, request) -> str:
        self._n += 1
        rid = request.request_id or f"noop-{self._n}"
        self._waiting.append([rid, request, 0])
        return rid

    def abort(self, rid: str) -> bool:
        self._aborted.add(rid)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._aborted)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def free_slots(self) -> int:
        return self.config.max_batch_size - len(self._running)

    def step(self):
        from exec_service.engine import FinishReason, RequestOutput

        outs = []
        for rid in self._aborted:
            self._running.pop(rid, None)
            self._waiting = [w for w in self._waiting if w[0] != rid]
        self._aborted.clear()
        while self._waiting and len(self._running) < self.config.max_batch_size:
            w = self._waiting.pop(0)
            self._running[w[0]] = w
        for rid, w in list(self._running.items()):
            req = w[1]
            w[2] += 1
            done = w[2] >= (req.stopping.max_new_tokens or 16)
            outs.append(
                RequestOutput(
                    rid,
                    (1000 + w[2] % 100,),
                    None,
                    FinishReason.LENGTH if done else None,
                    len(req.prompt_token_ids),
                    w[2],
                    0,
                )
            )
            if done:
                del self._running[rid]
        return outs

    def generate(self, requests):
        ids = [self.add_request(r) for r in requests]
        while self.has_unfinished():
            self.step()
        return dict.fromkeys(ids)

    def close(self) -> None:
        pass


def _serve(uri: str, noop: bool, prompt: int, new: int, conn) -> None:
    from exec_service.artifact import open_artifact
    from exec_service.engine import Engine
    from exec_service.server import ExecServer, ServeConfig

    async def main() -> None:
        art = open_artifact(uri)
        rc = _rc(MAX_BATCH, prompt, new)
        eng = NoopEngine(rc, art.eos_token_ids) if noop else Engine(art, rc, eos_token_ids=art.eos_token_ids)
        cfg = ServeConfig(
            manifest_uri=uri,
            max_batch_size=MAX_BATCH,
            max_seq_len=_seq(prompt, new),
            context_buckets=(prompt,),
        )
        server = ExecServer(cfg, engine=eng, artifact=art)
        port = await server.start()
        conn.send(port)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
        await server.stop(0)

    asyncio.run(main())


async def _stream(stub, pb, prompt: list[int], new: int, res: dict) -> None:
    req = pb.GenerateRequest(
        prompt_token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(temperature=0.0),
        stopping=pb.StoppingCriteria(max_new_tokens=new, min_new_tokens=new),
    )
    t0 = time.perf_counter()
    last, n = None, 0
    async for msg in stub.Generate(req):
        k = len(msg.token_ids)
        if not k:
            continue
        now = time.perf_counter()
        if last is None:
            res["ttft"].append(now - t0)
        else:
            res["itl"] += [(now - last) / k] * k
        last, n = now, n + k
    res["tokens"] += n


async def _client(port: int, streams: int, per_stream: int, prompt: int, new: int) -> dict:
    import grpc

    from protos import exec_pb2 as pb
    from protos import exec_pb2_grpc

    res = {"ttft": [], "itl": [], "tokens": 0}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = exec_pb2_grpc.ExecServiceStub(ch)
        await _stream(stub, pb, prompt_ids(prompt, 7), 4, {"ttft": [], "itl": [], "tokens": 0})  # warm

        async def one(i: int) -> None:
            for j in range(per_stream):
                await _stream(stub, pb, prompt_ids(prompt, 100 * i + j), new, res)

        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(streams)))
        res["wall"] = time.perf_counter() - t
    return res


def _direct(engine, streams: int, per_stream: int, prompt: int, new: int) -> dict:
    """The same closed loop without gRPC: at most ``streams`` requests in flight."""
    from exec_service.engine import Request, SamplingParams, StoppingCriteria

    stop = StoppingCriteria(max_new_tokens=new, min_new_tokens=new)
    todo = [(i, j) for j in range(per_stream) for i in range(streams)]
    res = {"ttft": [], "itl": [], "tokens": 0}
    sent, last = {}, {}
    t = time.perf_counter()

    def submit() -> None:
        i, j = todo.pop(0)
        rid = engine.add_request(Request(tuple(prompt_ids(prompt, 100 * i + j)), SamplingParams(), stop))
        sent[rid] = time.perf_counter()

    for _ in range(min(streams, len(todo))):
        submit()
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            k = len(o.new_token_ids)
            if k:
                if o.request_id not in last:
                    res["ttft"].append(now - sent[o.request_id])
                else:
                    res["itl"] += [(now - last[o.request_id]) / k] * k
                last[o.request_id] = now
                res["tokens"] += k
            if o.finished and todo:
                submit()
    res["wall"] = time.perf_counter() - t
    return res


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _row(kind: str, streams: int, r: dict) -> dict:
    return {
        "path": kind,
        "streams": streams,
        "tok_s": r["tokens"] / r["wall"],
        "ttft_p50_ms": 1e3 * _pct(r["ttft"], 0.5),
        "ttft_p99_ms": 1e3 * _pct(r["ttft"], 0.99),
        "itl_p50_ms": 1e3 * _pct(r["itl"], 0.5),
        "itl_p99_ms": 1e3 * _pct(r["itl"], 0.99),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--requests-per-stream", type=int, default=2)
    args = ap.parse_args()
    uri = smollm2_manifest("float32")
    streams = [int(x) for x in args.streams.split(",")]
    ctx = mp.get_context("spawn")
    rows = []

    def served(noop: bool) -> list[dict]:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_serve, args=(uri, noop, args.prompt, args.new, child), daemon=True)
        p.start()
        if not parent.poll(600):
            p.terminate()
            raise RuntimeError("the server did not start")
        port = parent.recv()
        out = []
        try:
            for c in streams:
                r = asyncio.run(_client(port, c, args.requests_per_stream, args.prompt, args.new))
                out.append(_row("grpc-noop" if noop else "grpc", c, r))
                print(table([out[-1]]), flush=True)
        finally:
            parent.send("stop")
            p.join(30)
            if p.is_alive():
                p.terminate()
        return out

    rows += served(noop=False)
    from exec_service.engine import Engine

    with Engine.from_manifest(uri, _rc(MAX_BATCH, args.prompt, args.new)) as eng:
        _direct(eng, 1, 1, args.prompt, 4)
        for c in streams:
            rows.append(_row("direct", c, _direct(eng, c, args.requests_per_stream, args.prompt, args.new)))
            print(table([rows[-1]]), flush=True)
    rows += served(noop=True)
    by = {(r["path"], r["streams"]): r for r in rows}
    summary = []
    for c in streams:
        g, d, n = by[("grpc", c)], by[("direct", c)], by[("grpc-noop", c)]
        summary.append(
            {
                "streams": c,
                "grpc_tok_s": g["tok_s"],
                "direct_tok_s": d["tok_s"],
                "grpc_over_direct": g["tok_s"] / d["tok_s"],
                "noop_grpc_tok_s": n["tok_s"],
                "grpc_us_per_token": 1e6 / n["tok_s"],
            }
        )
    print(table(rows))
    print(table(summary))
    print(
        f"appended to {record('serving', rows, {'summary': summary, 'args': vars(args), 'max_batch': MAX_BATCH})}"
    )


if __name__ == "__main__":
    main()
