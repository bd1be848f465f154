"""The static-shape step graphs (DESIGN §5) and their input-shape signatures.

Every graph is ONE pure function of its tensor inputs (plus the cache / count buffers it updates).
Its positional arguments are the step inputs its spec names (``GraphSpec.input_names()``; dtypes and
symbolic shapes in ``step_io.INPUTS``), its outputs those ``StepGraph.output_names`` names; the engine
and executors pass them as ``step_io.StepInputs`` / ``StepOutputs``:

    full sampler: (input_ids [B,S] i64, positions [B,S] i64, slots [B] i64, mask [B,S,K] bool,
                   last_idx [B] i64, params [B,NUM_PARAMS] f32, uniforms [B] f32, suppress_ids [B,M] i64)
      -> (tokens [B] i64, logprob [B] f32, top_ids [B,n] i64, top_logprobs [B,n] f32[, logits [B,V]])

* context encoding ``ctx`` (B=batch bucket, S=context bucket >= 2, K=KV bucket >= start+S): one
  prefill chunk per row (a prompt, or one chunk of a longer one), each row its own slot (``slots``),
  attending to that slot's cache prefix [:K]; prompts arriving together are prefilled together;
* token generation ``tkg`` (B=batch bucket, S=1, K=KV bucket): one token per running sequence, each
  row addressing its slot through ``slots`` (the cache rows of those slots are gathered), except in
  the largest bucket (B = max_batch), where row b is slot b and the cache is read as a view;
* rows that pad a step up to its bucket use the cache's pad slot (``KVCache.pad_slot``) and are
  never read back;
* greedy token generation ``tkg_..._greedy``: the same step for a batch whose every row is greedy
  with neutral penalties and wants no logprobs (the host picks it, ``engine._decode``). Its sampler
  is one argmax after the suppressed ids (no penalties, no candidate top-k, no logsumexps, no token
  counts update: ~15 fewer full-vocab passes per step). It takes no params / uniforms inputs, so its
  input signature (6 inputs) differs from the full graph's (8), and returns ``(tokens[, logits])``.

* speculation ``spec`` (B=batch bucket, S=k+1 for k speculative tokens, K=KV bucket): the verify
  graph. Each row is its last accepted token and up to k draft tokens (``num_drafts`` real ones, the
  rest padding), written to the cache at their positions; the graph computes in one pass which drafts
  the target model accepts and the token after them (``runtime/speculation.py``: greedy rows by
  argmax, sampled rows by exact speculative sampling against the drafter's q, ``draft_ids`` /
  ``draft_probs`` [B, k, Q]) and returns ``tokens [B, S]`` (accepted drafts, then the correction or
  bonus token, then -1) and ``num_accepted [B]`` (+ the logprobs of every output position). Its
  uniforms are ``draws [B, S]``. ``spec_..._greedy``: for all-greedy batches with neutral penalties
  (6 inputs, no params, draws or q; returns ``tokens, num_accepted``). K/V written at positions of
  rejected or padding drafts is never read: attention masks by position, and the next step writes
  those positions again before any query reaches them.

The mask's [B, S, K] makes every (kind, B, S, K) a distinct input-shape signature; S >= 2 for
context buckets keeps prefill and decode apart even at B = 1; the verify graphs' inputs differ from
a context graph's in number (10 or 6 against 8) and in the [B, S] draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from exec_service.model.decoder import DecoderModel
from exec_service.runtime.kv_cache import KVCache
from exec_service.runtime.sampling import NUM_PARAMS, TokenCounts, greedy_tokens, sample
from exec_service.runtime.speculation import verify, verify_greedy, window_last_idx
from exec_service.runtime.step_io import INPUTS, StepInputs

CONTEXT = "ctx"
DECODE = "tkg"
SPECULATE = "spec"
KINDS = (CONTEXT, DECODE, SPECULATE)

# each graph's positional arguments, in order (= StepGraph.forward / GreedyStepGraph.forward)
SAMPLER_INPUTS = ("input_ids", "positions", "slots", "mask", "last_idx", "params", "uniforms", "suppress_ids")
GREEDY_INPUTS = ("input_ids", "positions", "slots", "mask", "last_idx", "suppress_ids")
SAMPLER_OUTPUTS = ("tokens", "logprob", "top_ids", "top_logprobs")
GREEDY_OUTPUTS = ("tokens",)
SPEC_INPUTS = (
    "input_ids",
    "positions",
    "slots",
    "mask",
    "num_drafts",
    "params",
    "draws",
    "draft_ids",
    "draft_probs",
    "suppress_ids",
)
SPEC_GREEDY_INPUTS = ("input_ids", "positions", "slots", "mask", "num_drafts", "suppress_ids")
SPEC_OUTPUTS = ("tokens", "num_accepted", "logprob", "top_ids", "top_logprobs")
SPEC_GREEDY_OUTPUTS = ("tokens", "num_accepted")


@dataclass(frozen=True, order=True)
class GraphSpec:
    kind: str  # CONTEXT, DECODE or SPECULATE
    batch: int
    seq: int
    kv_len: int
    suppress: int = 1  # M: width of the per-row suppressed-ids input (RuntimeConfig.max_suppressed_ids)
    greedy: bool = False  # the greedy-only sampler variant (token generation, speculation; see above)
    # Q: width of the drafter's q per draft (full verify graphs only: 1 for n-gram drafts, the draft
    # model's candidates for a draft model); 0 elsewhere
    draft_width: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown graph kind {self.kind!r}")
        if self.greedy and self.kind == CONTEXT:
            raise ValueError("only token-generation and speculation graphs have a greedy variant")
        if self.kind == DECODE and self.seq != 1:
            raise ValueError("a token-generation graph has seq 1")
        if self.kind in (CONTEXT, SPECULATE) and self.seq < 2:
            raise ValueError(f"a {self.kind} graph has seq >= 2")
        wants_q = self.kind == SPECULATE and not self.greedy
        if wants_q != (self.draft_width >= 1) or self.draft_width < 0:
            raise ValueError(
                f"draft_width {self.draft_width}: >= 1 for a full speculation graph, 0 for any other"
            )
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.kv_len < self.seq:
            raise ValueError(f"kv_len {self.kv_len} < seq {self.seq}")

    @property
    def name(self) -> str:
        name = f"{self.kind}_b{self.batch}_s{self.seq}_k{self.kv_len}"
        if self.draft_width > 1:
            name += f"_q{self.draft_width}"
        return f"{name}_greedy" if self.greedy else name

    def input_names(self) -> tuple[str, ...]:
        """The graph's inputs, in argument order (no params / uniforms for the greedy sampler)."""
        if self.kind == SPECULATE:
            return SPEC_GREEDY_INPUTS if self.greedy else SPEC_INPUTS
        return GREEDY_INPUTS if self.greedy else SAMPLER_INPUTS

    def output_names(self) -> tuple[str, ...]:
        """The graph's outputs, in order, before the optional logits (``StepGraph.output_names``)."""
        if self.kind == SPECULATE:
            return SPEC_GREEDY_OUTPUTS if self.greedy else SPEC_OUTPUTS
        return GREEDY_OUTPUTS if self.greedy else SAMPLER_OUTPUTS

    def dims(self) -> dict[str, int]:
        """Sizes of the symbols of ``step_io.INPUTS`` shapes."""
        return {
            "B": self.batch,
            "S": self.seq,
            "K": self.kv_len,
            "M": self.suppress,
            "P": NUM_PARAMS,
            "D": self.seq - 1,
            "Q": self.draft_width,
        }

    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        dims = self.dims()
        return tuple(INPUTS[name].shape(dims) for name in self.input_names())


