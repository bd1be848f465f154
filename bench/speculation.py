"""Speculative decoding on SmolLM2-135M-Instruct (fp32, greedy): decode tok/s with ``ngram`` (and
``draft``: the model's own int8 artifact drafting) against no speculation, at batch 1 and 8, on a
copy-heavy workload (quote a given text, fix typos in a text, edit code) and on free generation;
acceptance rates; whether every mode produced the same tokens (it must: greedy).

    .venv/bin/python -m bench.speculation [--batches 1,8] [--new 128] [--reps 2] [--k 4]
                                          [--modes off,ngram,draft] [--workloads copy,free]
                                          [--ignore-eos] [--no-record]

Targets (issue 17, idle machine): ngram k = 4 >= 2x at batch 1 on the copy-heavy workload,
>= 0.95x on free generation. Runs alternate between the modes in one process, each mode's engine
built once per batch size. A run covers every prompt of the workload: at batch b the prompts go in
groups of b (cycled to fill the last group), one group after the other, so batch 1 measures all three
copy tasks, not only the first. Each request ends at the model's own EOS or at ``--new`` tokens
(``--ignore-eos``: always ``--new``; the text after an EOS is no longer the copy task, so that
measures free generation appended to it). Greedy: every mode produces the same tokens, so the modes
are timed on the same work. Per run: decode tok/s = tokens produced after every row of a group has
its first token / the time since then, summed over the groups (prefill excluded); e2e tok/s = all
tokens / total time. Acceptance = accepted / proposed drafts; mean accepted length = tokens a
speculating row gains per verify step.
``--no-record``: print only (a smoke run on a busy machine is no result).
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.common import record, smollm2_manifest, table

PARAGRAPH = (
    "Static-shape compilation turns every model step into a graph whose input sizes are fixed in "
    "advance. The serving engine pads each batch up to the nearest bucket, keeps one key-value cache "
    "that is allocated once and updated in place, and picks the smallest graph that holds the rows of "
    "the step. Because the shapes never change, the compiler can plan memory and fuse operations "
    "ahead of time, and no request ever waits for a graph to be built."
)
TYPOS = (
    "The quick brwon fox jumpd over the lazzy dog while the farmer was sleping in the barn. Later "
    "that day the fox came bak to the feild, looking for the chikens that had escapd from the coop."
)
CODE = """def moving_average(values, window):
    result = []
    total = 0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result


def normalise(values):
    lo, hi = min(values), max(values)
    return [(v - lo) / (hi - lo) for v in values]
