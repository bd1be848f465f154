"""The engine: continuous batching over the static step graphs (token level; no text).

A ``step()`` = (1) free the slots of aborted requests, (2) admit waiting requests into free slots,
(3) one batched prefill: the next chunk (at most the largest context bucket) of every sequence being
prefilled, oldest first, as many as fit ``max_prefill_tokens`` (B x S padded tokens; at least one) —
so a burst of prompts is encoded together and a long prompt holds the running streams for one chunk
per step, never its whole length; a final chunk samples the sequence's first token — (4) one
token-generation step for every running sequence (those whose prefill just finished included).
With speculation on (``RuntimeConfig.speculation``), step (4) first asks the drafter
(``engine/drafting.py``) for up to k drafts per row; if any row has some, the step is one verify
graph for every running row (rows without drafts carry none and get one token, as from token
generation), else the plain token-generation graph. Each row's drafts are capped so that
max_new_tokens, the context length, min_new_tokens' suppressed ids and the length-dependent rope
tables (longrope, dynamic) hold exactly as if its tokens came one step at a time.
Each graph call runs in the smallest batch bucket that holds its rows (``RuntimeConfig.batch_buckets``;
padding rows use the cache's pad slot). Requests join and leave between steps; a finished request's
slot is free for the next step.

Batch invariance: a request's uniforms come from its own ``torch.Generator(seed)``, one draw per
token it samples (a verify step: one per draft, then one for the final token; a draft model's
samples draw from it too), so the same request with the same seed yields the same tokens whatever
else runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from exec_service.engine.drafting import (
    NO_DRAFTS,
    Adaptive,
    AdaptivePolicy,
    Drafter,
    DraftRequest,
    NgramDrafter,
    Proposal,
    VerifyCost,
)
from exec_service.engine.limits import EngineLimits, check_request
from exec_service.engine.types import (
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
    SpeculationStats,
    TokenLogprob,
)
from exec_service.model.loading import ShardSource
from exec_service.model.rope import check_serving_shape
from exec_service.runtime.executor import LocalExecutor, TPExecutor
from exec_service.runtime.graphs import (
    CONTEXT,
    DECODE,
    SPECULATE,
    GraphSpec,
    context_bucket,
    example_step,
    kv_bucket,
    make_mask,
)
from exec_service.runtime.runner import RuntimeConfig
from exec_service.runtime.sampling import NEUTRAL_PARAMS, NUM_PARAMS
from exec_service.runtime.step_io import StepInputs, StepOutputs
from shared.shapes import bucket_for


@dataclass
class _Seq:
    request_id: str
    request: Request
    seed: int
    generator: torch.Generator
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    # while prefilling: the tokens being encoded (the prompt; for a longrope re-encode also what it
    # generated) and how many of them are in the cache; None once decoding
    encoding: list[int] | None = None
    encoded: int = 0
    adaptive: Adaptive | None = None  # speculation on, adaptively: when this row drafts

    @property
    def total_len(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.generated)

    def tokens(self) -> list[int]:
        return [*self.request.prompt_token_ids, *self.generated]


@dataclass
class _Pending:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


class Engine:
    """Token-level generation engine over one model artifact (all TP ranks)."""

    def __init__(
        self,
        source: ShardSource,
        config: RuntimeConfig | None = None,
        eos_token_ids: Iterable[int] | None = None,
        *,
        draft_source: ShardSource | None = None,
        drafter: Drafter | None = None,
        adaptive: AdaptivePolicy | None = AdaptivePolicy(),
    ) -> None:
        """Speculation (``config.speculation``): ``ngram`` drafts by prompt lookup; ``draft`` runs
        ``draft_source`` (a tp 1 artifact with this model's vocabulary) as the drafter; ``drafter``
        replaces either (tests). ``adaptive`` None: every row drafts whenever it can."""
        config = config or RuntimeConfig()
        self.arch, self.target = source.arch, source.target
        self.eos_token_ids = frozenset(self.arch.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.config = config
        self.tp = self.target.tp_degree
        self._rope_switch_len = _longrope_switch_len(self.arch, config)
        check_serving_shape(self.arch, config.max_seq_len, config.context_buckets[-1])  # rope: dynamic
        self.limits = EngineLimits(
            max_seq_len=config.max_seq_len,
            vocab_size=self.arch.vocab_size,
            max_top_logprobs=config.num_top_logprobs,
            max_suppressed_ids=config.max_suppressed_ids,
            eos_token_ids=self.eos_token_ids,
        )
        self._adaptive = adaptive
        self._verify_cost = VerifyCost(adaptive.verify_cost) if adaptive is not None else None
        self._stats = SpeculationStats()
        self._drafter = self._make_drafter(config, drafter, draft_source)
        try:
            self.executor = TPExecutor(source, config) if self.tp > 1 else LocalExecutor(source, config)
        except BaseException:
            if self._drafter is not None:
                self._drafter.close()
            raise
        self._waiting: deque[_Seq] = deque()
        self._running: dict[int, _Seq] = {}  # slot -> sequence (prefilling or decoding)
        self._prefilling: deque[_Seq] = deque()  # oldest first
        self._by_id: dict[str, _Seq] = {}
        self._free: list[int] = list(range(self.config.max_batch_size))
        self._pad_slot = self.config.max_batch_size  # KVCache.pad_slot: where padding rows go
        self._aborted: list[str] = []
        self._ids = itertools.count()

    @classmethod
    def from_manifest(cls, manifest_uri: str, config: RuntimeConfig | None = None, **kw) -> Engine:
        """The engine of a prepared artifact, by its manifest URI."""
        from exec_service.artifact import open_artifact

        return cls(open_artifact(manifest_uri), config, **kw)

    # -- public API -------------------------------------------------------------------------------

    def add_request(self, request: Request) -> str:
        """Queue a request; returns its id. Raises ValueError for what this model cannot take
        (``limits.check_request``: the one place those rules live)."""
        check_request(request, self.limits)
        rid = request.request_id or f"req-{next(self._ids)}"
        if rid in self._by_id:
            raise ValueError(f"request id {rid!r} is already in use")
        seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63)
        seq = _Seq(rid, request, seed, torch.Generator().manual_seed(seed))
        self._by_id[rid] = seq
        self._waiting.append(seq)
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request; its slot is freed (and an ABORTED output reported) at the next step.
        False when the id is unknown or already finished."""
        seq = self._by_id.get(request_id)
        if seq is None or seq.finish is not None or request_id in self._aborted:
            return False
        self._aborted.append(request_id)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._aborted)

    @property
    def context_buckets(self) -> tuple[int, ...]:
        return self.config.context_buckets

    @property
    def kv_buckets(self) -> tuple[int, ...]:
        return self.config.kv_buckets

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def speculation_stats(self) -> SpeculationStats:
        """Draft tokens proposed and accepted so far (all zero with speculation off)."""
        return self._stats

    def step(self) -> list[RequestOutput]:
        pending: dict[str, _Pending] = {}
        finished: list[_Seq] = []
        for rid in self._aborted:
            seq = self._by_id[rid]
            seq.finish = FinishReason.ABORTED
            if seq in self._waiting:
                self._waiting.remove(seq)
            self._release(seq)
            finished.append(seq)
        self._aborted.clear()

        while self._waiting and self._free:
            seq = self._waiting.popleft()
            seq.slot = self._free.pop(0)
            self._running[seq.slot] = seq
            if self._drafter is not None and self._adaptive is not None:
                seq.adaptive = Adaptive(self._adaptive)
            self._start_encoding(seq, list(seq.request.prompt_token_ids))

        if self._rope_switch_len is not None:  # longrope: see _longrope_switch_len
            for seq in self._running.values():
                if seq.encoding is None and seq.total_len == self._rope_switch_len:
                    self._start_encoding(seq, [*seq.request.prompt_token_ids, *seq.generated])

        if self._prefilling:
            for seq in self._prefill(pending):
                finished.append(seq)
                self._release(seq)

        if any(seq.encoding is None for seq in self._running.values()):
            for seq in self._decode_step(pending):
                finished.append(seq)
                self._release(seq)

        outs = []
        for rid, p in pending.items():
            seq = self._by_id[rid]
            outs.append(self._output(seq, p))
        for seq in finished:
            if seq.request_id not in pending:
                outs.append(self._output(seq, _Pending()))
            del self._by_id[seq.request_id]
        return outs

    def generate(self, requests: Iterable[Request]) -> dict[str, tuple[list[int], FinishReason]]:
        """Convenience: run the given requests to completion (with whatever else is queued)."""
        ids = [self.add_request(r) for r in requests]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        reasons: dict[str, FinishReason] = {}
        while any(i not in reasons for i in ids):
            for out in self.step():
                if out.request_id in tokens:
                    tokens[out.request_id] += out.new_token_ids
                    if out.finish_reason is not None:
                        reasons[out.request_id] = out.finish_reason
        return {i: (tokens[i], reasons[i]) for i in ids}

    def warm_up_compiled(self) -> int:
        """Run each graph that runs compiled once, on its example inputs, so that its compile (or
        its load from a graph set's caches) happens now, not in a request; returns how many. Every
        rank runs them (the executor's collectives); the cache rows and counts they write belong to
        no sequence yet (a prefill from position 0 resets a slot)."""
        runner = self.executor.runner
        specs = [s for s in self.config.graph_specs() if runner.runs_compiled(s)]
        for spec in specs:
            self.executor.run(spec, example_step(spec))
        return len(specs)

    def close(self) -> None:
        if self._drafter is not None:
            self._drafter.close()
        self.executor.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------

    def _make_drafter(
        self, config: RuntimeConfig, drafter: Drafter | None, draft_source: ShardSource | None
    ) -> Drafter | None:
        if config.speculation == "off":
            if drafter is not None or draft_source is not None:
                raise ValueError("a drafter or draft model needs speculation on (RuntimeConfig.speculation)")
            return None
        if drafter is None and config.speculation == "ngram":
            drafter = NgramDrafter()
        elif drafter is None:
            if draft_source is None:
                raise ValueError("speculation 'draft' needs a draft model (draft_source / --draft-model)")
            from exec_service.engine.draft_model import DraftModelDrafter

            drafter = DraftModelDrafter(draft_source, self.arch, config)
        if drafter.width > config.draft_width:
            raise ValueError(
                f"the drafter's q is {drafter.width} wide; the verify graph takes {config.draft_width}"
            )
        return drafter

    def _release(self, seq: _Seq) -> None:
        if seq.encoding is not None:
            self._prefilling.remove(seq)
            seq.encoding = None
        if seq.slot >= 0 and self._drafter is not None:
            self._drafter.release(seq.slot)
        if seq.slot >= 0:
            self._running.pop(seq.slot, None)
            self._free.append(seq.slot)
            self._free.sort()
            seq.slot = -1

    def _suppressed(self, seq: _Seq) -> list[int]:
        """Ids the next token must not be: while below min_new_tokens, EOS (unless ignored) and the
        request's stop ids (vLLM's min_tokens semantics)."""
        stop = seq.request.stopping
        if len(seq.generated) >= stop.min_new_tokens:
            return []
        ids = set(stop.stop_token_ids) | (set() if stop.ignore_eos else set(self.eos_token_ids))
        return sorted(ids)

    def _suppress_row(self, seq: _Seq) -> torch.Tensor:
        row = torch.full((self.config.max_suppressed_ids,), -1, dtype=torch.int64)
        ids = self._suppressed(seq)
        row[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return row

    def _uniform(self, seq: _Seq) -> float:
        return float(torch.rand((), generator=seq.generator))

    def _start_encoding(self, seq: _Seq, tokens: list[int]) -> None:
        seq.encoding, seq.encoded = tokens, 0
        self._prefilling.append(seq)

    def _chunk(self, seq: _Seq) -> int:
        assert seq.encoding is not None
        return min(len(seq.encoding) - seq.encoded, self.config.context_buckets[-1])

    def _prefill_rows(self) -> tuple[list[_Seq], int]:
        """The sequences whose next chunk runs this step (oldest first, within the token budget) and
        the context bucket S they share."""
        cfg = self.config
        rows: list[_Seq] = []
        s = 0
        for seq in self._prefilling:
            s_new = max(s, context_bucket(cfg.context_buckets, self._chunk(seq)))
            if len(rows) == cfg.batch_buckets[-1]:
                break
            if rows and bucket_for(cfg.batch_buckets, len(rows) + 1) * s_new > cfg.max_prefill_tokens:
                break
            rows.append(seq)
            s = s_new
        return rows, s

    def _prefill(self, pending: dict[str, _Pending]) -> list[_Seq]:
        """One batched context-encoding step: the next chunk of each chosen sequence, one row each
        (rows beyond them pad the batch bucket in the pad slot). A row whose chunk ends its encoding
        samples the sequence's next token (its first, or the one after a longrope re-encode)."""
        cfg = self.config
        rows, s = self._prefill_rows()
        b = bucket_for(cfg.batch_buckets, len(rows))
        starts = [seq.encoded for seq in rows]
        spec = GraphSpec(CONTEXT, b, s, kv_bucket(cfg.kv_buckets, max(starts) + s), cfg.max_suppressed_ids)
        ids = torch.zeros(b, s, dtype=torch.int64)
        pos = torch.arange(s, dtype=torch.int64).repeat(b, 1)  # padding rows: positions 0..S-1
        slots = torch.full((b,), self._pad_slot, dtype=torch.int64)
        last = torch.zeros(b, dtype=torch.int64)
        sup = torch.full((b, cfg.max_suppressed_ids), -1, dtype=torch.int64)
        params = torch.tensor([NEUTRAL_PARAMS] * b, dtype=torch.float32)
        uni = torch.zeros(b, dtype=torch.float32)
        final: list[bool] = []
        for r, seq in enumerate(rows):
            assert seq.encoding is not None
            n, start = self._chunk(seq), seq.encoded
            ids[r, :n] = torch.tensor(seq.encoding[start : start + n])
            pos[r] += start
            slots[r], last[r] = seq.slot, n - 1
            sup[r] = self._suppress_row(seq)
            params[r] = torch.tensor(seq.request.sampling.as_row())
            final.append(start + n == len(seq.encoding))
            if final[-1]:  # only a sampled token draws: the request's stream of draws stays its own
                uni[r] = self._uniform(seq)
            seq.encoded += n
        inputs = StepInputs(
            input_ids=ids,
            positions=pos,
            slots=slots,
            mask=make_mask(pos, spec.kv_len),
            last_idx=last,
            suppress_ids=sup,
            params=params,
            uniforms=uni,
        )
        out = self.executor.run(spec, inputs)
        done = []
        for r, seq in enumerate(rows):
            if not final[r]:
                continue
            self._prefilling.remove(seq)
            seq.encoding = None
            self._accept(seq, out, r, pending.setdefault(seq.request_id, _Pending()))
            if seq.finish is not None:
                done.append(seq)
        return done

    def _decode_step(self, pending: dict[str, _Pending]) -> list[_Seq]:
        """Step (4): every decoding sequence gets its next token(s) — one verify step when any of
        them has drafts, else one token-generation step."""
        running = sorted(
            (seq for seq in self._running.values() if seq.encoding is None and seq.finish is None),
            key=lambda q: q.slot,
        )
        if not running:
            return []
        if self._drafter is None:
            return self._decode(running, pending)
        t0 = time.perf_counter()
        bucket = bucket_for(self.config.batch_buckets, len(running))
        drafts = self._propose(running, bucket)
        done = self._verify(running, drafts, pending) if drafts else self._decode(running, pending)
        if self._verify_cost is not None:  # drafting included: it is part of what a verify costs
            self._verify_cost.observe(bool(drafts), bucket, time.perf_counter() - t0)
        return done

    def _rows(self, running: list[_Seq]) -> tuple[int, dict[int, int]]:
        """The batch bucket of a decode or verify step and each slot's row: in the largest bucket
        row b is slot b (the cache read is a view), in a smaller one the sequences' rows are in slot
        order (their cache rows are gathered)."""
        cfg = self.config
        b = bucket_for(cfg.batch_buckets, len(running))
        if b == cfg.max_batch_size:
            return b, {seq.slot: seq.slot for seq in running}
        return b, {seq.slot: r for r, seq in enumerate(running)}

    def _decode(self, running: list[_Seq], pending: dict[str, _Pending]) -> list[_Seq]:
        """One token-generation step for every decoding sequence, in the smallest batch bucket that
        holds them (``_rows``)."""
        cfg = self.config
        b, row_of = self._rows(running)
        # a host-side choice between two static graphs (never a branch inside one)
        greedy = cfg.greedy_graphs and all(_plain_greedy(seq.request.sampling) for seq in running)
        ids = torch.zeros(b, 1, dtype=torch.int64)
        pos = torch.zeros(b, 1, dtype=torch.int64)  # padding rows: position 0 of the pad slot
        slots = torch.full((b,), self._pad_slot, dtype=torch.int64)
        sup = torch.full((b, cfg.max_suppressed_ids), -1, dtype=torch.int64)
        # the full sampler's inputs; the greedy graph takes neither (a greedy row draws nothing)
        params = None if greedy else torch.tensor([NEUTRAL_PARAMS] * b, dtype=torch.float32)
        uni = None if greedy else torch.zeros(b, dtype=torch.float32)
        for seq in running:
            r = row_of[seq.slot]
            ids[r, 0] = seq.generated[-1]
            pos[r, 0] = seq.total_len - 1
            slots[r] = seq.slot
            sup[r] = self._suppress_row(seq)
            if params is not None and uni is not None:
                params[r] = torch.tensor(seq.request.sampling.as_row())
                uni[r] = self._uniform(seq)
        kv = kv_bucket(cfg.kv_buckets, int(pos.max()) + 1)
        spec = GraphSpec(DECODE, b, 1, kv, cfg.max_suppressed_ids, greedy=greedy)
        inputs = StepInputs(
            input_ids=ids,
            positions=pos,
            slots=slots,
            mask=make_mask(pos, spec.kv_len),
            last_idx=torch.zeros(b, dtype=torch.int64),
            suppress_ids=sup,
            params=params,
            uniforms=uni,
        )
        out = self.executor.run(spec, inputs)
        done = []
        for seq in running:
            self._accept(seq, out, row_of[seq.slot], pending.setdefault(seq.request_id, _Pending()))
            if seq.finish is not None:
                done.append(seq)
        return done

    # -- speculation ----------------------------------------------------------------------------

    def _draft_cap(self, seq: _Seq) -> int:
        """The most drafts ``seq`` may verify this step: k, and no more than keeps every rule of
        one-token-at-a-time decoding exact — max_new_tokens and the context length are never
        overshot (the last window position stays below max_seq_len - 1, so a padding draft clamped
        there never lands on a real one), min_new_tokens' suppressed ids cover every position of the
        window or none, and the rope table a length-dependent kind picks (from the window's last real
        position) is the one each position would have picked."""
        cfg, stop = self.config, seq.request.stopping
        total, gen = seq.total_len, len(seq.generated)
        cap = min(cfg.num_speculative_tokens, cfg.max_seq_len - total - 1)
        if stop.max_new_tokens is not None:
            cap = min(cap, stop.max_new_tokens - gen - 1)
        if self._suppressed(seq):
            cap = min(cap, stop.min_new_tokens - gen - 1)
        if self._rope_switch_len is not None and total < self._rope_switch_len:  # longrope: short table
            cap = min(cap, self._rope_switch_len - 1 - total)  # ... and the re-encode length is reached
        if self.arch.rope.kind == "dynamic":  # the original table only up to max_position_embeddings
            cap = min(cap, self.arch.max_position_embeddings - total)
        return cap

    def _propose(self, running: list[_Seq], bucket: int) -> dict[int, Proposal]:
        """Drafts per slot, for the rows that may and (adaptively) want to speculate — greedy rows
        only when the step's gate lets them (the measured ``drafting.VerifyCost`` of the step's
        batch ``bucket``)."""
        assert self._drafter is not None
        want = []
        for seq in running:
            cap = self._draft_cap(seq)
            if cap < 1 or (seq.adaptive is not None and not seq.adaptive.should_draft()):
                continue
            want.append((seq, cap))
        if (
            self._adaptive is not None
            and want
            and all(seq.request.sampling.temperature <= 0 for seq, _ in want)
        ):
            # greedy rows only (their tokens do not depend on it): verify when worth it for the batch
            assert self._verify_cost is not None
            if self._verify_cost.needs_decode(bucket):  # time token generation (no row pauses)
                return {}
            expected = sum(min(seq.adaptive.expected, cap) for seq, cap in want if seq.adaptive is not None)
            cost = self._verify_cost.per_row(bucket)
            if expected >= cost * len(running):
                self._verify_cost.opened(bucket)
            elif not self._verify_cost.probe_due(bucket):
                for seq, _ in want:
                    if seq.adaptive is not None:
                        seq.adaptive.gated()
                return {}
        asks = [
            DraftRequest(seq.slot, seq.tokens(), cap, seq.request.sampling, seq.generator)
            for seq, cap in want
        ]
        if not asks:
            return {}
        proposals = self._drafter.propose(asks)
        out = {}
        for ask, prop in zip(asks, proposals, strict=True):
            if len(prop.tokens) > ask.max_drafts:
                raise RuntimeError(
                    f"the drafter proposed {len(prop.tokens)} drafts for at most {ask.max_drafts}"
                )
            if prop.tokens:
                out[ask.slot] = prop
        return out

    def _verify(
        self, running: list[_Seq], drafts: dict[int, Proposal], pending: dict[str, _Pending]
    ) -> list[_Seq]:
        """One verify step (the speculation graph) for every decoding sequence: row = the last token
        + the row's drafts (padded to k), positions clamped to the cache (``_draft_cap``)."""
        cfg = self.config
        k, w = cfg.num_speculative_tokens, cfg.draft_width
        s = k + 1
        b, row_of = self._rows(running)
        greedy = cfg.greedy_graphs and all(_plain_greedy(seq.request.sampling) for seq in running)
        ids = torch.zeros(b, s, dtype=torch.int64)
        pos = torch.arange(s, dtype=torch.int64).repeat(b, 1)  # padding rows: 0..S-1 of the pad slot
        slots = torch.full((b,), self._pad_slot, dtype=torch.int64)
        num = torch.zeros(b, dtype=torch.int64)
        sup = torch.full((b, cfg.max_suppressed_ids), -1, dtype=torch.int64)
        params = None if greedy else torch.tensor([NEUTRAL_PARAMS] * b, dtype=torch.float32)
        draws = None if greedy else torch.zeros(b, s, dtype=torch.float32)
        q_ids = None if greedy else torch.full((b, k, w), -1, dtype=torch.int64)
        q_probs = None if greedy else torch.zeros(b, k, w, dtype=torch.float32)
        window = torch.arange(s, dtype=torch.int64)
        needed = s
        for seq in running:
            r = row_of[seq.slot]
            prop = drafts.get(seq.slot, NO_DRAFTS)
            n, start = len(prop.tokens), seq.total_len - 1
            ids[r, 0] = seq.generated[-1]
            if n:
                ids[r, 1 : n + 1] = torch.tensor(prop.tokens)
            pos[r] = (start + window).clamp(max=cfg.max_seq_len - 1)
            slots[r], num[r] = seq.slot, n
            sup[r] = self._suppress_row(seq)
            needed = max(needed, start + n + 1)
            if params is None or draws is None or q_ids is None or q_probs is None:
                continue
            sp = seq.request.sampling
            params[r] = torch.tensor(sp.as_row())
            if sp.temperature > 0:  # acceptance draws for the n drafts, then the final token's
                for j in range(n):
                    draws[r, j] = self._uniform(seq)
                draws[r, s - 1] = self._uniform(seq)
            if n and prop.q_ids is not None and prop.q_probs is not None:
                qw = prop.q_ids.shape[1]
                q_ids[r, :n, :qw], q_probs[r, :n, :qw] = prop.q_ids, prop.q_probs
            elif n:  # one-hot q on the draft
                q_ids[r, :n, 0], q_probs[r, :n, 0] = ids[r, 1 : n + 1], 1.0
        kv = kv_bucket(cfg.kv_buckets, needed)
        spec = GraphSpec(
            SPECULATE, b, s, kv, cfg.max_suppressed_ids, greedy=greedy, draft_width=0 if greedy else w
        )
        inputs = StepInputs(
            input_ids=ids,
            positions=pos,
            slots=slots,
            mask=make_mask(pos, spec.kv_len),
            suppress_ids=sup,
            params=params,
            num_drafts=num,
            draws=draws,
            draft_ids=q_ids,
            draft_probs=q_probs,
        )
        out = self.executor.run(spec, inputs)
        assert out.num_accepted is not None
        done = []
        stats = self._stats
        for seq in running:
            r = row_of[seq.slot]
            n, a, length = int(num[r]), int(out.num_accepted[r]), seq.total_len
            if not 0 <= a <= n:
                raise RuntimeError(f"the verify graph accepted {a} of {n} drafts")
            p = pending.setdefault(seq.request_id, _Pending())
            for i in range(a + 1):  # accepted drafts, then the correction / bonus token
                self._accept(seq, out, r, p, i)
                if seq.finish is not None:  # EOS or a stop id among them: the rest is dropped
                    break
            if n:
                stats = SpeculationStats(
                    stats.draft_tokens + n,
                    stats.accepted_tokens + a,
                    stats.verified_rows + 1,
                    stats.verify_steps,
                )
                if seq.adaptive is not None:
                    seq.adaptive.record(a)
                assert self._drafter is not None
                self._drafter.verified(seq.slot, length, n, a)
            if seq.finish is not None:
                done.append(seq)
        self._stats = dataclasses.replace(stats, verify_steps=stats.verify_steps + 1)
        return done

    def _accept(
        self, seq: _Seq, out: StepOutputs, row: int, pending: _Pending, col: int | None = None
    ) -> None:
        """Row ``row`` of a step's outputs is ``seq``'s next token (``col``: position ``col`` of a
        verify step's window; logprobs: full graphs only; a greedy one runs only when no row wants
        them)."""
        at = (row,) if col is None else (row, col)
        tok = int(out.tokens[at])
        seq.generated.append(tok)
        pending.tokens.append(tok)
        sp: SamplingParams = seq.request.sampling
        if sp.logprobs:
            if out.logprob is None or out.top_ids is None or out.top_logprobs is None:
                raise RuntimeError(f"request {seq.request_id} wants logprobs; this step's graph gave none")
            n = sp.top_logprobs
            top = tuple(zip(out.top_ids[at][:n].tolist(), out.top_logprobs[at][:n].tolist(), strict=True))
            pending.logprobs.append(TokenLogprob(tok, float(out.logprob[at]), top))
        if out.logits is not None:
            pending.logits.append(out.logits[at].clone())
        stop = seq.request.stopping
        if tok in stop.stop_token_ids:
            seq.finish = FinishReason.STOP_TOKEN
        elif not stop.ignore_eos and tok in self.eos_token_ids:
            seq.finish = FinishReason.EOS
        elif stop.max_new_tokens is not None and len(seq.generated) >= stop.max_new_tokens:
            seq.finish = FinishReason.LENGTH
        elif seq.total_len >= self.config.max_seq_len:
            seq.finish = FinishReason.CONTEXT_LENGTH

    def _output(self, seq: _Seq, p: _Pending) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=tuple(p.tokens),
            logprobs=tuple(p.logprobs) if seq.request.sampling.logprobs else None,
            finish_reason=seq.finish,
            num_prompt_tokens=len(seq.request.prompt_token_ids),
            num_generated_tokens=len(seq.generated),
            seed=seq.seed,
            logits=tuple(p.logits),
        )


