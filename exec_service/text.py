"""Text around the token engine: incremental UTF-8-safe detokenization and stop strings.

Detokenization decodes a sliding window of token ids and emits only the text that has become
stable: a multi-byte character split over several byte-level tokens decodes to U+FFFD until its
last byte arrives, so such text is held back rather than streamed. Decoding the window together
with a few earlier tokens keeps SentencePiece's leading-space handling right.

Stop strings may span tokens and flushes, so the text that could still be the start of a stop
string is held back; stop text never reaches the client unless ``include_stop_in_output``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

_REPLACEMENT = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    """Feed token ids one flush at a time; get back the newly stable text."""

    tokenizer: Any  # a transformers PreTrainedTokenizer(Fast)
    prompt_ids: Sequence[int] = ()
    skip_special_tokens: bool = True
    ids: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0

    def __post_init__(self) -> None:
        # Start the window on the last few prompt tokens so the first generated token decodes in
        # context (a leading space of a SentencePiece token is kept).
        tail = list(self.prompt_ids[-6:])
        self.ids = tail
        self._prefix_offset = 0
        self._read_offset = len(tail)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def push(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in new_ids)
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        if full.endswith(_REPLACEMENT) or len(full) <= len(prefix):
            return ""  # an incomplete multi-byte character: wait for its remaining bytes
        # keep the window small: everything up to here is final
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """At the end of a stream: whatever is left, even if it is an incomplete character."""
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


@dataclass
class StopMatcher:
    """Finds stop strings across chunk boundaries and holds back text that may start one."""

    stops: Sequence[str]
    include_stop_in_output: bool = False
    _held: str = ""
    matched: str | None = None

    def __post_init__(self) -> None:
        self.stops = [s for s in self.stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)

    def push(self, text: str) -> str:
        """Add new text; returns what may be sent now. After a match, ``matched`` is set."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        first: tuple[int, str] | None = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (first is None or i < first[0] or (i == first[0] and len(s) > len(first[1]))):
                first = (i, s)
        if first is not None:
            i, s = first
            self.matched = s
            self._held = ""
            return buf[: i + len(s)] if self.include_stop_in_output else buf[:i]
        # hold back the longest suffix that is a prefix of some stop string
        hold = 0
        for n in range(min(len(buf), self._longest - 1), 0, -1):
            suffix = buf[-n:]
            if any(s.startswith(suffix) for s in self.stops):
                hold = n
                break
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """End of stream without a match: release what was held back."""
        out, self._held = self._held, ""
        return "" if self.matched is not None else out
