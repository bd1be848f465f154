"""The ops a lowered step graph may contain, each with the reason it is there, and the checks a
lowered graph must pass (``violations``).

An op that is not listed fails the graph's check: a new op in a graph is a decision (does
neuronx-cc take it? is it a sign of a host sync, data-dependent control flow or f64 math?), made
here with its reason, not by accident. Deliberately absent: ``stablehlo.custom_call`` (opaque to
neuronx-cc), ``while`` / ``if`` / ``case`` (data-dependent control flow), ``rng`` (randomness is an
input), ``chlo.*`` (no decomposition needed so far), and every ``torch`` / ``torch_c`` op (a graph
that still holds one did not lower).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exec_service.runtime.neuron.lowering import LoweredGraph

ALLOWED: dict[str, str] = {
    # structure
    "builtin.module": "the module holding one graph",
    "func.func": "the graph itself: one function, weights, cache and step inputs as arguments",
    "func.return": "the graph's outputs, then each mutated input's new value (aliased to its input)",
    "stablehlo.return": "terminator of reduction / sort / scatter / collective regions",
    "stablehlo.constant": "literal shapes, epsilons, -inf fills, iota bases (f64 ones are narrowed)",
    # data movement (views are free on the device; no op here copies the cache)
    "stablehlo.reshape": "views: the cache seen as [rows, D] for its scatter, heads split / merged",
    "stablehlo.transpose": "BSHD <-> BHSD head layout around attention, matmul operand layouts",
    "stablehlo.broadcast_in_dim": "broadcasting in elementwise ops (masks, norms, scales)",
    "stablehlo.slice": "the first K cache positions a KV bucket reads; fused qkv / gate_up split",
    "stablehlo.concatenate": "RoPE halves, partial rotary, per-rank all-gathered pieces",
    "stablehlo.gather": "embedding lookup, cache slots of the batch rows (index_select), top-k ids",
    "stablehlo.scatter": "KV cache writes (index_put into the aliased cache), token counts, suppression",
    "stablehlo.iota": "arange: key positions of the mask, head / row indices of the cache write index",
    "stablehlo.convert": "dtype casts (model dtype <-> fp32 logits, bool masks, ids to float)",
    "stablehlo.select": "where / masked_fill: attention masks, padded vocab, greedy vs sampled rows",
    # arithmetic
    "stablehlo.dot_general": "linears, attention scores and values, MoE expert matmuls",
    "stablehlo.add": "residuals, biases, masks, sums",
    "stablehlo.subtract": "logsumexp shifts, vocab offsets, penalties",
    "stablehlo.multiply": "scales, gating, RoPE, multipliers",
    "stablehlo.divide": "temperature, rope frequencies, repetition penalty, softmax normalisation",
    "stablehlo.negate": "RoPE's sign-folded rotation, -inf fills",
    "stablehlo.abs": "isfinite (a row whose max logit is -inf) in the sampler's logsumexp",
    "stablehlo.power": "RMSNorm's mean of squares",
    "stablehlo.rsqrt": "RMSNorm (reciprocal square root of the mean square)",
    "stablehlo.exponential": "softmax, logsumexp, sampling probabilities",
    "stablehlo.log": "logsumexp, logprobs",
    "stablehlo.log_plus_one": "Llama4 attention temperature tuning (log1p)",
    "stablehlo.floor": "Llama4 attention temperature tuning (fp32 floor of positions / floor_scale)",
    "stablehlo.logistic": "sigmoid: SiLU activations, the Llama4 router",
    "stablehlo.sine": "RoPE tables computed from positions in the graph",
    "stablehlo.cosine": "RoPE tables computed from positions in the graph",
    "stablehlo.maximum": "amax, clamp, top-k merges",
    "stablehlo.minimum": "clamps and the merged top-k bounds of the sampler",
    "stablehlo.clamp": "index clamps in the sampler (inverse-CDF pick, suppression anchor)",
    "stablehlo.compare": "masks, top-p / min-p thresholds, greedy rows, vocab shard bounds",
    "stablehlo.and": "mask combination (causal & window & chunk)",
    "stablehlo.or": "mask combination",
    "stablehlo.not": "mask negation",
    # reductions
    "stablehlo.reduce": "sums, max, argmax (norms, softmax, logsumexp, greedy pick)",
    "stablehlo.reduce_window": "cumsum: the sampler's top-p prefix mass and inverse-CDF",
    "stablehlo.sort": "top-k (candidates, top logprobs, MoE routing) lowers to a sort",
    # tensor parallelism (collective_legalize.py; only at tp > 1)
    "stablehlo.all_reduce": "row-parallel linears, vocab-parallel embedding, global logsumexp / max",
    "stablehlo.all_gather": "per-rank top-k candidates and greedy picks, full logits (parity only)",
}

_F64 = re.compile(r"\bf64\b")


def violations(graph: LoweredGraph) -> list[str]:
    """Why ``graph`` may not go to neuronx-cc (empty: it may)."""
    problems: list[str] = []
    for op in sorted(graph.ops):
        if op.startswith(("torch.", "torch_c.")):
            problems.append(f"torch dialect op {op} left (the graph did not lower completely)")
        elif op not in ALLOWED:
            problems.append(f"op {op} is not on the allowlist (exec_service/runtime/neuron/op_allowlist.py)")
    line = next((ln.strip() for ln in graph.text.splitlines() if _F64.search(ln)), None)
    if line is not None:
        problems.append(f"f64 in the module (Neuron narrows it to f32): {line[:160]}")
    for name, why in graph.in_place.items():
        if why is not None:
            problems.append(f"input {name} is not updated in place: {why}")
    return problems
