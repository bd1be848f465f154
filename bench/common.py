"""Shared bits of the benchmarks: machine info, git sha, the JSONL results log, the SmolLM2 artifact,
and a table printer. Results are ratios against a baseline measured in the same process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STORE = os.environ.get("BENCH_STORE", "/tmp/bench-store")


def git_sha() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except Exception:
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def other_load() -> dict:
    """Load average and the busiest other processes: another process on this 2-core machine makes
    every OpenMP parallel region wait for a descheduled thread, so record it with each result."""
    out = {"loadavg": os.getloadavg()}
    try:
        ps = subprocess.run(
            ["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True, timeout=5
        ).stdout.splitlines()[1:6]
        me = os.getpid()
        out["busy"] = [
            line.strip()
            for line in ps
            if line.split() and int(line.split()[0]) != me and float(line.split()[1]) > 20
        ]
    except Exception:
        pass
    return out


def machine() -> dict:
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def record(bench: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Append one JSON line to bench/results/<bench>.jsonl."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{bench}.jsonl"
    line = {
        "bench": bench,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_sha": git_sha(),
        "command": " ".join([Path(sys.executable).name, "-m", f"bench.{bench}", *sys.argv[1:]]),
        "machine": machine(),
        "load": other_load(),
        "rows": rows,
        **(extra or {}),
    }
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
    return path


def table(rows: list[dict], cols: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    cols = cols or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)) + " |" for c in cells]
    return "\n".join(lines)


def smollm2_gguf() -> Path:
    from shared.cli import smollm2_gguf as find

    return find()


def smollm2_manifest(
    dtype: str = "float32", tp: int = 1, quantize: str | None = None, quantize_lm_head: bool = False
) -> str:
    """Prepare (or reuse) the SmolLM2-135M-Instruct artifact in the bench store; returns its URI."""
    from prep_service.api import PrepareRequest
    from prep_service.convert import prepare

    res = prepare(
        PrepareRequest(
            source=str(smollm2_gguf()),
            output=f"file://{STORE}",
            dtype=dtype,
            tp_degree=tp,
            quantize=quantize,
            quantize_lm_head=quantize_lm_head,
        )
    )
    return res.manifest_uri


def hf_model(dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    g = smollm2_gguf()
    m = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=getattr(torch, dtype))
    return m.eval()


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    """A fixed, ordinary-looking prompt of n token ids (ids 1000..20000, deterministic)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 20000, (n,), generator=g).tolist()


def median_seconds(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``reps`` runs after ``warmup`` untimed ones."""
    import statistics

    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)
