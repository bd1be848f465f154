"""Drafting for speculation: who proposes the draft tokens the verify graph checks, and when a row
speculates at all.

* ``Drafter`` (protocol): ``propose(rows) -> proposals``, told the outcome of each verify
  (``verified``) and when a slot's sequence ends (``release``). ``width`` is Q, the width of the q it
  reports per draft (``RuntimeConfig.draft_width``).
* ``NgramDrafter`` (prompt lookup, no model): per row, the last n tokens (n = 3, then 2, then 1) are
  looked up in the prompt + output so far; the tokens that followed their latest earlier occurrence
  are the drafts. q is one-hot (``Proposal.q_ids`` None).
* ``engine/draft_model.py``: a second, smaller artifact with the same tokenizer.
* ``Adaptive``: per row, an exponential average of the drafts accepted per verify; a row whose
  average falls below ``AdaptivePolicy.min_accepted`` pauses (the plain token-generation graph
  decodes it) for a number of steps that doubles each time a probe fails, so a workload with nothing
  to copy pays for one verify now and then, not every step.
* The step's gate (applied by the engine): one row with drafts puts every row of the step into the
  verify graph, which costs more than token generation for all of them; so greedy rows speculate in a
  step only when the drafts they expect to be accepted outweigh that cost for the whole batch (a row
  that is gated out pauses as after a failed probe). The cost is measured (``VerifyCost``: the
  engine's own verify and token-generation steps per batch bucket, drafting included), with
  ``AdaptivePolicy.verify_cost`` as the prior until both kinds of step have run: the verify graph's
  relative cost differs by device, batch size and drafter (eager SmolLM2 here: about x1.3 at
  batch 1, about x2.4 at batch 8). Sampled rows are never gated: whether a sampled row verifies decides
  which of its seeded draws it uses, so that decision must depend on the row alone (batch
  invariance).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from exec_service.engine.types import SamplingParams


@dataclass(frozen=True)
class DraftRequest:
    """One row asking for drafts: its sequence so far (prompt + generated; the last token is the
    one the verify graph feeds first) and how many drafts it may take."""

    slot: int
    tokens: Sequence[int]
    max_drafts: int
    sampling: SamplingParams
    generator: torch.Generator  # the request's own: a draft model samples from it

    def __post_init__(self) -> None:
        if self.max_drafts < 1 or not self.tokens:
            raise ValueError("a draft request needs tokens and max_drafts >= 1")


@dataclass(frozen=True)
class Proposal:
    """A row's drafts and, for a sampled row, the distribution each was drawn from (q_ids / q_probs
    [n, Q]: support and probabilities); None = one-hot on the draft (n-gram drafts, greedy rows)."""

    tokens: tuple[int, ...]
    q_ids: torch.Tensor | None = None
    q_probs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.tokens)
        for q in (self.q_ids, self.q_probs):
            if q is not None and (q.dim() != 2 or q.shape[0] != n):
                raise ValueError(f"q must be [{n}, Q], got {list(q.shape)}")
        if (self.q_ids is None) != (self.q_probs is None):
            raise ValueError("q_ids and q_probs go together")


NO_DRAFTS = Proposal(())


class Drafter(Protocol):
    width: int  # Q

    def propose(self, rows: Sequence[DraftRequest]) -> list[Proposal]: ...

    def verified(self, slot: int, length_before: int, num_drafts: int, num_accepted: int) -> None:
        """The verify graph took ``num_accepted`` of the ``num_drafts`` drafts of the sequence in
        ``slot``, which was ``length_before`` tokens long."""

    def release(self, slot: int) -> None:
        """The sequence in ``slot`` ended (the slot's next sequence starts afresh)."""

    def close(self) -> None: ...


class NgramDrafter:
    """Prompt lookup: the continuation of the latest earlier occurrence of the row's last n tokens."""

    width = 1

    def __init__(self, max_n: int = 3, min_n: int = 1) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, rows: Sequence[DraftRequest]) -> list[Proposal]:
        return [Proposal(ngram_lookup(r.tokens, r.max_drafts, self.max_n, self.min_n)) for r in rows]

    def verified(self, slot: int, length_before: int, num_drafts: int, num_accepted: int) -> None:
        pass

    def release(self, slot: int) -> None:
        pass

    def close(self) -> None:
        pass


