"""Acceptance on Neuron hardware: SmolLM2-135M-Instruct on TorchNeuron, for a user with a trn2 host.

    python -m bench.neuron_acceptance [--tp 1,2] [--prompts 4] [--new 32] [--max-batch-size 4]
                                      [--max-seq-len 256] [--context-buckets 64,256]

Needs the Neuron SDK (torch-neuronx 2.13.3.* for torch 2.13.0, docs/NEURON.md) and NeuronCores
(/dev/neuron*); anywhere else it prints ``SKIP: <reason>`` and exits 0 (``skip_reason``). For each tp:

1. **graph set**: ``neuron-serve compile MANIFEST --device neuron <shape>`` into a fresh store —
   the compile time (every graph of the shape, from an empty NEFF cache);
2. **start time with the graph set**: ``exec-server --device neuron --graphs required`` (fetch,
   restore into an empty NEFF cache, warm every graph up) until readiness SERVING;
3. **token parity**: greedy tokens of ``--prompts`` prompts through that server == the cpu engine's
   on the same artifact (fp32, one process, the reference);
4. **TTFT and TPOT** of those streams (median; TPOT = time per output token after the first).

Appends one line to ``bench/results/neuron_acceptance.jsonl``; exits 1 if tokens differ.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time


def skip_reason() -> str | None:
    """Why this cannot run here (None: it can)."""
    if importlib.util.find_spec("torch_neuronx") is None:
        return "the Neuron SDK is not installed (no torch_neuronx: torch-neuronx comes from AWS's index)"
    if not glob.glob("/dev/neuron*"):
        return "no Neuron device (/dev/neuron*): run on a Trn2/Trn3 instance"
    return None


def _shape(args: argparse.Namespace) -> list[str]:
    out = ["--max-batch-size", str(args.max_batch_size), "--max-seq-len", str(args.max_seq_len)]
    return [*out, "--context-buckets", args.context_buckets]


def _cpu_reference(uri: str, args: argparse.Namespace, prompts: list[list[int]]) -> list[list[int]]:
    from exec_service.artifact import open_artifact
    from exec_service.engine import Engine, Request, RuntimeConfig, StoppingCriteria

    art = open_artifact(uri)
    buckets = tuple(int(x) for x in args.context_buckets.split(","))
    cfg = RuntimeConfig(
        max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, context_buckets=buckets
    )
    engine = Engine(art, cfg)
    out: list[list[int]] = []
    for p in prompts:  # one at a time: the reference does not depend on batching
        rid = engine.add_request(
            Request(p, stopping=StoppingCriteria(max_new_tokens=args.new, ignore_eos=True))
        )
        toks: list[int] = []
        done = False
        while not done:
            for o in engine.step():
                if o.request_id == rid:
                    toks += o.new_token_ids
                    done = o.finish_reason is not None
        out.append(toks)
    engine.close()
    return out


async def _serve_and_measure(
    uri: str, store: str, args: argparse.Namespace, prompts: list[list[int]]
) -> dict:
    import grpc

    from bench.e2e import ServerProcess, free_port, run_served
    from protos import exec_pb2, exec_pb2_grpc

    port = free_port()
    argv = ["exec-server", "--model", uri, "--port", str(port), "--device", "neuron", *_shape(args)]
    argv += ["--graphs", "required", "--graphs-store", store, "--grace-period", "1"]
    env = {**os.environ, "TORCH_NEURONX_NEFF_CACHE_DIR": tempfile.mkdtemp(prefix="acceptance-neff-")}
    t0 = time.monotonic()
    server = ServerProcess(argv, env=env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await server.wait_ready(channel, timeout=3600)
            start_s = time.monotonic() - t0
            run = await run_served(exec_pb2_grpc.ExecServiceStub(channel), exec_pb2, prompts, args.new)
    finally:
        server.stop()
    return {
        "start_s": round(start_s, 1),
        "tokens": run.tokens,
        "ttft_ms": round(statistics.median(run.ttft) * 1000, 1),
        "tpot_ms": round(statistics.median(run.itl) * 1000, 2) if run.itl else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", default="1,2")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--context-buckets", default="64,256")
    args = p.parse_args()
    reason = skip_reason()
    if reason is not None:
        print(f"SKIP: {reason}")
        return 0
    from bench.common import prompt_ids, record, smollm2_manifest, table

    prompts = [prompt_ids(args.prompt_len, seed=i) for i in range(args.prompts)]
    rows, ok = [], True
    for tp in (int(x) for x in args.tp.split(",")):
        uri = smollm2_manifest("float32", tp=tp)
        store = f"file://{tempfile.mkdtemp(prefix='acceptance-graphs-')}"
        t = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "shared.cli",
                "compile",
                uri,
                "--device",
                "neuron",
                *_shape(args),
                "--output",
                store,
            ],
            check=True,
        )
        compile_s = time.monotonic() - t
        served = asyncio.run(_serve_and_measure(uri, store, args, prompts))
        want = _cpu_reference(uri, args, prompts)
        same = served.pop("tokens") == want
        ok &= same
        rows.append({"tp": tp, "tokens_equal_cpu": same, "compile_s": round(compile_s, 1), **served})
    print(table(rows))
    print(f"appended to {record('neuron_acceptance', rows, {'args': vars(args)})}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
