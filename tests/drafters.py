"""Test drafters (``exec_service.engine.drafting.Drafter``) that make the verify graph meet every case.

``OracleDrafter`` knows the reference continuation of each prompt and proposes it with one draft
corrupted at a position that cycles from one proposal to the next, so verify steps accept every
count from 0 to k (k = all drafts right: the bonus token) — a stronger exercise of the verify path than
what n-gram drafts find in a random model. Greedy output must still be the reference, whatever is
proposed: a wrong draft is only ever rejected.
"""

from __future__ import annotations

from collections.abc import Sequence

from exec_service.engine.drafting import DraftRequest, NgramDrafter, Proposal


class OracleDrafter(NgramDrafter):
    def __init__(self, references: dict[tuple[int, ...], list[int]], vocab_size: int, k: int) -> None:
        super().__init__()
        self.references, self.vocab, self.k = references, vocab_size, k
        self.proposed: list[int] = []  # drafts per proposal, for the tests' own checks

    def propose(self, rows: Sequence[DraftRequest]) -> list[Proposal]:
        out = []
        for r in rows:
            drafts: tuple[int, ...] = ()
            for prompt, ref in self.references.items():
                n = len(prompt)
                gen = list(r.tokens[n:])
                if tuple(r.tokens[:n]) == prompt and ref[: len(gen)] == gen:
                    drafts = tuple(ref[len(gen) : len(gen) + r.max_drafts])
                    wrong = len(self.proposed) % (self.k + 1)  # == k: nothing corrupted
                    if wrong < len(drafts):
                        drafts = (*drafts[:wrong], (drafts[wrong] + 1) % self.vocab, *drafts[wrong + 1 :])
                    break
            self.proposed.append(len(drafts))
            out.append(Proposal(drafts))
        return out


class WrongDrafter(NgramDrafter):
    """Always proposes copies of one token, which the target rarely picks: nothing to copy."""

    def __init__(self, token: int) -> None:
        super().__init__()
        self.token = token
        self.calls = 0

    def propose(self, rows: Sequence[DraftRequest]) -> list[Proposal]:
        self.calls += len(rows)
        return [Proposal((self.token,) * r.max_drafts) for r in rows]