def make_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[B, S] positions -> [B, S, K] bool: token at position p attends cache positions <= p."""
    j = torch.arange(kv_len, device=positions.device)
    return j[None, None, :] <= positions[:, :, None]


def example_step(spec: GraphSpec, device: torch.device | str = "cpu") -> StepInputs:
    """Valid dummy inputs of graph ``spec`` (export, compile warm-up)."""
    b, s, k = spec.batch, spec.seq, spec.kv_len
    pos = torch.arange(s, device=device).expand(b, s).contiguous()
    params = torch.zeros(b, NUM_PARAMS, device=device)
    params[:, 2] = 1.0  # top_p
    params[:, 4] = 1.0  # repetition_penalty
    sampler = "params" in spec.input_names()
    ids = torch.zeros(b, s, dtype=torch.int64, device=device)
    sup = torch.full((b, spec.suppress), -1, dtype=torch.int64, device=device)
    if spec.kind == SPECULATE:  # every draft real: the one-hot q of n-gram drafts of token 0
        d, q = s - 1, spec.draft_width
        return StepInputs(
            input_ids=ids,
            positions=pos,
            slots=torch.arange(b, dtype=torch.int64, device=device),
            mask=make_mask(pos, k),
            num_drafts=torch.full((b,), d, dtype=torch.int64, device=device),
            suppress_ids=sup,
            params=params if sampler else None,
            draws=torch.zeros(b, s, device=device) if sampler else None,
            draft_ids=torch.zeros(b, d, q, dtype=torch.int64, device=device) if sampler else None,
            draft_probs=torch.ones(b, d, q, device=device) / max(q, 1) if sampler else None,
        )
    return StepInputs(
        input_ids=ids,
        positions=pos,
        slots=torch.arange(b, dtype=torch.int64, device=device),
        mask=make_mask(pos, k),
        last_idx=torch.full((b,), s - 1, dtype=torch.int64, device=device),
        suppress_ids=sup,
        params=params if sampler else None,
        uniforms=torch.zeros(b, device=device) if sampler else None,
    )


def example_inputs(spec: GraphSpec, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """``example_step`` as the graph's positional arguments (``torch.export.export(graph, ...)``)."""
    return example_step(spec, device).args(spec)


