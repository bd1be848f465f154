"""d) Prep: GB/s and peak RSS preparing ~0.5, 1 and 2 GB (fp32) Llama checkpoints at tp 1, 2 and 4,
against a plain safetensors read + write copy of the same bytes (safe_open -> get_tensor ->
save_file, which holds the whole state in memory). Every measurement runs in a fresh child process
that reports its own peak RSS (VmHWM).

Columns:
* ``prep`` — the source's sha256 is remembered from an earlier run (the digest cache, primed in
  the child before timing): what re-preparing a checkpoint for another tp/dtype costs;
* ``prep_cold`` — no digest cache: the source is hashed too (a first preparation);
* ``copy`` — the plain copy, the headline baseline (``ratio`` = prep / copy);
* ``copy_durable`` — the same copy plus what prep must also do for durability and integrity:
  ``fsync`` of the written file and one sha256 pass over it (``ratio_durable`` = prep / that).

    .venv/bin/python -m bench.prep [--sizes 0.5,1,2] [--tps 1,2,4] [--reps 1] [--workdir /tmp/bench-prep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import record, table

HIDDEN, INTER, HEADS, KV, VOCAB = 1024, 4096, 16, 4, 32000


def _layers_for(gb: float) -> int:
    per_layer = (2 * HIDDEN * HIDDEN + 2 * HIDDEN * (HIDDEN // HEADS) * KV + 3 * HIDDEN * INTER) * 4
    return max(1, round((gb * 1e9 - VOCAB * HIDDEN * 4) / per_layer))


def make_checkpoint(path: Path, gb: float) -> int:
    """A random Llama (tied embeddings) of about ``gb`` GB in one safetensors file; returns bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    n = _layers_for(gb)
    path.mkdir(parents=True, exist_ok=True)
    LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=n,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        torch_dtype="float32",
    ).save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    d = HIDDEN // HEADS
    sd = {
        "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.02,
        "model.norm.weight": torch.ones(HIDDEN),
    }
    for i in range(n):
        p = f"model.layers.{i}."
        for name, shape in (
            ("self_attn.q_proj", (HEADS * d, HIDDEN)),
            ("self_attn.k_proj", (KV * d, HIDDEN)),
            ("self_attn.v_proj", (KV * d, HIDDEN)),
            ("self_attn.o_proj", (HIDDEN, HEADS * d)),
            ("mlp.gate_proj", (INTER, HIDDEN)),
            ("mlp.up_proj", (INTER, HIDDEN)),
            ("mlp.down_proj", (HIDDEN, INTER)),
        ):
            sd[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.02
        sd[p + "input_layernorm.weight"] = torch.ones(HIDDEN)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return (path / "model.safetensors").stat().st_size


def _child(kind: str, src: str, out: str, tp: int) -> None:
    # imports first: all timings cover the work only (torch import is ~2 s here)
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    from prep_service.api import PrepareRequest
    from prep_service.convert import prepare
    from prep_service.sources.digests import DigestCache

    cached = None
    if kind == "prep":  # prime the digest cache (NEURON_SERVE_DIGEST_CACHE, set by the parent)
        weights = Path(src) / "model.safetensors"
        cache = DigestCache.default()
        cache.sha256(weights)
        cached = cache.lookup(weights) is not None
    t = time.perf_counter()
    if kind in ("copy", "copy_durable"):
        with safe_open(str(Path(src) / "model.safetensors"), "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        Path(out).mkdir(parents=True, exist_ok=True)
        dest = Path(out) / "model.safetensors"
        save_file(sd, str(dest))
        if kind == "copy_durable":
            with open(dest, "rb") as f:
                os.fsync(f.fileno())
                hashlib.file_digest(f, "sha256")
    else:
        prepare(PrepareRequest(source=src, output=f"file://{out}", tp_degree=tp, force=True))
    dt = time.perf_counter() - t
    print(json.dumps({"seconds": dt, "max_rss_mb": _peak_rss_mb(), "digest_cached": cached}))


def _peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM (ru_maxrss also counts the parent's RSS at fork, which
    exec records: a big parent would make every child look big)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_child(kind: str, src: Path, out: Path, tp: int, digest_cache: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "NEURON_SERVE_DIGEST_CACHE": str(digest_cache) if kind == "prep" else "off"}
    r = subprocess.run(
        [sys.executable, "-m", "bench.prep", "--child", kind, str(src), str(out), str(tp)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if r.returncode != 0:
        raise RuntimeError(f"{kind} tp={tp} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    if kind == "prep" and not res["digest_cached"]:
        raise RuntimeError("the digest cache was not primed (source modified within the last seconds?)")
    return res


def _median_run(kind: str, src: Path, out: Path, tp: int, digest_cache: Path, reps: int) -> dict:
    """Median seconds over ``reps`` fresh child processes; the highest peak RSS seen."""
    runs = [_run_child(kind, src, out, tp, digest_cache) for _ in range(reps)]
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "max_rss_mb": max(r["max_rss_mb"] for r in runs),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="0.5,1,2")
    ap.add_argument("--tps", default="1,2,4")
    ap.add_argument("--reps", type=int, default=1, help="runs per measurement (median)")
    ap.add_argument("--workdir", default="/tmp/bench-prep")
    args = ap.parse_args()
    work = Path(args.workdir)
    digest_cache = work / "digest-cache"
    rows = []
    for gb in (float(x) for x in args.sizes.split(",")):
        src = work / f"ckpt-{gb}g"
        if not (src / "model.safetensors").exists():
            make_checkpoint(src, gb)
            time.sleep(3)  # the digest cache only remembers files not modified in the last 2 s
        nbytes = (src / "model.safetensors").stat().st_size

        def run(kind: str, tp: int, src: Path = src) -> dict:
            out = work / ("copy-out" if kind.startswith("copy") else "store")
            return _median_run(kind, src, out, tp, digest_cache, args.reps)

        copy, durable = run("copy", 1), run("copy_durable", 1)
        for tp in (int(x) for x in args.tps.split(",")):
            cold, p = run("prep_cold", tp), run("prep", tp)
            rows.append(
                {
                    "size_GB": nbytes / 1e9,
                    "tp": tp,
                    "prep_GBps": nbytes / p["seconds"] / 1e9,
                    "prep_cold_GBps": nbytes / cold["seconds"] / 1e9,
                    "copy_GBps": nbytes / copy["seconds"] / 1e9,
                    "copy_durable_GBps": nbytes / durable["seconds"] / 1e9,
                    "ratio": copy["seconds"] / p["seconds"],
                    "ratio_cold": copy["seconds"] / cold["seconds"],
                    "ratio_durable": durable["seconds"] / p["seconds"],
                    "prep_rss_MB": p["max_rss_mb"],
                    "prep_cold_rss_MB": cold["max_rss_mb"],
                    "copy_rss_MB": copy["max_rss_mb"],
                }
            )
            print(table([rows[-1]]), flush=True)
    print(table(rows))
    print(f"appended to {record('prep', rows, {'args': vars(args)})}")


if __name__ == "__main__":
    main()
