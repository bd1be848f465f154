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

The mask's [B, S, K] makes every (kind, B, S, K) a distinct input-shape signature; S >= 2 for
context buckets keeps prefill and decode apart even at B = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from exec_service.model.decoder import DecoderModel
from exec_service.runtime.kv_cache import KVCache
from exec_service.runtime.sampling import NUM_PARAMS, TokenCounts, greedy_tokens, sample
from exec_service.runtime.step_io import INPUTS, StepInputs

CONTEXT = "ctx"
DECODE = "tkg"
KINDS = (CONTEXT, DECODE)

# each graph's positional arguments, in order (= StepGraph.forward / GreedyStepGraph.forward)
SAMPLER_INPUTS = ("input_ids", "positions", "slots", "mask", "last_idx", "params", "uniforms", "suppress_ids")
GREEDY_INPUTS = ("input_ids", "positions", "slots", "mask", "last_idx", "suppress_ids")
SAMPLER_OUTPUTS = ("tokens", "logprob", "top_ids", "top_logprobs")
GREEDY_OUTPUTS = ("tokens",)


@dataclass(frozen=True, order=True)
class GraphSpec:
    kind: str  # CONTEXT or DECODE
    batch: int
    seq: int
    kv_len: int
    suppress: int = 1  # M: width of the per-row suppressed-ids input (RuntimeConfig.max_suppressed_ids)
    greedy: bool = False  # the greedy-only sampler variant (token generation only; see above)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown graph kind {self.kind!r}")
        if self.greedy and self.kind != DECODE:
            raise ValueError("only token-generation graphs have a greedy variant")
        if self.kind == DECODE and self.seq != 1:
            raise ValueError("a token-generation graph has seq 1")
        if self.kind == CONTEXT and self.seq < 2:
            raise ValueError("a context-encoding graph has seq >= 2")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.kv_len < self.seq:
            raise ValueError(f"kv_len {self.kv_len} < seq {self.seq}")

    @property
    def name(self) -> str:
        name = f"{self.kind}_b{self.batch}_s{self.seq}_k{self.kv_len}"
        return f"{name}_greedy" if self.greedy else name

    def input_names(self) -> tuple[str, ...]:
        """The graph's inputs, in argument order (no params / uniforms for the greedy sampler)."""
        return GREEDY_INPUTS if self.greedy else SAMPLER_INPUTS

    def output_names(self) -> tuple[str, ...]:
        """The graph's outputs, in order, before the optional logits (``StepGraph.output_names``)."""
        return GREEDY_OUTPUTS if self.greedy else SAMPLER_OUTPUTS

    def dims(self) -> dict[str, int]:
        """Sizes of the symbols of ``step_io.INPUTS`` shapes."""
        return {"B": self.batch, "S": self.seq, "K": self.kv_len, "M": self.suppress, "P": NUM_PARAMS}

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
    return StepInputs(
        input_ids=torch.zeros(b, s, dtype=torch.int64, device=device),
        positions=pos,
        slots=torch.arange(b, dtype=torch.int64, device=device),
        mask=make_mask(pos, k),
        last_idx=torch.full((b,), s - 1, dtype=torch.int64, device=device),
        suppress_ids=torch.full((b, spec.suppress), -1, dtype=torch.int64, device=device),
        params=params if sampler else None,
        uniforms=torch.zeros(b, device=device) if sampler else None,
    )


def example_inputs(spec: GraphSpec, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """``example_step`` as the graph's positional arguments (``torch.export.export(graph, ...)``)."""
    return example_step(spec, device).args(spec)


class StepGraph(nn.Module):
    """One static-shape graph over a shared model, KV cache and token counts (a greedy spec gets a
    ``GreedyStepGraph``: same constructor, its own forward signature)."""

    def __init__(
        self,
        model: DecoderModel,
        cache: KVCache,
        counts: TokenCounts,
        spec: GraphSpec,
        num_candidates: int,
        num_top: int,
        return_logits: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.cache, self.counts, self.spec = model, cache, counts, spec
        self.num_candidates, self.num_top, self.return_logits = num_candidates, num_top, return_logits

    @property
    def gathers(self) -> bool:
        """Whether attention gathers its rows' cache slots (static, from the spec): every graph but a
        full-batch decode, whose row b is slot b (a view of the cache, no copy)."""
        return not (self.spec.kind == DECODE and self.spec.batch == self.cache.max_batch)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of what ``forward`` returns, in order (``StepOutputs.from_graph``)."""
        return (*self.spec.output_names(), "logits") if self.return_logits else self.spec.output_names()

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
        res = (out.tokens, out.logprob, out.top_ids, out.top_logprobs)
        return (*res, self.full_logits(logits)) if self.return_logits else res

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Debugging / parity tests: every rank's logits gathered, the unpadded vocab [B, V]."""
        return self.model.comm.all_gather(logits, -1)[:, : self.model.arch.vocab_size]


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


def graph_set(
    batch_buckets: tuple[int, ...],
    max_seq_len: int,
    context_buckets: tuple[int, ...],
    kv_buckets: tuple[int, ...],
    suppress: int = 1,
) -> list[GraphSpec]:
    """Every graph the engine can call: ctx (B, S, K) for each batch bucket and each chunk a prompt
    can be split into, and tkg (full and greedy) per batch bucket and KV bucket. Graphs are built
    lazily (``Runner.fn``): an unused variant costs nothing."""
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