class StepGraph(nn.Module):
    """One static-shape graph over a shared model, KV cache and token counts (a greedy spec gets a
    ``GreedyStepGraph``, a speculation spec a ``SpecGraph`` / ``GreedySpecGraph``: same constructor,
    their own forward signatures; ``graph_module(spec)`` picks)."""

    def __init__(
        self,
        model: DecoderModel,
        cache: KVCache,
        counts: TokenCounts,
        spec: GraphSpec,
        num_candidates: int,
        num_top: int,
        return_logits: bool = False,
        return_candidates: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.cache, self.counts, self.spec = model, cache, counts, spec
        self.num_candidates, self.num_top, self.return_logits = num_candidates, num_top, return_logits
        # the full sampler also returns the distribution it drew from (a draft model's q)
        self.return_candidates = return_candidates and spec.kind != SPECULATE and not spec.greedy

    @property
    def gathers(self) -> bool:
        """Whether attention gathers its rows' cache slots (static, from the spec): every graph but a
        full-batch decode or verify, whose row b is slot b (a view of the cache, no copy)."""
        return not (self.spec.kind in (DECODE, SPECULATE) and self.spec.batch == self.cache.max_batch)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of what ``forward`` returns, in order (``StepOutputs.from_graph``)."""
        names = self.spec.output_names()
        if self.return_candidates:
            names = (*names, "cand_ids", "cand_probs")
        return (*names, "logits") if self.return_logits else names

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor,
        last_idx: torch.Tensor,
        params: torch.Tensor,
        uniforms: torch.Tensor,
        suppress_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        m = self.model
        logits = m(input_ids, positions, slots, mask, last_idx, self.cache, self.gathers)  # [B, V_r]
        valid = torch.arange(input_ids.shape[1], device=input_ids.device)[None] <= last_idx[:, None]
        counts = self.counts.update(slots, input_ids, positions, valid, m.vocab_offset())
        out = sample(
            logits,
            params,
            uniforms,
            counts,
            suppress_ids,
            m.vocab_offset(),
            m.comm,
            self.num_candidates,
            self.num_top,
        )
        res: tuple[torch.Tensor, ...] = (out.tokens, out.logprob, out.top_ids, out.top_logprobs)
        if self.return_candidates:
            assert out.cand_ids is not None and out.cand_probs is not None
            res = (*res, out.cand_ids, out.cand_probs)
        return (*res, self.full_logits(logits)) if self.return_logits else res

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Debugging / parity tests: every rank's logits gathered, the unpadded vocab [B, V] (or
        [B, S, V] for a verify graph)."""
        return self.model.comm.all_gather(logits, -1)[..., : self.model.arch.vocab_size]


class GreedyStepGraph(StepGraph):
    """Token generation for an all-greedy batch with neutral penalties: argmax over the logits with
    the suppressed ids masked. Token counts are not updated: only penalties read them, no row of
    this batch has any, and a request's sampling params never change; a row with penalties only
    ever runs in the full graphs, whose prefill from position 0 resets its slot's counts."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor,
        last_idx: torch.Tensor,
        suppress_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        m = self.model
        logits = m(input_ids, positions, slots, mask, last_idx, self.cache, self.gathers)  # [B, V_r]
        tokens = greedy_tokens(logits, suppress_ids, m.vocab_offset(), m.comm, self.return_logits)
        return (tokens, self.full_logits(logits)) if self.return_logits else (tokens,)


class SpecGraph(StepGraph):
    """The verify graph (speculation): see the module docstring and ``runtime/speculation.py``.
    Token counts: every window position sees the counts of the tokens before it; the slot keeps the
    counts up to the last accepted draft (the correction token is fed by the next step, as a
    sampled token is)."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,  # [B, S]: last accepted token, drafts
        positions: torch.Tensor,  # [B, S]
        slots: torch.Tensor,  # [B]
        mask: torch.Tensor,  # [B, S, K]
        num_drafts: torch.Tensor,  # [B]
        params: torch.Tensor,  # [B, P]
        draws: torch.Tensor,  # [B, S]
        draft_ids: torch.Tensor,  # [B, D, Q]
        draft_probs: torch.Tensor,  # [B, D, Q]
        suppress_ids: torch.Tensor,  # [B, M]
    ) -> tuple[torch.Tensor, ...]:
        m = self.model
        b, s = input_ids.shape
        last = window_last_idx(num_drafts, s)  # [B, S]
        logits = m(input_ids, positions, slots, mask, last, self.cache, self.gathers)  # [B, S, V_r]
        valid = torch.arange(s, device=input_ids.device)[None] <= num_drafts[:, None]  # [B, S]
        counts = self.counts.window(slots, input_ids, positions, valid, m.vocab_offset())  # [B, S, V_r]
        out = verify(
            logits,
            input_ids,
            num_drafts,
            params,
            draws,
            draft_ids,
            draft_probs,
            counts,
            suppress_ids,
            m.vocab_offset(),
            m.comm,
            self.num_candidates,
            self.num_top,
        )
        at = out.num_accepted[:, None, None].expand(b, 1, counts.shape[-1])
        self.counts.store(slots, counts.gather(1, at)[:, 0])
        assert out.logprob is not None and out.top_ids is not None and out.top_logprobs is not None
        res = (out.tokens, out.num_accepted, out.logprob, out.top_ids, out.top_logprobs)
        return (*res, self.full_logits(logits)) if self.return_logits else res