"""
WORKLOADS = {
    "copy": [
        f"Copy the following paragraph word for word.\n\n{PARAGRAPH}",
        f"Rewrite this text with the spelling mistakes fixed, changing nothing else:\n\n{TYPOS}",
        f"Add type hints to these Python functions and print the complete code:\n```python\n{CODE}```",
    ],
    "free": [
        "Write a short story about a robot that learns to paint.",
        "Explain in detail why the sky is blue.",
        "Give me ten ideas for a birthday party.",
    ],
}


def chat_ids(tok, text: str) -> list[int]:
    return list(
        tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


def run(engine, prompts: list[list[int]], new: int, ignore_eos: bool) -> tuple[dict, list[list[int]]]:
    """One group of requests submitted together, to completion: raw sums (``run_workload`` divides)."""
    from exec_service.engine import Request, SamplingParams, StoppingCriteria

    stop = StoppingCriteria(max_new_tokens=new, ignore_eos=ignore_eos)
    before = engine.speculation_stats
    t0 = time.perf_counter()
    ids = [engine.add_request(Request(tuple(p), SamplingParams(), stop)) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    steps: list[tuple[float, int]] = []  # (time, tokens produced by the step)
    first: dict[str, float] = {}
    while engine.has_unfinished():
        outs = engine.step()
        t = time.perf_counter()
        steps.append((t, sum(len(o.new_token_ids) for o in outs)))
        for o in outs:
            tokens[o.request_id] += o.new_token_ids
            if o.new_token_ids:
                first.setdefault(o.request_id, t)
    start = max(first.values())  # every row is decoding from here on
    stats = engine.speculation_stats
    return {
        "decode_tokens": sum(n for t, n in steps if t > start),
        "decode_s": steps[-1][0] - start,
        "tokens": sum(len(v) for v in tokens.values()),
        "total_s": steps[-1][0] - t0,
        "drafted": stats.draft_tokens - before.draft_tokens,
        "accepted": stats.accepted_tokens - before.accepted_tokens,
        "rows": stats.verified_rows - before.verified_rows,
        "verify_steps": stats.verify_steps - before.verify_steps,
        "steps": len(steps),
    }, [tokens[i] for i in ids]


def run_workload(engine, groups: list[list[list[int]]], new: int, ignore_eos: bool) -> tuple[dict, list]:
    """Every group in turn; the rates over all of them."""
    sums: dict[str, float] = {}
    outputs: list[list[int]] = []
    for group in groups:
        res, toks = run(engine, group, new, ignore_eos)
        for k, v in res.items():
            sums[k] = sums.get(k, 0) + v
        outputs += toks
    return {
        "decode_tok_s": sums["decode_tokens"] / sums["decode_s"],
        "e2e_tok_s": sums["tokens"] / sums["total_s"],
        "tokens": sums["tokens"],
        "drafted": sums["drafted"],
        "acceptance": sums["accepted"] / sums["drafted"] if sums["drafted"] else 0.0,
        "mean_accepted_length": 1 + sums["accepted"] / sums["rows"] if sums["rows"] else 0.0,
        "verify_steps": sums["verify_steps"],
        "steps": sums["steps"],
    }, outputs


def groups_of(prompts: list[list[int]], b: int) -> list[list[list[int]]]:
    """The workload's prompts in groups of b, the last group filled by cycling from the start."""
    n = -(-len(prompts) // b)
    return [[prompts[(g * b + i) % len(prompts)] for i in range(b)] for g in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--k", type=int, default=4, help="--num-speculative-tokens")
    ap.add_argument("--modes", default="off,ngram,draft", help="off (the baseline) is always run")
    ap.add_argument("--workloads", default="copy,free")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument(
        "--ignore-eos", action="store_true", help="every request runs --new tokens (past its EOS)"
    )
    ap.add_argument("--no-record", action="store_true", help="print only, append nothing to results")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from bench.common import smollm2_gguf
    from exec_service.artifact import open_artifact
    from exec_service.engine import Engine, RuntimeConfig

    modes = ["off", *(m for m in args.modes.split(",") if m != "off")]
    uri = smollm2_manifest("float32")
    draft_uri = smollm2_manifest("float32", quantize="int8") if "draft" in modes else None
    g = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        engines = {}
        for mode in modes:
            cfg = RuntimeConfig(
                max_batch_size=b,
                max_seq_len=args.max_seq_len,
                context_buckets=(),
                speculation=mode,
                num_speculative_tokens=args.k if mode != "off" else 0,
            )
            draft = open_artifact(draft_uri) if mode == "draft" else None
            engines[mode] = Engine.from_manifest(uri, cfg, draft_source=draft)
        try:
            for workload in args.workloads.split(","):
                texts = WORKLOADS[workload]
                groups = groups_of([chat_ids(tok, t) for t in texts], b)
                for mode in modes:  # warm-up: every bucket these prompts use, every graph kind
                    run_workload(engines[mode], groups, min(args.new, 16), True)
                results: dict[str, list[dict]] = {m: [] for m in modes}
                outputs: dict[str, list[list[int]]] = {}
                for _ in range(args.reps):  # alternating
                    for mode in modes:
                        res, toks = run_workload(engines[mode], groups, args.new, args.ignore_eos)
                        results[mode].append(res)
                        outputs[mode] = toks
                base = statistics.median(r["decode_tok_s"] for r in results["off"])
                for mode in modes:
                    med = {k: statistics.median(r[k] for r in results[mode]) for k in results[mode][0]}
                    row = {
                        "workload": workload,
                        "batch": b,
                        "mode": mode,
                        "k": args.k if mode != "off" else 0,
                        "decode_tok_s": med["decode_tok_s"],
                        "speedup": med["decode_tok_s"] / base,
                        "e2e_tok_s": med["e2e_tok_s"],
                        "tokens": med["tokens"],
                        "acceptance": med["acceptance"],
                        "mean_accepted_length": med["mean_accepted_length"],
                        "verify_steps": med["verify_steps"],
                        "steps": med["steps"],
                        "same_tokens": outputs[mode] == outputs["off"],
                    }
                    rows.append(row)
                    print(table([row]), flush=True)
        finally:
            for e in engines.values():
                e.close()
    print(table(rows))
    if args.no_record:
        print("--no-record: nothing appended")
        return
    path = record("speculation", rows, {"args": vars(args)})
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
