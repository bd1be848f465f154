"""b) Roofline: this machine's measured memory bandwidth, the bytes a batch-1 decode step must move
(every weight once + the KV cache read), and the kernel ceilings (the model's linears alone, run back
to back over the real weights: aten F.linear, oneDNN prepacked, and the fused reductions compiled
cpu graphs use at 1-2 rows) -> our batch-1 decode (eager, and with ``--compiled`` its graphs
compiled as a graph set holds them) as % of each.

Prefill: the linears of a P-token prompt alone (``--prefill 512``: every layer's matrices at P rows
and the LM head at one row, aten vs oneDNN) -> the GFLOP/s they reach and the TTFT floor they set.

    .venv/bin/python -m bench.roofline [--steps 64] [--prompt 128] [--prefill 512] [--compiled]
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


def step_weights(model) -> list[torch.Tensor]:
    """The matrices of one decode step, in order: 30 layers x (qkv, o, gate_up, down) + the LM head."""
    ws = []
    for layer in model.layers:
        ws += [layer.attn.qkv.weight, layer.attn.o.weight, layer.mlp.gate_up.weight, layer.mlp.down.weight]
    ws.append(model.embed.weight if model.lm_head.weight is None else model.lm_head.weight)
    return ws


def linears_ceiling(model, reps: int = 20) -> dict:
    """Steps/s of just the step's matrix-vector products (batch 1) over the model's fused weights:
    aten F.linear, oneDNN prepacked, and the reductions of compiled cpu graphs (``onednn.
    reduction_linear``, all of them in one compiled function, as in a compiled decode graph)."""
    from exec_service.model.onednn import reduction_linear
    from exec_service.model.parallel import pack_weight

    ws = step_weights(model)
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in ws}
    packed = [pack_weight(w, 1) for w in ws]
    xin = [xs[w.shape[1]] for w in ws]
    reductions = torch.compile(
        lambda xs, ws: [reduction_linear(x, w) for x, w in zip(xs, ws, strict=True)],
        fullgraph=True,
        dynamic=False,
    )
    out = {}
    for name, fn in {
        "aten": lambda: [F.linear(xs[w.shape[1]], w) for w in ws],
        "onednn": lambda: [
            torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
            for w, p in zip(ws, packed, strict=True)
        ],
        "reduction": lambda: reductions(xin, ws),
    }.items():
        out[name] = 1 / median_seconds(fn, reps, warmup=3)
    return out


def prefill_ceiling(model, tokens: int, reps: int = 5) -> dict:
    """Seconds of a ``tokens``-token prefill's linears alone (every layer's matrices at ``tokens``
    rows, the LM head at the last row only, as our context graph and transformers' generate both
    do) with aten F.linear (MKL) and oneDNN prepacked, and the GFLOP/s that is."""
    from exec_service.model.parallel import pack_weight

    ws = step_weights(model)
    head, layers = ws[-1], ws[:-1]
    flops = 2 * (tokens * sum(w.numel() for w in layers) + head.numel())
    xs = {w.shape[1]: torch.randn(tokens, w.shape[1]) for w in layers}
    last = torch.randn(1, head.shape[1])
    packed = [pack_weight(w, tokens) for w in layers]
    out = {"prefill_GFLOP": flops / 1e9}
    for name, fn in {
        "aten": lambda: [F.linear(xs[w.shape[1]], w) for w in layers] + [F.linear(last, head)],
        "onednn": lambda: (
            [
                torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
                for w, p in zip(layers, packed, strict=True)
            ]
            + [F.linear(last, head)]
        ),
    }.items():
        sec = median_seconds(fn, reps, warmup=1)
        out[f"prefill_{name}_s"] = sec
        out[f"prefill_{name}_GFLOPs"] = flops / sec / 1e9
    return out


def decode_tok_s(uri: str, prompt: int, steps: int, compiled: bool) -> float:
    """Our batch-1 greedy decode, tok/s over ``steps`` tokens (median of 3), eager or compiled."""
    from exec_service.engine import Engine, Request, RuntimeConfig, SamplingParams, StoppingCriteria

    cfg = RuntimeConfig(
        max_batch_size=1, max_seq_len=prompt + 128, context_buckets=(prompt,), compile=compiled
    )
    with Engine.from_manifest(uri, cfg) as eng:
        stop = StoppingCriteria(max_new_tokens=steps, min_new_tokens=steps)
        res = []
        for _ in range(4):  # the first run warms up (compiles, when compiled)
            eng.add_request(Request(tuple(prompt_ids(prompt)), SamplingParams(), stop))
            eng.step()
            t = time.perf_counter()
            while eng.has_unfinished():
                eng.step()
            res.append((steps - 2) / (time.perf_counter() - t))
    return statistics.median(res[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill ceiling")
    ap.add_argument("--compiled", action="store_true", help="also our decode with compiled graphs")
    args = ap.parse_args()
    from exec_service.engine import Engine, RuntimeConfig

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
        prefill = prefill_ceiling(model, args.prefill)
    ours = {"eager": decode_tok_s(uri, args.prompt, args.steps, compiled=False)}
    if args.compiled:
        ours["compiled"] = decode_tok_s(uri, args.prompt, args.steps, compiled=True)
    roof = bw["read_GBps"] * 1e9 / step_bytes
    row = {
        "read_GBps": bw["read_GBps"],
        "copy_GBps": bw["copy_GBps"],
        "MB_per_step": step_bytes / 1e6,
        "roofline_tok_s": roof,
        "aten_linears_steps_s": ceil["aten"],
        "onednn_linears_steps_s": ceil["onednn"],
        "reduction_linears_steps_s": ceil["reduction"],
    }
    for mode, tok_s in ours.items():
        row[f"ours_{mode}_tok_s"] = tok_s
        row[f"{mode}_pct_roofline"] = 100 * tok_s / roof
        for kernel in ("onednn", "reduction"):
            row[f"{mode}_pct_{kernel}_ceiling"] = 100 * tok_s / ceil[kernel]
    row.update(prefill)
    print(table([{k: v for k, v in row.items() if not k.startswith("prefill")}]))
    print(table([{k: v for k, v in row.items() if k.startswith("prefill")}]))
    print(f"appended to {record('roofline', [row], {'args': vars(args)})}")


if __name__ == "__main__":
    main()
