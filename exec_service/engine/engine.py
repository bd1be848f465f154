"""The engine: continuous batching over the static step graphs (token level; no text).

A ``step()`` = (1) free the slots of aborted requests, (2) admit waiting requests into free slots and
prefill each (chunked by the largest context bucket; the last chunk samples the first token),
(3) one token-generation graph over all slots for every running request (including those just
admitted). Requests join and leave between steps; a finished request's slot is free for the next step.

Batch invariance: a request's uniforms come from its own ``torch.Generator(seed)``, one draw per
token it samples, so the same request with the same seed yields the same tokens whatever else runs.
"""

from __future__ import annotations

import itertools
import secrets
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from exec_service.engine.limits import EngineLimits, check_request
from exec_service.engine.types import (
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from exec_service.model.loading import ShardSource
from exec_service.model.rope import check_serving_shape
from exec_service.runtime.executor import LocalExecutor, TPExecutor
from exec_service.runtime.graphs import CONTEXT, DECODE, GraphSpec, context_bucket, kv_bucket, make_mask
from exec_service.runtime.runner import RuntimeConfig
from exec_service.runtime.sampling import NEUTRAL_PARAMS, NUM_PARAMS
from exec_service.runtime.step_io import StepInputs, StepOutputs


@dataclass
class _Seq:
    request_id: str
    request: Request
    seed: int
    generator: torch.Generator
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    finish: FinishReason | None = None

    @property
    def total_len(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.generated)


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
    ) -> None:
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
        self.executor = TPExecutor(source, config) if self.tp > 1 else LocalExecutor(source, config)
        self._waiting: deque[_Seq] = deque()
        self._running: dict[int, _Seq] = {}  # slot -> sequence
        self._by_id: dict[str, _Seq] = {}
        self._free: list[int] = list(range(self.config.max_batch_size))
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
            self._prefill(seq, pending.setdefault(seq.request_id, _Pending()))
            if seq.finish is not None:
                finished.append(seq)
                self._release(seq)

        if self._running:
            for seq in self._decode(pending):
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

    def close(self) -> None:
        self.executor.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------

    def _release(self, seq: _Seq) -> None:
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

    def _prefill(self, seq: _Seq, pending: _Pending) -> None:
        """Encode the sequence so far (the prompt; for a longrope re-encode also what it generated)."""
        prompt = [*seq.request.prompt_token_ids, *seq.generated]
        ctx, kv = self.config.context_buckets, self.config.kv_buckets
        start = 0
        while start < len(prompt):
            n = min(len(prompt) - start, ctx[-1])
            s = context_bucket(ctx, n)
            spec = GraphSpec(CONTEXT, 1, s, kv_bucket(kv, start + s), self.config.max_suppressed_ids)
            ids = torch.zeros(1, s, dtype=torch.int64)
            ids[0, :n] = torch.tensor(prompt[start : start + n])
            pos = torch.arange(start, start + s, dtype=torch.int64)[None]
            final = start + n == len(prompt)
            inputs = StepInputs(
                input_ids=ids,
                positions=pos,
                slots=torch.tensor([seq.slot], dtype=torch.int64),
                mask=make_mask(pos, spec.kv_len),
                last_idx=torch.tensor([n - 1], dtype=torch.int64),
                suppress_ids=self._suppress_row(seq)[None],
                params=torch.tensor([seq.request.sampling.as_row()], dtype=torch.float32),
                uniforms=torch.tensor([self._uniform(seq) if final else 0.0], dtype=torch.float32),
            )
            out = self.executor.run(spec, inputs)
            start += n
        self._accept(seq, out, 0, pending)

    def _decode(self, pending: dict[str, _Pending]) -> list[_Seq]:
        done = []
        if self._rope_switch_len is not None:  # longrope: see _longrope_switch_len
            for seq in list(self._running.values()):
                if seq.total_len == self._rope_switch_len:
                    self._prefill(seq, pending.setdefault(seq.request_id, _Pending()))
                    if seq.finish is not None:
                        done.append(seq)
        running = {slot: seq for slot, seq in self._running.items() if seq.finish is None}
        if not running:
            return done
        b = self.config.max_batch_size
        # a host-side choice between two static graphs (never a branch inside one)
        greedy = self.config.greedy_graphs and all(
            _plain_greedy(seq.request.sampling) for seq in running.values()
        )
        ids = torch.zeros(b, 1, dtype=torch.int64)
        pos = torch.zeros(b, 1, dtype=torch.int64)  # unused slots: padding rows at position 0 of their slot
        sup = torch.full((b, self.config.max_suppressed_ids), -1, dtype=torch.int64)
        # the full sampler's inputs; the greedy graph takes neither (a greedy row draws nothing)
        params = None if greedy else torch.tensor([NEUTRAL_PARAMS] * b, dtype=torch.float32)
        uni = None if greedy else torch.zeros(b, dtype=torch.float32)
        for slot, seq in running.items():
            ids[slot, 0] = seq.generated[-1]
            pos[slot, 0] = seq.total_len - 1
            sup[slot] = self._suppress_row(seq)
            if params is not None and uni is not None:
                params[slot] = torch.tensor(seq.request.sampling.as_row())
                uni[slot] = self._uniform(seq)
        kv = kv_bucket(self.config.kv_buckets, int(pos.max()) + 1)
        spec = GraphSpec(DECODE, b, 1, kv, self.config.max_suppressed_ids, greedy=greedy)
        inputs = StepInputs(
            input_ids=ids,
            positions=pos,
            slots=torch.arange(b, dtype=torch.int64),  # row b is slot b
            mask=make_mask(pos, spec.kv_len),
            last_idx=torch.zeros(b, dtype=torch.int64),
            suppress_ids=sup,
            params=params,
            uniforms=uni,
        )
        out = self.executor.run(spec, inputs)
        for slot, seq in running.items():
            self._accept(seq, out, slot, pending.setdefault(seq.request_id, _Pending()))
            if seq.finish is not None:
                done.append(seq)
        return done

    def _accept(self, seq: _Seq, out: StepOutputs, row: int, pending: _Pending) -> None:
        """Row ``row`` of a step's outputs is ``seq``'s next token (logprobs: full graphs only; the
        greedy one runs only when no row wants them)."""
        tok = int(out.tokens[row])
        seq.generated.append(tok)
        pending.tokens.append(tok)
        sp: SamplingParams = seq.request.sampling
        if sp.logprobs:
            if out.logprob is None or out.top_ids is None or out.top_logprobs is None:
                raise RuntimeError(f"request {seq.request_id} wants logprobs; this step's graph gave none")
            n = sp.top_logprobs
            top = tuple(zip(out.top_ids[row, :n].tolist(), out.top_logprobs[row, :n].tolist(), strict=True))
            pending.logprobs.append(TokenLogprob(tok, float(out.logprob[row]), top))
        if out.logits is not None:
            pending.logits.append(out.logits[row].clone())
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
