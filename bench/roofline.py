"""b) Roofline: this machine's measured memory bandwidth, the bytes a batch-1 decode step must move
(every weight once + the KV cache read), and the kernel ceiling (the model's linears alone, run back
to back over the real weights: aten F.linear vs oneDNN prepacked) -> our batch-1 decode as % of each.

    .venv/bin/python -m bench.roofline [--steps 64] [--ctx 192]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import median_seconds, prompt_ids, record, smollm2_manifest, table


def bandwidth(mb: int = 1024, reps: int = 5) -> dict:
    """Read bandwidth (sum over a 1 GiB fp32 tensor) and copy bandwidth (read + write), GB/s."""
    x = torch.ones(mb * 2**20 // 4)
    y = torch.empty_like(x)
    x.sum()
    y.copy_(x)
    rd, cp = [], []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        rd.append(x.numel() * 4 / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        y.copy_(x)
        cp.append(2 * x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return {"read_GBps": max(rd), "copy_GBps": max(cp)}


def linears_ceiling(model, reps: int = 20) -> dict:
    """Steps/s of just the step's matrix-vector products (batch 1) over the model's fused weights."""
    from exec_service.model.parallel import pack_weight

    ws = []
    for layer in model.layers:
        ws += [layer.attn.qkv.weight, layer.attn.o.weight, layer.mlp.gate_up.weight, layer.mlp.down.weight]
    ws.append(model.embed.weight if model.lm_head.weight is None else model.lm_head.weight)
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in ws}
    packed = [pack_weight(w, 1) for w in ws]
    out = {}
    for name, fn in {
        "aten": lambda: [F.linear(xs[w.shape[1]], w) for w in ws],
        "onednn": lambda: [
            torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
            for w, p in zip(ws, packed, strict=True)
        ],
    }.items():
        out[name] = 1 / median_seconds(fn, reps, warmup=3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    args = ap.parse_args()
    from exec_service.engine import Engine, Request, RuntimeConfig, SamplingParams, StoppingCriteria

    bw = bandwidth()
    uri = smollm2_manifest("float32")
    cfg = RuntimeConfig(max_batch_size=1, max_seq_len=args.prompt + 128, context_buckets=(args.prompt,))
    with Engine.from_manifest(uri, cfg) as eng:
        model = eng.executor.runner.model
        arch = eng.arch
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        # an LM-head-tied model reads the embedding matrix once per step (as the LM head) + one row
        kv_len = args.prompt + args.steps // 2  # the average context over the run
        kv_bytes = 2 * arch.num_layers * eng.target.kv_heads_per_rank * arch.head_dim * kv_len * 4
        step_bytes = weight_bytes + kv_bytes
        ceil = linears_ceiling(model)
        stop = StoppingCriteria(max_new_tokens=args.steps, min_new_tokens=args.steps)
        res = []
        for _ in range(3):
            eng.add_request(Request(tuple(prompt_ids(args.prompt)), SamplingParams(), stop))
            eng.step()
            t = time.perf_counter()
            n = 0
            while eng.has_unfinished():
                n += len(eng.step())
            res.append((args.steps - 2) / (time.perf_counter() - t))
        ours = statistics.median(res)
    roof = bw["read_GBps"] * 1e9 / step_bytes
    row = {
        "read_GBps": bw["read_GBps"],
        "copy_GBps": bw["copy_GBps"],
        "MB_per_step": step_bytes / 1e6,
        "roofline_tok_s": roof,
        "aten_linears_steps_s": ceil["aten"],
        "onednn_linears_steps_s": ceil["onednn"],
        "ours_tok_s": ours,
        "pct_roofline": 100 * ours / roof,
        "pct_aten_ceiling": 100 * ours / ceil["aten"],
        "pct_onednn_ceiling": 100 * ours / ceil["onednn"],
    }
    print(table([row]))
    print(f"appended to {record('roofline', [row], {'args': vars(args)})}")


if __name__ == "__main__":
    main()