class GreedySpecGraph(StepGraph):
    """The verify graph for an all-greedy batch with neutral penalties: one argmax per position
    (the ``tkg_*_greedy`` rule), no token counts update (see ``GreedyStepGraph``)."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor,
        num_drafts: torch.Tensor,
        suppress_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        m = self.model
        last = window_last_idx(num_drafts, input_ids.shape[1])
        logits = m(input_ids, positions, slots, mask, last, self.cache, self.gathers)  # [B, S, V_r]
        out = verify_greedy(
            logits, input_ids, num_drafts, suppress_ids, m.vocab_offset(), m.comm, self.return_logits
        )
        res = (out.tokens, out.num_accepted)
        return (*res, self.full_logits(logits)) if self.return_logits else res


def graph_module(spec: GraphSpec) -> type[StepGraph]:
    """The module class that runs ``spec`` (one forward signature per input-name tuple)."""
    if spec.kind == SPECULATE:
        return GreedySpecGraph if spec.greedy else SpecGraph
    return GreedyStepGraph if spec.greedy else StepGraph


def graph_set(
    batch_buckets: tuple[int, ...],
    max_seq_len: int,
    context_buckets: tuple[int, ...],
    kv_buckets: tuple[int, ...],
    suppress: int = 1,
    speculative_tokens: int = 0,
    draft_width: int = 1,
) -> list[GraphSpec]:
    """Every graph the engine can call: ctx (B, S, K) for each batch bucket and each chunk a prompt
    can be split into, tkg (full and greedy) per batch bucket and KV bucket, and with
    ``speculative_tokens`` k > 0 the verify graphs spec (S = k + 1, full and greedy) per batch bucket
    and KV bucket >= S. Graphs are built lazily (``Runner.fn``): an unused variant costs nothing."""
    specs: set[GraphSpec] = set()
    largest = max(context_buckets)
    for b in batch_buckets:
        for start in range(0, max_seq_len, largest):
            for s in context_buckets:
                if start + s <= max_seq_len:
                    specs.add(GraphSpec(CONTEXT, b, s, kv_bucket(kv_buckets, start + s), suppress))
        for k in kv_buckets:
            specs.add(GraphSpec(DECODE, b, 1, k, suppress))
            specs.add(GraphSpec(DECODE, b, 1, k, suppress, greedy=True))
            s = speculative_tokens + 1
            if speculative_tokens and k >= s:
                specs.add(GraphSpec(SPECULATE, b, s, k, suppress, draft_width=draft_width))
                specs.add(GraphSpec(SPECULATE, b, s, k, suppress, greedy=True))
    return sorted(specs)


def kv_bucket(kv_buckets: tuple[int, ...], needed: int) -> int:
    for k in kv_buckets:
        if k >= needed:
            return k
    raise ValueError(f"no KV bucket holds {needed} positions (largest {kv_buckets[-1]})")


def context_bucket(context_buckets: tuple[int, ...], n: int) -> int:
    for s in context_buckets:
        if s >= n:
            return s
    return context_buckets[-1]
