"""On-device sampling: pure tensor code inside the step graph (DESIGN §5).

Per row, from a params tensor ``[B, NUM_PARAMS]`` (columns ``PARAM_FIELDS``) and a uniform draw
``[B]`` made on the host from the request's own seeded generator (so a row's token never depends on
what else is batched). Order, as transformers' logits processors apply it: penalties (over the
per-slot counts of prompt + fed-back generated tokens) -> temperature -> top-k -> top-p -> min-p,
then inverse-CDF over the sorted candidates (no ``torch.multinomial``: it cannot be traced on Neuron).

Candidates: each rank takes the top ``num_candidates`` of its vocab shard (values + global ids from
the rank tensor), the ranks all-gather and merge, so every rank picks the same token. Sampling is
therefore restricted to the global top ``num_candidates`` tokens; probabilities for top-p / min-p are
normalised over the full vocabulary (a global logsumexp), so top-p is exact whenever the nucleus fits
in the candidates. Temperature 0 = greedy (the best candidate).

Logprobs are of the model's raw distribution (after ``logits_scaling``, before penalties and
temperature): the chosen token's, and the global top ``num_top`` (merged the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from exec_service.model.collectives import Collectives

PARAM_FIELDS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
NUM_PARAMS = len(PARAM_FIELDS)
NEUTRAL_PARAMS = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0)  # greedy, no filtering, no penalties


class TokenCounts(nn.Module):
    """Per-slot occurrence counts of this rank's vocab shard: float32 [max_batch + 1, V_r] (graph
    state; the last row is the KV cache's pad slot, written by padding rows only)."""

    def __init__(self, max_batch: int, vocab_per_rank: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.vocab_per_rank = vocab_per_rank
        self.register_buffer(
            "counts", torch.zeros(max_batch + 1, vocab_per_rank, device=device), persistent=False
        )

    def update(
        self,
        slots: torch.Tensor,  # [B]
        input_ids: torch.Tensor,  # [B, S]
        positions: torch.Tensor,  # [B, S]
        valid: torch.Tensor,  # [B, S] bool: real (not padding) tokens
        vocab_offset: torch.Tensor,  # [1] int64
    ) -> torch.Tensor:
        """Add the fed tokens to their slots' counts (a row whose first position is 0 starts afresh);
        returns the updated rows [B, V_r]."""
        keep = (positions[:, :1] != 0).to(self.counts.dtype)  # [B, 1]
        rows = self.counts.index_select(0, slots) * keep
        local = input_ids - vocab_offset
        inside = valid & (local >= 0) & (local < self.vocab_per_rank)
        local = torch.where(inside, local, torch.zeros_like(local))
        rows = rows.scatter_add(1, local, inside.to(rows.dtype))
        self.counts.index_copy_(0, slots, rows)
        return rows

    def window(
        self,
        slots: torch.Tensor,  # [B]
        input_ids: torch.Tensor,  # [B, S]
        positions: torch.Tensor,  # [B, S]
        valid: torch.Tensor,  # [B, S] bool: real (not padding) tokens
        vocab_offset: torch.Tensor,  # [1] int64
    ) -> torch.Tensor:
        """The counts each position of a multi-token window sees, without storing them: [B, S, V_r],
        row b at window index i = the slot's counts + the fed tokens 0..i (what ``update`` would
        have returned had the tokens come one step at a time). ``store`` keeps the chosen ones."""
        keep = (positions[:, :1] != 0).to(self.counts.dtype)  # [B, 1]
        rows = self.counts.index_select(0, slots) * keep  # [B, V_r]
        local = input_ids - vocab_offset
        inside = valid & (local >= 0) & (local < self.vocab_per_rank)
        local = torch.where(inside, local, torch.zeros_like(local))
        b, s = input_ids.shape
        # one entry per (row, position): a scatter without collisions, then a running sum over S
        fed = torch.zeros(b, s, self.vocab_per_rank, dtype=rows.dtype, device=rows.device)
        fed = fed.scatter(2, local[..., None], inside[..., None].to(rows.dtype))
        return rows[:, None] + fed.cumsum(dim=1)

    def store(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """counts[slots[b]] = rows[b] ([B, V_r]; in place)."""
        self.counts.index_copy_(0, slots, rows)


@dataclass(frozen=True)
class SampleOutput:
    tokens: torch.Tensor  # [B] int64 global ids
    logprob: torch.Tensor  # [B] float32 raw logprob of the chosen token
    top_ids: torch.Tensor  # [B, n] int64
    top_logprobs: torch.Tensor  # [B, n] float32
    # the distribution the token was drawn from (``candidates``), normalised: a draft model's q
    cand_ids: torch.Tensor | None = None  # [B, C] int64
    cand_probs: torch.Tensor | None = None  # [B, C] float32


def suppress_(x: torch.Tensor, suppress_ids: torch.Tensor, vocab_offset: torch.Tensor) -> torch.Tensor:
    """Set x[b, id] = -inf in place for the [B, M] global ids of this rank's shard (-1 = none).

    One plain scatter of M values per row (no [B, V] mask, and no scatter-reduce: torch-mlir cannot
    lower ``scatter_reduce`` to StableHLO). An id outside the shard must still write somewhere: it
    writes to the row's *anchor* column the value every other writer of that column writes — a
    suppressed column and -inf when the row has one, else column 0 and its own value — so duplicate
    indices always carry equal values and the scatter's order does not matter."""
    local = suppress_ids - vocab_offset  # [B, M]
    inside = (local >= 0) & (local < x.shape[-1])
    top = torch.where(inside, local, -1).amax(dim=-1, keepdim=True)  # [B, 1] a suppressed column or -1
    anchor = top.clamp(min=0)
    kept = x.gather(1, anchor)  # [B, 1]
    neg_inf = torch.full_like(kept, float("-inf"))
    val = torch.where(inside | (top >= 0), neg_inf, kept)  # [B, M]
    return x.scatter_(1, torch.where(inside, local, anchor), val)


def greedy_tokens(
    logits: torch.Tensor,  # [B, V_r]
    suppress_ids: torch.Tensor,  # [B, M] global ids that must not be chosen (-1 = none)
    vocab_offset: torch.Tensor,  # [1] int64
    comm: Collectives,
    keep_logits: bool = False,  # False: ``logits`` may be overwritten
) -> torch.Tensor:
    """The greedy token [B] (global ids): what ``sample`` picks for a greedy row with neutral
    penalties, as one argmax (first maximum, as transformers' greedy search) instead of a top-k."""
    x = suppress_(logits.clone() if keep_logits else logits, suppress_ids, vocab_offset)
    idx = x.argmax(dim=-1, keepdim=True)  # [B, 1]
    ids = idx + vocab_offset
    if comm.tp > 1:  # each rank's best, then the best of the ranks (the lowest id on a tie)
        vals = comm.all_gather(x.gather(-1, idx), -1)  # [B, tp]
        ids = comm.all_gather(ids, -1).gather(-1, vals.argmax(dim=-1, keepdim=True))
    return ids[:, 0]


def _global_lse(x: torch.Tensor, comm: Collectives) -> torch.Tensor:
    """logsumexp over the full (sharded) vocab, [B, 1]."""
    m = comm.all_reduce(x.amax(dim=-1, keepdim=True), "max")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = comm.all_reduce(torch.exp(x - m).sum(dim=-1, keepdim=True))
    return m + torch.log(s)


def _merged_topk(
    x: torch.Tensor, k: int, vocab_offset: torch.Tensor, comm: Collectives
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k over the sharded vocab: (values [B, k'], global ids [B, k']), sorted descending,
    identical on every rank. k' = min(k, V_r * tp)."""
    kl = min(k, x.shape[-1])
    vals, idx = torch.topk(x, kl, dim=-1)
    ids = idx + vocab_offset
    if comm.tp == 1:
        return vals, ids
    vals, ids = comm.all_gather(vals, -1), comm.all_gather(ids, -1)
    vals, order = torch.topk(vals, min(k, vals.shape[-1]), dim=-1)
    return vals, ids.gather(-1, order)


@dataclass(frozen=True)
class Candidates:
    """The filtered sampling distribution of each row, restricted to the global top candidates:
    ``ids`` [R, C] global ids sorted by descending (penalised, tempered) logit, identical on every
    rank; ``weights`` [R, C] their probabilities after top-k / top-p / min-p (0 = filtered out), not
    renormalised (a row's distribution is weights / weights.sum(-1)); ``greedy`` [R] bool (greedy
    rows pick ``ids[:, 0]``)."""

    ids: torch.Tensor
    weights: torch.Tensor
    greedy: torch.Tensor


def candidates(
    logits: torch.Tensor,  # [R, V_r] float32, padded vocab = -inf (not modified)
    params: torch.Tensor,  # [R, NUM_PARAMS] float32
    counts: torch.Tensor,  # [R, V_r] occurrences of each token in the row's sequence so far
    suppress_ids: torch.Tensor,  # [R, M] int64 global ids that must not be sampled (-1 = none)
    vocab_offset: torch.Tensor,  # [1] int64
    comm: Collectives,
    num_candidates: int,
) -> Candidates:
    """Penalties -> suppressed ids -> temperature -> merged top ``num_candidates`` -> top-k ->
    top-p -> min-p: the distribution ``sample`` draws from (and the speculation verify graph's p)."""
    temperature, top_k, top_p, min_p, rep, presence, frequency = params.unbind(-1)

    # penalties, over the tokens seen so far in this sequence (prompt + generated)
    seen = counts > 0
    rep = rep[:, None]
    x = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    x = x - presence[:, None] * seen.to(x.dtype) - frequency[:, None] * counts
    x = suppress_(x, suppress_ids, vocab_offset)  # min_new_tokens (x is this function's own tensor)
    greedy = temperature <= 0  # [R]
    x = x / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]

    cand, cand_ids = _merged_topk(x, num_candidates, vocab_offset, comm)  # [R, C]
    c = cand.shape[-1]
    rank_pos = torch.arange(c, device=x.device)[None]  # [1, C]
    # top-k (0 = off): renormalise over the kept candidates; otherwise over the full vocab
    use_k = (top_k > 0) & (top_k < c)
    keep = ~use_k[:, None] | (rank_pos < top_k[:, None])
    cand = cand.masked_fill(~keep, float("-inf"))
    lse_k = torch.logsumexp(cand, dim=-1, keepdim=True)
    lse = torch.where(use_k[:, None], lse_k, _global_lse(x, comm))
    probs = torch.exp(cand - lse)  # [R, C], sorted descending
    # top-p: keep the smallest prefix whose mass reaches top_p (always the first)
    before = torch.cumsum(probs, dim=-1) - probs
    keep = keep & (before < top_p[:, None])
    # min-p: relative to the most likely token
    keep = keep & (probs >= min_p[:, None] * probs[:, :1])
    return Candidates(cand_ids, probs * keep.to(probs.dtype), greedy)


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[R, C] non-negative weights (any scale), [R] uniforms in [0, 1) -> [R] the index of the first
    candidate whose cumulative weight exceeds u x total (no ``torch.multinomial``)."""
    cdf = torch.cumsum(weights, dim=-1)
    target = uniforms[:, None] * cdf[:, -1:]
    return (cdf <= target).sum(dim=-1).clamp(max=weights.shape[-1] - 1)


def raw_logprobs(
    logits: torch.Tensor,  # [R, V_r]
    tokens: torch.Tensor,  # [R] global ids
    vocab_offset: torch.Tensor,
    comm: Collectives,
    num_top: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprobs of the model's raw distribution: the tokens' [R], and the global top ``num_top``
    (ids [R, n], logprobs [R, n])."""
    raw_lse = _global_lse(logits, comm)  # [R, 1]
    local = tokens[:, None] - vocab_offset
    inside = (local >= 0) & (local < logits.shape[-1])
    chosen = logits.gather(-1, torch.where(inside, local, torch.zeros_like(local)))
    chosen = comm.all_reduce(torch.where(inside, chosen, torch.zeros_like(chosen)))
    top_vals, top_ids = _merged_topk(logits, num_top, vocab_offset, comm)
    return (chosen - raw_lse)[:, 0], top_ids, top_vals - raw_lse


def sample(
    logits: torch.Tensor,  # [B, V_r] float32, padded vocab = -inf
    params: torch.Tensor,  # [B, NUM_PARAMS] float32
    uniforms: torch.Tensor,  # [B] float32 in [0, 1)
    counts: torch.Tensor,  # [B, V_r] occurrences of each token in the row's sequence so far
    suppress_ids: torch.Tensor,  # [B, M] int64 global ids that must not be sampled (-1 = none)
    vocab_offset: torch.Tensor,  # [1] int64
    comm: Collectives,
    num_candidates: int,
    num_top: int,
) -> SampleOutput:
    cand = candidates(logits, params, counts, suppress_ids, vocab_offset, comm, num_candidates)
    pick = inverse_cdf(cand.weights, uniforms)
    pick = torch.where(cand.greedy, torch.zeros_like(pick), pick)
    tokens = cand.ids.gather(-1, pick[:, None])[:, 0]
    logprob, top_ids, top_logprobs = raw_logprobs(logits, tokens, vocab_offset, comm, num_top)
    probs = cand.weights / cand.weights.sum(dim=-1, keepdim=True)
    return SampleOutput(tokens, logprob, top_ids, top_logprobs, cand.ids, probs)