def ngram_lookup(tokens: Sequence[int], k: int, max_n: int = 3, min_n: int = 1) -> tuple[int, ...]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the last n tokens (n from
    ``max_n`` down to ``min_n``; the first n that occurs wins); () when none occurs."""
    seq = np.asarray(tokens, dtype=np.int64)
    length = len(seq)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # windows starting at 0 .. length - n - 1: each has at least one token after it, and the
        # suffix itself (starting at length - n) is not among them
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # [length - n, n]
        hits = np.flatnonzero((windows == seq[length - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tuple(int(t) for t in seq[start : start + k])
    return ()


@dataclass(frozen=True)
class AdaptivePolicy:
    """When a row speculates. ``min_accepted``: the average accepted drafts per verify below which
    a verify costs more than it gains (on cpu a k = 4 verify step costs ~1.1-1.5 decode steps);
    ``smoothing``: the weight of the newest verify in that average; a paused row probes again after
    ``pause_steps``, doubled after each failed probe up to ``max_pause_steps``. The costs are
    lopsided — a failed verify wastes a fraction of a step, a pause during a copy loses up to k
    tokens per step — so a row gives up slowly (about five failures in a row from the start) and
    pauses briefly at first."""

    min_accepted: float = 0.3
    smoothing: float = 0.3
    pause_steps: int = 4
    max_pause_steps: int = 64
    # what a verify step costs beyond a token-generation step, per row of the step, in tokens: the
    # prior until the engine has timed both kinds of step at a batch bucket (``VerifyCost``)
    verify_cost: float = 0.4

    def __post_init__(self) -> None:
        if (
            not 0 < self.smoothing <= 1
            or self.min_accepted < 0
            or self.pause_steps < 1
            or self.verify_cost < 0
        ):
            raise ValueError("smoothing in (0, 1], min_accepted >= 0, pause_steps >= 1, verify_cost >= 0")
        if self.max_pause_steps < self.pause_steps:
            raise ValueError("max_pause_steps must be >= pause_steps")


ALWAYS = None  # Engine(adaptive=ALWAYS): every row drafts every step it can (tests)


class Adaptive:
    """One row's state under an ``AdaptivePolicy`` (a fresh row speculates)."""

    def __init__(self, policy: AdaptivePolicy) -> None:
        self.policy = policy
        self.average = policy.min_accepted + 1.0  # optimistic: the first verifies decide
        self.paused = 0  # decode steps left without drafting
        self.pause = policy.pause_steps  # the next pause's length

    @property
    def expected(self) -> float:
        """Drafts this row expects to be accepted in a verify (its running average)."""
        return self.average

    def should_draft(self) -> bool:
        """Called once per decode step of the row."""
        if self.paused > 0:
            self.paused -= 1
            return False
        return True

    def record(self, num_accepted: int) -> None:
        """A verify with drafts accepted ``num_accepted`` of them."""
        p = self.policy
        self.average = (1 - p.smoothing) * self.average + p.smoothing * num_accepted
        if self.average >= p.min_accepted:
            self.pause = p.pause_steps  # speculation pays here (again): the next pause starts short
            return
        self._pause()
        self.average = self._probe  # after the pause one verify decides again

    def gated(self) -> None:
        """The row could draft but the step's gate said no: pause as after a failed probe; afterwards
        the row asks again with at least the policy's probe expectation (whether that passes the
        gate depends on the measured cost; a closed gate's own probes, ``VerifyCost.probe_due``,
        measure the row's acceptance again now and then)."""
        self._pause()
        self.average = max(self.average, self._probe)

    @property
    def _probe(self) -> float:
        return max(self.policy.min_accepted, self.policy.verify_cost)

    def _pause(self) -> None:
        self.paused = self.pause
        self.pause = min(2 * self.pause, self.policy.max_pause_steps)


class VerifyCost:
    """What a verify step costs beyond a token-generation step, per row, in tokens, by batch bucket:
    ``verify seconds / decode seconds - 1`` from the engine's own steps (each the median of the last
    ``window`` steps of its kind; the first step of each kind and bucket is a warm-up and not
    counted), ``prior`` until both are known. Break-even: a verify over n rows yields n + accepted
    tokens where decode yields n, so it pays when the accepted drafts exceed n x this cost.

    * ``needs_decode``: the decode time of a bucket is unknown, or ``refresh`` verifies ran in a row
      — a step whose rows would all verify runs token generation instead, so that rows which always
      speculate still learn what speculating costs (at most one step in ``refresh`` gives up its
      drafts).
    * ``probe_due``: the gate has been closed for ``probe_every`` steps of a bucket — one step verifies
      anyway, so that a cost measured in a bad moment, or acceptance that has changed, is measured
      again; the interval doubles with each probe (up to ``max_probe_every``) and starts again when
      the gate opens by itself."""

    def __init__(
        self,
        prior: float,
        window: int = 5,
        refresh: int = 64,
        probe_every: int = 16,
        max_probe_every: int = 256,
    ) -> None:
        if prior < 0 or window < 1 or refresh < 1 or not 1 <= probe_every <= max_probe_every:
            raise ValueError("prior >= 0, window >= 1, refresh >= 1, 1 <= probe_every <= max_probe_every")
        self.prior, self.window, self.refresh = prior, window, refresh
        self.probe_every, self.max_probe_every = probe_every, max_probe_every
        self._times: dict[tuple[bool, int], deque[float]] = {}
        self._verifies_in_a_row: dict[int, int] = {}
        self._closed: dict[int, int] = {}  # bucket -> steps the gate has been closed since a verify
        self._interval: dict[int, int] = {}  # bucket -> the current probe interval

    def observe(self, verify: bool, bucket: int, seconds: float) -> None:
        key = (verify, bucket)
        self._verifies_in_a_row[bucket] = self._verifies_in_a_row.get(bucket, 0) + 1 if verify else 0
        if verify:
            self._closed[bucket] = 0
        if key not in self._times:
            self._times[key] = deque(maxlen=self.window)  # the warm-up step: not counted
            return
        self._times[key].append(seconds)

    def _seconds(self, verify: bool, bucket: int) -> float | None:
        times = self._times.get((verify, bucket))
        return statistics.median(times) if times else None

    def needs_decode(self, bucket: int) -> bool:
        return self._seconds(False, bucket) is None or self._verifies_in_a_row.get(bucket, 0) >= self.refresh

    def per_row(self, bucket: int) -> float:
        v, d = self._seconds(True, bucket), self._seconds(False, bucket)
        if v is None or d is None or d <= 0:
            return self.prior
        return max(0.0, v / d - 1.0)

    def opened(self, bucket: int) -> None:
        """The gate let a step verify on its own: probing starts again from ``probe_every``."""
        self._interval[bucket] = self.probe_every

    def probe_due(self, bucket: int) -> bool:
        """Called when the gate would close a step: True (and the interval doubles) when the step
        should verify anyway."""
        closed = self._closed.get(bucket, 0) + 1
        interval = self._interval.get(bucket, self.probe_every)
        if closed >= interval:
            self._interval[bucket] = min(2 * interval, self.max_probe_every)
            self._closed[bucket] = 0
            return True
        self._closed[bucket] = closed
        return False
