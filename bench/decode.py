"""a) Decode: our exec runtime vs transformers ``generate`` on the same SmolLM2-135M-Instruct weights,
same dtype, greedy, P prompt / N new tokens, EOS ignored, batch 1/4/8/16, alternating runs in one
process. Also TTFT for a 512-token prompt (batch 1).

    .venv/bin/python -m bench.decode [--batches 1,4,8,16] [--prompt 128] [--new 128] [--reps 2]
                                     [--no-greedy-graphs] [--cpu-linear aten] [--compile]

Per run, timestamps of every generated token: TTFT = first token - start, decode tok/s =
B * (N - 1) / (last - first). ``e2e tok/s`` = B * N / total. Ratios are ours / transformers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import hf_model, prompt_ids, record, smollm2_manifest, table


def run_ours(engine, prompts: list[list[int]], new: int) -> dict:
    from exec_service.engine import Request, SamplingParams, StoppingCriteria

    # EOS masked until `new` tokens, as transformers' min_new_tokens does (same tokens both sides)
    stop = StoppingCriteria(max_new_tokens=new, min_new_tokens=new)
    t0 = time.perf_counter()
    for p in prompts:
        engine.add_request(Request(tuple(p), SamplingParams(), stop))
    stamps, tokens = [], {}
    while engine.has_unfinished():
        outs = engine.step()
        stamps.append(time.perf_counter())
        for o in outs:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
    # step 1 = prefills + the first decode: the first token of every row arrives with the prefill
    return _stats(t0, stamps, len(prompts), new, first_step_tokens=2), [tokens[k] for k in sorted(tokens)]


class _Stamps:
    """A transformers StoppingCriteria that records when each token was produced."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def __call__(self, input_ids, scores, **kw):
        self.t.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def run_hf(model, prompts: list[list[int]], new: int) -> dict:
    from transformers import StoppingCriteriaList

    ids = torch.tensor(prompts)
    st = _Stamps()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,  # EOS ignored
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([st]),
            pad_token_id=0,
        )
    return _stats(t0, st.t, len(prompts), new, first_step_tokens=1), out[:, ids.shape[1] :].tolist()


def _stats(t0: float, stamps: list[float], b: int, new: int, first_step_tokens: int) -> dict:
    # stamps[0] = when the first token(s) were available; for ours step 1 already holds 2 tokens
    total = stamps[-1] - t0
    decoded = new - first_step_tokens
    return {
        "ttft_s": stamps[0] - t0,
        "decode_tok_s": b * decoded / (stamps[-1] - stamps[0]) if decoded > 0 else float("nan"),
        "e2e_tok_s": b * new / total,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--ttft-prompt", type=int, default=512)
    ap.add_argument("--cpu-linear", default="onednn")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--no-greedy-graphs",
        action="store_true",
        help="decode greedy batches through the full sampler graph too (A/B of RuntimeConfig.greedy_graphs)",
    )
    args = ap.parse_args()

    from exec_service.engine import Engine, RuntimeConfig

    uri = smollm2_manifest("float32")
    hf = hf_model("float32")
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        seq = args.prompt + args.new
        cfg = RuntimeConfig(
            max_batch_size=b,
            max_seq_len=seq,
            context_buckets=(args.prompt,),
            cpu_linear=args.cpu_linear,
            compile=args.compile,
            greedy_graphs=not args.no_greedy_graphs,
        )
        prompts = [prompt_ids(args.prompt, seed=i) for i in range(b)]
        with Engine.from_manifest(uri, cfg) as eng:
            run_ours(eng, prompts[:1], 4)  # warm-up (both sides)
            run_hf(hf, prompts[:1], 4)
            ours, theirs, same = [], [], True
            for _ in range(args.reps):  # alternating
                o, ot = run_ours(eng, prompts, args.new)
                h, ht = run_hf(hf, prompts, args.new)
                ours.append(o)
                theirs.append(h)
                same = same and ot == ht
        med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
        row = {
            "batch": b,
            "ours_tok_s": med(ours, "decode_tok_s"),
            "hf_tok_s": med(theirs, "decode_tok_s"),
            "ratio": med(ours, "decode_tok_s") / med(theirs, "decode_tok_s"),
            "ours_e2e": med(ours, "e2e_tok_s"),
            "hf_e2e": med(theirs, "e2e_tok_s"),
            "e2e_ratio": med(ours, "e2e_tok_s") / med(theirs, "e2e_tok_s"),
            "ours_ttft_s": med(ours, "ttft_s"),
            "hf_ttft_s": med(theirs, "ttft_s"),
            "same_tokens": same,
        }
        rows.append(row)
        print(table([row]), flush=True)

    # TTFT for a long prompt, batch 1 (prefill in one bucket of that size)
    n = args.ttft_prompt
    cfg = RuntimeConfig(
        max_batch_size=1,
        max_seq_len=2 * n,
        context_buckets=(128, n),
        cpu_linear=args.cpu_linear,
        compile=args.compile,
        greedy_graphs=not args.no_greedy_graphs,
    )
    p = [prompt_ids(n, seed=99)]
    with Engine.from_manifest(uri, cfg) as eng:
        run_ours(eng, p, 1)
        run_hf(hf, p, 1)
        o = [run_ours(eng, p, 1)[0]["ttft_s"] for _ in range(args.reps + 1)]
        h = [run_hf(hf, p, 1)[0]["ttft_s"] for _ in range(args.reps + 1)]
    ttft = {
        "prompt": n,
        "ours_ttft_s": statistics.median(o),
        "hf_ttft_s": statistics.median(h),
        "ratio_hf_over_ours": statistics.median(h) / statistics.median(o),
    }
    print(table(rows))
    print(table([ttft]))
    path = record("decode", rows, {"ttft": ttft, "args": vars(args)})
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
