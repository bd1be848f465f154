"""Verifying draft tokens: the math of the speculation graph (DESIGN §5, the third graph), as pure
tensor code with fixed shapes — every row's drafts in one vectorised pass, greedy and sampled rows in
the same batch, no host sync, no data-dependent Python control flow.

A row of the verify graph is ``[t_0, d_1, ..., d_D]`` (S = D + 1 tokens): ``t_0`` the row's last
accepted token, ``d_j`` its drafts, of which the first ``num_drafts`` are real (the rest pad the
row). The target model's logits at window index i give p_{i+1}, the distribution of the token after
the window's token i, computed exactly as the token-generation graph would have computed it had the
tokens come one step at a time (``sampling.candidates`` with the counts of tokens 0..i and the row's
suppressed ids). Then, per row:

* greedy (temperature 0): d_j is accepted while it equals the best candidate of p_j; the next token
  is the best candidate of p_{a+1} — exactly the tokens greedy decoding produces one by one;
* sampled: d_j (drawn from the drafter's q_j) is accepted when u_j x q_j(d_j) < p_j(d_j), i.e. with
  probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the next token is drawn from the
  normalised residual max(0, p_j - q_j), and when every real draft is accepted the bonus token is
  drawn from p_{D'+1}. This is exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023):
  every output token has the distribution non-speculative sampling gives it. q is passed as the
  drafter's candidates (``draft_ids`` / ``draft_probs`` [B, D, Q]); an n-gram draft is one-hot (Q = 1,
  prob 1), for which the rule becomes "accept with probability p_j(d_j), else draw from p_j without
  d_j".

The uniforms are inputs (``draws`` [B, S], drawn on the host from the request's own generator):
``draws[:, j]`` decides draft j + 1, ``draws[:, S - 1]`` draws the final token with the same inverse
CDF as ``sample``, so a row with no drafts consumes one draw and gets the token-generation graph's
token. p is restricted to the global top ``num_candidates`` as in ``sample`` (a draft outside them
has p = 0 and is rejected).

Outputs: ``tokens`` [B, S] (the accepted drafts, then the correction / bonus token, then -1),
``num_accepted`` [B], and for the full variant the raw logprobs of every output position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exec_service.model.collectives import Collectives
from exec_service.runtime.sampling import candidates, greedy_tokens, inverse_cdf, raw_logprobs


@dataclass(frozen=True)
class VerifyOutput:
    tokens: torch.Tensor  # [B, S] int64: accepted drafts, then the correction / bonus token, then -1
    num_accepted: torch.Tensor  # [B] int64: accepted drafts (tokens[:, : num_accepted + 1] are output)
    logprob: torch.Tensor | None = None  # [B, S] raw logprob of each output token
    top_ids: torch.Tensor | None = None  # [B, S, n]
    top_logprobs: torch.Tensor | None = None  # [B, S, n]


def window_last_idx(num_drafts: torch.Tensor, seq: int) -> torch.Tensor:
    """[B] real drafts -> [B, S] the window index whose logits each position reads: i itself, clamped
    to the row's last real token (padding repeats it, so a row's rope "sequence length", read from
    its last selected token, is that of its real tokens)."""
    i = torch.arange(seq, device=num_drafts.device)[None]  # [1, S]
    return torch.minimum(i, num_drafts[:, None])


def accepted_prefix(accept: torch.Tensor, num_drafts: torch.Tensor) -> torch.Tensor:
    """[B, D] per-draft acceptance, [B] real drafts -> [B] int64: the length of the accepted prefix
    (a draft after a rejected or padded one is not accepted)."""
    d = accept.shape[-1]
    real = torch.arange(d, device=accept.device)[None] < num_drafts[:, None]  # [B, D]
    # drafts with no failure at or before them (a running count of failures; cumsum, not cumprod:
    # torch-mlir lowers cumsum to StableHLO, cumprod not)
    failures = torch.cumsum((~(accept & real)).to(torch.int64), dim=-1)
    return (failures == 0).sum(dim=-1)


def output_tokens(
    input_ids: torch.Tensor,  # [B, S]
    num_accepted: torch.Tensor,  # [B]
    final: torch.Tensor,  # [B] the correction / bonus token
) -> torch.Tensor:
    """[B, S]: the accepted drafts (input_ids[:, 1 : a + 1]), the final token at index a, then -1."""
    b, s = input_ids.shape
    i = torch.arange(s, device=input_ids.device)[None]  # [1, S]
    drafts = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)  # [B, S]
    a = num_accepted[:, None]
    out = torch.where(i < a, drafts, torch.full_like(drafts, -1))
    return torch.where(i == a, final[:, None].expand(b, s), out)


def verify_greedy(
    logits: torch.Tensor,  # [B, S, V_r]
    input_ids: torch.Tensor,  # [B, S]: t_0, d_1..d_D
    num_drafts: torch.Tensor,  # [B]
    suppress_ids: torch.Tensor,  # [B, M]
    vocab_offset: torch.Tensor,
    comm: Collectives,
    keep_logits: bool = False,
) -> VerifyOutput:
    """Greedy rows with neutral penalties (the ``tkg_*_greedy`` rule at every position): one argmax
    per position, drafts accepted while they equal it."""
    b, s, v = logits.shape
    best = greedy_tokens(  # [B * S] -> [B, S]
        logits.reshape(b * s, v), suppress_ids.repeat_interleave(s, dim=0), vocab_offset, comm, keep_logits
    ).view(b, s)
    a = accepted_prefix(input_ids[:, 1:] == best[:, :-1], num_drafts)
    final = best.gather(1, a[:, None])[:, 0]
    return VerifyOutput(output_tokens(input_ids, a, final), a)


def verify(
    logits: torch.Tensor,  # [B, S, V_r] float32
    input_ids: torch.Tensor,  # [B, S]: t_0, d_1..d_D
    num_drafts: torch.Tensor,  # [B] real drafts per row (0..D)
    params: torch.Tensor,  # [B, NUM_PARAMS]
    draws: torch.Tensor,  # [B, S] uniforms: draft acceptance (0..D-1), the final token (S-1)
    draft_ids: torch.Tensor,  # [B, D, Q] q_j's support (global ids; -1 = none)
    draft_probs: torch.Tensor,  # [B, D, Q] q_j on it (an n-gram draft: its token, prob 1)
    counts: torch.Tensor,  # [B, S, V_r] the counts each window position sees (TokenCounts.window)
    suppress_ids: torch.Tensor,  # [B, M]
    vocab_offset: torch.Tensor,
    comm: Collectives,
    num_candidates: int,
    num_top: int,
) -> VerifyOutput:
    b, s, v = logits.shape
    d = s - 1
    flat = logits.reshape(b * s, v)
    cand = candidates(
        flat,
        params.repeat_interleave(s, dim=0),
        counts.reshape(b * s, v),
        suppress_ids.repeat_interleave(s, dim=0),
        vocab_offset,
        comm,
        num_candidates,
    )
    c = cand.ids.shape[-1]
    ids = cand.ids.view(b, s, c)  # [B, S, C] p_{i+1}'s candidates, best first (same on every rank)
    w = cand.weights.view(b, s, c)  # [B, S, C] p_{i+1} x its total
    total = w.sum(dim=-1)  # [B, S]
    greedy = cand.greedy.view(b, s)[:, 0]  # [B]

    drafts = input_ids[:, 1:]  # [B, D]
    p_draft = (w[:, :d] * (ids[:, :d] == drafts[..., None])).sum(dim=-1) / total[:, :d]  # [B, D]
    q_draft = (draft_probs * (draft_ids == drafts[..., None])).sum(dim=-1)  # [B, D]
    accept_sampled = draws[:, :d] * q_draft < p_draft  # u < p / q, without dividing by q
    accept_greedy = drafts == ids[:, :d, 0]
    a = accepted_prefix(torch.where(greedy[:, None], accept_greedy, accept_sampled), num_drafts)  # [B]

    # the final token, drawn at window index a: from the residual max(0, p - q) after a rejection,
    # from p itself after the last real draft (the bonus token)
    at = a[:, None, None]
    ids_a = ids.gather(1, at.expand(b, 1, c))[:, 0]  # [B, C]
    w_a = w.gather(1, at.expand(b, 1, c))[:, 0]  # [B, C]
    q_at = a.clamp(max=d - 1)[:, None, None]  # a rejected draft's index (a < num_drafts <= D)
    q_ids = draft_ids.gather(1, q_at.expand(b, 1, draft_ids.shape[-1]))[:, 0]  # [B, Q]
    q_probs = draft_probs.gather(1, q_at.expand(b, 1, draft_probs.shape[-1]))[:, 0]  # [B, Q]
    q_on_cand = ((ids_a[:, :, None] == q_ids[:, None, :]) * q_probs[:, None, :]).sum(dim=-1)  # [B, C]
    residual = (w_a / w_a.sum(dim=-1, keepdim=True) - q_on_cand).clamp(min=0.0)
    # p <= q everywhere only when p == q (then no draft is ever rejected): rounding guard
    use_residual = (a < num_drafts) & (residual.sum(dim=-1) > 0)
    weights = torch.where(use_residual[:, None], residual, w_a)
    pick = inverse_cdf(weights, draws[:, s - 1])
    pick = torch.where(greedy, torch.zeros_like(pick), pick)
    final = ids_a.gather(1, pick[:, None])[:, 0]
    tokens = output_tokens(input_ids, a, final)

    logprob, top_ids, top_lp = raw_logprobs(
        flat, tokens.clamp(min=0).reshape(-1), vocab_offset, comm, num_top
    )
    n = top_ids.shape[-1]
    return VerifyOutput(tokens, a, logprob.view(b, s), top_ids.view(b, s, n), top_lp.view(b, s, n))
