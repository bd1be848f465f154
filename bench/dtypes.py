"""e) Weight dtypes: fp32 and bf16 storage of SmolLM2-135M, for speed and for logits error.

* engine rows: our engine on an fp32 artifact (oneDNN prepacked fp32 linears) and on a bf16
  artifact (bf16 weights, bf16 compute: aten's bf16 kernels; AVX2 has no native bf16 FMA);
  batch-1 decode tok/s, 128-token prefill time, first-token logits error vs fp32 and greedy
  agreement over N tokens.
* kernel rows: the step's linears alone over the real weights (batch 1 and 8): fp32 aten, fp32
  oneDNN prepacked, bf16 aten, bf16 storage + fp32 compute (upcast each weight per step, then fp32
  oneDNN/aten) -- which compute is fastest for bf16 storage on this CPU.

    .venv/bin/python -m bench.dtypes [--new 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import median_seconds, prompt_ids, record, smollm2_manifest, table


def kernels(model) -> list[dict]:
    from exec_service.model.parallel import pack_weight

    ws = []
    for layer in model.layers:
        ws += [layer.attn.qkv.weight, layer.attn.o.weight, layer.mlp.gate_up.weight, layer.mlp.down.weight]
    ws.append(model.embed.weight)
    ws = [w.float() for w in ws]
    wb = [w.bfloat16() for w in ws]
    packed = [pack_weight(w, 1) for w in ws]
    rows = []
    for m in (1, 8):
        xs = {w.shape[1]: torch.randn(m, w.shape[1]) for w in ws}
        xb = {k: v.bfloat16() for k, v in xs.items()}
        variants = {
            "fp32 aten": lambda xs=xs, xb=xb: [F.linear(xs[w.shape[1]], w) for w in ws],
            "fp32 onednn prepacked": lambda xs=xs, xb=xb: [
                torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
                for w, p in zip(ws, packed, strict=True)
            ],
            "bf16 aten (bf16 compute)": lambda xs=xs, xb=xb: [F.linear(xb[w.shape[1]], w) for w in wb],
            "bf16 storage, fp32 compute (upcast)": lambda xs=xs, xb=xb: [
                F.linear(xs[w.shape[1]], w.float()) for w in wb
            ],
        }
        for name, fn in variants.items():
            dt = median_seconds(fn)
            rows.append({"kernel": name, "batch": m, "linears_steps_s": 1 / dt})
    return rows


def engine_row(uri: str, dtype: str, new: int, ref_logits, ref_tokens) -> tuple[dict, torch.Tensor, list]:
    from exec_service.engine import Engine, Request, RuntimeConfig, SamplingParams, StoppingCriteria

    cfg = RuntimeConfig(max_batch_size=1, max_seq_len=256, context_buckets=(128,), return_logits=True)
    p = tuple(prompt_ids(128))
    stop = StoppingCriteria(max_new_tokens=new, min_new_tokens=new)
    with Engine.from_manifest(uri, cfg) as eng:
        eng.generate([Request(p, SamplingParams(), StoppingCriteria(max_new_tokens=2, min_new_tokens=2))])
        rates, prefill = [], []
        for _ in range(2):
            eng.add_request(Request(p, SamplingParams(), stop))
            t = time.perf_counter()
            toks, logits = [], []
            outs = eng.step()
            t1 = time.perf_counter()
            for o in outs:
                toks += o.new_token_ids
                logits += o.logits
            while eng.has_unfinished():
                for o in eng.step():
                    toks += o.new_token_ids
            rates.append((new - 2) / (time.perf_counter() - t1))
            prefill.append(t1 - t)
    first = logits[0].float()
    row = {
        "weights": dtype,
        "decode_tok_s": statistics.median(rates),
        "prefill128_s(+1 step)": statistics.median(prefill),
    }
    if ref_logits is not None:
        row["max_abs_logit_err"] = float((first - ref_logits).abs().max())
        row["mean_abs_logit_err"] = float((first - ref_logits).abs().mean())
        agree = next((i for i, (a, b) in enumerate(zip(toks, ref_tokens, strict=True)) if a != b), len(toks))
        row["greedy_same_prefix"] = f"{agree}/{len(toks)}"
    return row, first, toks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    rows = []
    r32, ref, toks = engine_row(smollm2_manifest("float32"), "fp32", args.new, None, None)
    rows.append(r32)
    print(table([r32]), flush=True)
    rb, _, _ = engine_row(smollm2_manifest("bfloat16"), "bf16", args.new, ref, toks)
    rows.append(rb)
    print(table(rows))
    from exec_service.engine import Engine, RuntimeConfig

    with Engine.from_manifest(
        smollm2_manifest("float32"), RuntimeConfig(max_batch_size=1, context_buckets=(16,))
    ) as e:
        krows = kernels(e.executor.runner.model)
    print(table(krows))
    print(f"appended to {record('dtypes', rows, {'kernels': krows, 'args': vars(args)})}")


if __name__ == "__main__":
    main()
