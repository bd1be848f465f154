"""int8 weight-only serving (issue #9): SmolLM2-135M-Instruct decode with int8 artifacts vs our fp32
path vs transformers ``generate`` fp32 — same weights, greedy, P prompt / N new tokens, EOS ignored,
alternating runs in one process.

    .venv/bin/python -m bench.int8 [--batches 1,8] [--prompt 128] [--new 128] [--reps 3]

Rows per batch: ``int8`` (attention + MLP int8, LM head fp32), ``int8+head`` (``--quantize-lm-head``
too), ``fp32`` (oneDNN prepacked fp32 linears) and ``transformers fp32``. Decode tok/s = B x (N - 1)
/ (last token - first token) as in ``bench.decode``; ratios are to our fp32 and to transformers in
the same run. Also the step's linears alone (kernel ceiling) for int8pack vs fp32 oneDNN.
``--compile`` adds the int8 engines under ``torch.compile`` (Inductor fuses the ~1000 small eager ops
of a step; the int8 kernel stays an extern call).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from bench.common import hf_model, median_seconds, prompt_ids, record, smollm2_manifest, table
from bench.decode import run_hf, run_ours


def kernel_rows(model, batches: list[int]) -> list[dict]:
    """Steps/s of one decode step's linears alone (30 layers x 4 fused matrices + the LM head)."""
    from exec_service.model.parallel import int8_linear, pack_weight
    from shared.quantize import quantize_int8

    ws = []
    for layer in model.layers:
        ws += [layer.attn.qkv.weight, layer.attn.o.weight, layer.mlp.gate_up.weight, layer.mlp.down.weight]
    ws.append(model.embed.weight)
    ws = [w.float() for w in ws]
    packed = [pack_weight(w, 8) for w in ws]
    quant = [quantize_int8(w) for w in ws]
    rows = []
    for m in batches:
        xs = {w.shape[1]: torch.randn(m, w.shape[1]) for w in ws}
        fp32 = lambda xs=xs: [  # noqa: E731
            torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
            for w, p in zip(ws, packed, strict=True)
        ]
        int8 = lambda xs=xs: [  # noqa: E731
            int8_linear(xs[q.shape[1]], q, s, s.bfloat16(), None, "int8pack") for q, s in quant
        ]
        f, i = median_seconds(fp32), median_seconds(int8)
        rows.append({"batch": m, "fp32_onednn_steps_s": 1 / f, "int8pack_steps_s": 1 / i, "ratio": f / i})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--compile",
        action="store_true",
        help="add torch.compile'd int8 rows (Inductor; 1-3 min cold per graph here: set TORCHINDUCTOR_CACHE_DIR)",
    )
    args = ap.parse_args()

    from exec_service.engine import Engine, RuntimeConfig

    uris = {
        "int8": smollm2_manifest("float32", quantize="int8"),
        "int8+head": smollm2_manifest("float32", quantize="int8", quantize_lm_head=True),
        "fp32": smollm2_manifest("float32"),
    }
    hf = hf_model("float32")
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        seq = -(-(args.prompt + args.new) // args.prompt) * args.prompt  # a multiple of the prefill bucket
        # one KV bucket: a prefill and a decode graph per engine (fewer graphs to compile)
        cfg = RuntimeConfig(
            max_batch_size=b, max_seq_len=seq, context_buckets=(args.prompt,), kv_buckets=(seq,)
        )
        prompts = [prompt_ids(args.prompt, seed=i) for i in range(b)]
        engines = {name: Engine.from_manifest(uri, cfg) for name, uri in uris.items()}
        if args.compile:
            compiled = dataclasses.replace(cfg, compile=True)
            engines["int8 compiled"] = Engine.from_manifest(uris["int8"], compiled)
            engines["int8+head compiled"] = Engine.from_manifest(uris["int8+head"], compiled)
        try:
            for eng in engines.values():
                run_ours(eng, prompts[:1], 4)  # warm-up
            run_hf(hf, prompts[:1], 4)
            runs: dict[str, list[dict]] = {k: [] for k in [*engines, "transformers fp32"]}
            tokens: dict[str, list] = {}
            for _ in range(args.reps):  # alternating
                for name, eng in engines.items():
                    stats, tokens[name] = run_ours(eng, prompts, args.new)
                    runs[name].append(stats)
                stats, tokens["transformers fp32"] = run_hf(hf, prompts, args.new)
                runs["transformers fp32"].append(stats)
        finally:
            for eng in engines.values():
                eng.close()
        med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
        for name, m in med.items():
            same = sum(
                x == y
                for a, c in zip(tokens[name], tokens["fp32"], strict=True)
                for x, y in zip(a, c, strict=True)
            )
            rows.append(
                {
                    "batch": b,
                    "path": name,
                    "decode_tok_s": m["decode_tok_s"],
                    "x_our_fp32": m["decode_tok_s"] / med["fp32"]["decode_tok_s"],
                    "x_transformers": m["decode_tok_s"] / med["transformers fp32"]["decode_tok_s"],
                    "ttft_s": m["ttft_s"],
                    "tokens_equal_to_fp32": f"{same}/{b * args.new}",
                }
            )
        print(table(rows[-len(med) :]), flush=True)
    with Engine.from_manifest(uris["fp32"], RuntimeConfig(max_batch_size=1, context_buckets=(16,))) as e:
        krows = kernel_rows(e.executor.runner.model, [int(x) for x in args.batches.split(",")])
    print(table(krows))
    print(f"appended to {record('int8', rows, {'kernels': krows, 'args': vars(args)})}")


if __name__ == "__main__":
    main()
