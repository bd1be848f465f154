"""A draft model as the drafter (``--speculation draft --draft-model MANIFEST_URI``): a second
prepared artifact with the target's vocabulary (e.g. the int8 artifact of the same model drafting
for its fp32 self), served in this process with its own KV cache and graphs (tp 1, eager, the
target's serving shape, ``return_candidates`` so its full sampler reports the q it drew from).

Its cache follows the target's slots. Per slot, ``_cached`` counts the sequence's tokens whose K/V
the draft cache holds (a valid prefix). Proposing for a row whose sequence has L tokens:

1. catch up: the tokens before the last one that the draft cache lacks — a context chunk (aligned to
   the largest context bucket, as the engine's prefill chunks are: those graphs exist) when more than
   ``TKG_CATCH_UP`` are missing (a new sequence, or one that paused speculating), else that many
   greedy token-generation steps (after a verify that accepted every draft, the last draft is the one
   missing). A row still behind after one chunk drafts at the next step;
2. draft: k token-generation steps fed the last token, then each draft; a sampled row draws each
   draft from the draft's distribution under its own temperature / top-k / top-p / min-p (no
   penalties: the draft's token counts also hold rejected drafts), with a uniform from the request's
   generator, and reports that distribution as q; greedy rows take the draft's argmax.

After the verify, ``verified`` keeps the accepted part: positions up to L - 1 + min(a, n - 1) hold
the sequence's tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from exec_service.engine.drafting import DraftRequest, Proposal
from exec_service.engine.types import SamplingParams
from exec_service.model.loading import ShardSource
from exec_service.runtime.executor import LocalExecutor
from exec_service.runtime.graphs import CONTEXT, DECODE, GraphSpec, context_bucket, kv_bucket, make_mask
from exec_service.runtime.runner import RuntimeConfig
from exec_service.runtime.sampling import NEUTRAL_PARAMS
from exec_service.runtime.step_io import StepInputs, StepOutputs
from shared.families.base import Architecture
from shared.shapes import bucket_for

TKG_CATCH_UP = 2  # missing tokens caught up by token-generation steps; more: a context chunk


class DraftVocabularyError(ValueError):
    """The draft model cannot draft for this target (another vocabulary, or a sharded artifact)."""


class DraftModelDrafter:
    def __init__(self, source: ShardSource, target_arch: Architecture, config: RuntimeConfig) -> None:
        if source.arch.vocab_size != target_arch.vocab_size:
            raise DraftVocabularyError(
                f"the draft model's vocabulary has {source.arch.vocab_size} tokens, the target's "
                f"{target_arch.vocab_size}: a draft model must share the target's tokenizer"
            )
        if source.target.tp_degree != 1:
            raise DraftVocabularyError(
                f"the draft model is prepared for tp {source.target.tp_degree}; prepare it with --tp 1 "
                "(it runs beside rank 0)"
            )
        self.config = dataclasses.replace(
            config,
            speculation="off",
            num_speculative_tokens=0,
            return_candidates=True,
            return_logits=False,
            graphs=None,
            compile=False,
        )
        self.width = config.num_candidates
        self.executor = LocalExecutor(source, self.config)
        self._pad = self.config.max_batch_size  # the draft cache's pad slot
        self._cached: dict[int, int] = {}

    # -- Drafter ------------------------------------------------------------------------------------

    def propose(self, rows: Sequence[DraftRequest]) -> list[Proposal]:
        self._catch_up(rows)
        ready = [r for r in rows if self._cached.get(r.slot, 0) == len(r.tokens) - 1]
        drafts: dict[int, list[int]] = {r.slot: [] for r in ready}
        qs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {r.slot: [] for r in ready}
        last = {r.slot: r.tokens[-1] for r in ready}
        for j in range(max((r.max_drafts for r in ready), default=0)):
            active = [r for r in ready if r.max_drafts > j]
            fed = [(r.slot, last[r.slot], len(r.tokens) - 1 + j) for r in active]
            sampled = {r.slot: r.sampling for r in active if r.sampling.temperature > 0}
            out, row_of = self._decode(fed, sampled, {r.slot: r.generator for r in active})
            for r in active:
                tok = int(out.tokens[row_of[r.slot]])
                drafts[r.slot].append(tok)
                last[r.slot] = tok
                if r.slot in sampled:
                    assert out.cand_ids is not None and out.cand_probs is not None
                    qs[r.slot].append((out.cand_ids[row_of[r.slot]], out.cand_probs[row_of[r.slot]]))
        proposals = []
        for r in rows:
            if r.slot not in drafts:
                proposals.append(Proposal(()))
            elif qs[r.slot]:
                ids, probs = zip(*qs[r.slot], strict=True)
                proposals.append(Proposal(tuple(drafts[r.slot]), torch.stack(ids), torch.stack(probs)))
            else:
                proposals.append(Proposal(tuple(drafts[r.slot])))
        return proposals

    def verified(self, slot: int, length_before: int, num_drafts: int, num_accepted: int) -> None:
        # fed: the last token at length_before - 1 and drafts 1..n-1 after it; the accepted ones stay
        self._cached[slot] = length_before + min(num_accepted, num_drafts - 1)

    def release(self, slot: int) -> None:
        self._cached.pop(slot, None)

    def close(self) -> None:
        self.executor.close()

    # -- steps ---------------------------------------------------------------------------------------

    def _catch_up(self, rows: Sequence[DraftRequest]) -> None:
        behind = {r.slot: len(r.tokens) - 1 - self._cached.get(r.slot, 0) for r in rows}
        chunked = [r for r in rows if behind[r.slot] > TKG_CATCH_UP]
        if chunked:
            self._chunk(chunked)
        for _ in range(TKG_CATCH_UP):
            todo = [r for r in rows if 0 < len(r.tokens) - 1 - self._cached.get(r.slot, 0) <= TKG_CATCH_UP]
            if not todo:
                break
            fed = []
            for r in todo:
                at = self._cached.get(r.slot, 0)
                fed.append((r.slot, r.tokens[at], at))
                self._cached[r.slot] = at + 1
            self._decode(fed, {}, {})  # greedy graph: its tokens are not needed

    def _chunk(self, rows: Sequence[DraftRequest]) -> None:
        """One context chunk per row, from the largest-bucket boundary at or below what it holds
        (a few tokens are encoded again; these starts are the ones the ctx graphs exist for)."""
        cfg = self.config
        largest = cfg.context_buckets[-1]
        rows = list(rows)[: cfg.batch_buckets[-1]]
        spans = []
        for r in rows:
            start = self._cached.get(r.slot, 0) // largest * largest
            spans.append((start, min(len(r.tokens) - 1, start + largest)))
        s = context_bucket(cfg.context_buckets, max(end - start for start, end in spans))
        b = bucket_for(cfg.batch_buckets, len(rows))
        ids = torch.zeros(b, s, dtype=torch.int64)
        pos = torch.arange(s, dtype=torch.int64).repeat(b, 1)
        slots = torch.full((b,), self._pad, dtype=torch.int64)
        last = torch.zeros(b, dtype=torch.int64)
        for i, (r, (start, end)) in enumerate(zip(rows, spans, strict=True)):
            ids[i, : end - start] = torch.tensor(list(r.tokens[start:end]))
            pos[i] += start
            slots[i], last[i] = r.slot, end - start - 1
            self._cached[r.slot] = end
        spec = GraphSpec(
            CONTEXT, b, s, kv_bucket(cfg.kv_buckets, max(st for st, _ in spans) + s), cfg.max_suppressed_ids
        )
        self.executor.run(
            spec,
            StepInputs(
                input_ids=ids,
                positions=pos,
                slots=slots,
                mask=make_mask(pos, spec.kv_len),
                last_idx=last,
                suppress_ids=torch.full((b, cfg.max_suppressed_ids), -1, dtype=torch.int64),
                params=torch.tensor([NEUTRAL_PARAMS] * b, dtype=torch.float32),
                uniforms=torch.zeros(b, dtype=torch.float32),
            ),
        )

    def _decode(
        self,
        fed: list[tuple[int, int, int]],  # (slot, token, position) per row
        sampled: dict[int, SamplingParams],  # the rows that sample (others: argmax)
        generators: dict[int, torch.Generator],
    ) -> tuple[StepOutputs, dict[int, int]]:
        """One token-generation step of the draft model (rows laid out as the engine's decode
        steps: in the largest bucket row b = slot b); the greedy graph when no row samples."""
        cfg = self.config
        b = bucket_for(cfg.batch_buckets, len(fed))
        order = sorted(fed)
        row_of = {slot: (slot if b == cfg.max_batch_size else i) for i, (slot, _, _) in enumerate(order)}
        greedy = not sampled
        ids = torch.zeros(b, 1, dtype=torch.int64)
        pos = torch.zeros(b, 1, dtype=torch.int64)
        slots = torch.full((b,), self._pad, dtype=torch.int64)
        params = None if greedy else torch.tensor([NEUTRAL_PARAMS] * b, dtype=torch.float32)
        uni = None if greedy else torch.zeros(b, dtype=torch.float32)
        for slot, tok, p in order:
            r = row_of[slot]
            ids[r, 0], pos[r, 0], slots[r] = tok, p, slot
            if params is not None and uni is not None and slot in sampled:
                sp = sampled[slot]
                params[r] = torch.tensor((*sp.as_row()[:4], 1.0, 0.0, 0.0))  # no penalties (see above)
                uni[r] = float(torch.rand((), generator=generators[slot]))
        spec = GraphSpec(
            DECODE, b, 1, kv_bucket(cfg.kv_buckets, int(pos.max()) + 1), cfg.max_suppressed_ids, greedy=greedy
        )
        inputs = StepInputs(
            input_ids=ids,
            positions=pos,
            slots=slots,
            mask=make_mask(pos, spec.kv_len),
            last_idx=torch.zeros(b, dtype=torch.int64),
            suppress_ids=torch.full((b, cfg.max_suppressed_ids), -1, dtype=torch.int64),
            params=params,
            uniforms=uni,
        )
        return self.executor.run(spec, inputs), row_of