assert len(SamplingParams().as_row()) == NUM_PARAMS


def _plain_greedy(sp: SamplingParams) -> bool:
    """Greedy, neutral penalties, no logprobs: what the greedy decode graph computes exactly."""
    return (
        sp.temperature <= 0.0
        and sp.repetition_penalty == 1.0
        and sp.presence_penalty == 0.0
        and sp.frequency_penalty == 0.0
        and not sp.logprobs
    )


def _longrope_switch_len(arch, config: RuntimeConfig) -> int | None:
    """longrope (Phi-3) picks short or long factors from the sequence length (decoder: per row,
    position of the last real token + 1 > original_max_position_embeddings -> long). transformers'
    generate re-encodes the whole sequence with the long factors when it first grows past that
    length (Phi3ForCausalLM.prepare_inputs_for_generation drops the cache); so do we: a running
    sequence whose length reaches original_max + 1 is prefilled again from position 0 (``_decode``).
    Returns that length (None for other rope kinds). A prefill chunk must never end at or below
    original_max while the sequence is longer, hence the bucket requirement."""
    if arch.rope.kind != "longrope":
        return None
    orig = arch.rope.original_max_position_embeddings
    largest = config.context_buckets[-1]
    if largest <= orig and orig + 1 < config.max_seq_len:
        raise ValueError(
            f"longrope: the largest context bucket ({largest}) must exceed original_max_position_embeddings "
            f"({orig}) when max_seq_len ({config.max_seq_len}) allows longer sequences, so that every "
            "prefill chunk of a long sequence picks the long rope factors"
        )
    return orig + 1
