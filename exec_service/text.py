"""Text around the token engine: incremental UTF-8-safe detokenization and stop strings.

Detokenization decodes a sliding window of token ids and emits only the text that has become
stable: a multi-byte character split over several byte-level tokens decodes to U+FFFD until its
last byte arrives, so such text is held back rather than streamed. Decoding the window together
with a few earlier tokens keeps SentencePiece's leading-space handling right.

Stop strings may span tokens and flushes, so the text that could still be the start of a stop
string is held back; stop text never reaches the client unless ``include_stop_in_output``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

_REPLACEMENT = "\ufffd"


class TokenDecoder:
    """``tokenizer.decode(ids, skip_special_tokens=…, clean_up_tokenization_spaces=False)``, made
    cheap for streaming (one per tokenizer and setting, shared by all streams):

    * a transformers fast tokenizer whose class overrides neither ``decode`` nor ``_decode`` does
      nothing but call its Rust tokenizer with these arguments, so that is called directly (no
      ``to_py_obj`` walk, no keyword plumbing);
    * a one-token window — the detokenizer's prefix on every step of a one-token-per-step stream —
      is a pure function of its id: decoded once, then looked up.
    """

    MAX_CACHED = 1 << 17  # cleared beyond this (bounded by the vocabulary in practice)

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self._decode = _direct_decode(tokenizer, skip_special_tokens) or self._generic
        self._one: dict[int, str] = {}

    def _generic(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def __call__(self, ids: Sequence[int]) -> str:
        if len(ids) != 1:
            return self._decode(ids)
        t = ids[0]
        s = self._one.get(t)
        if s is None:
            if len(self._one) >= self.MAX_CACHED:
                self._one.clear()
            s = self._one[t] = self._decode(ids)
        return s


class TokenDecoders:
    """The shared :class:`TokenDecoder` of one tokenizer, per ``skip_special_tokens`` setting."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._by_skip: dict[bool, TokenDecoder] = {}

    def get(self, skip_special_tokens: bool) -> TokenDecoder:
        d = self._by_skip.get(skip_special_tokens)
        if d is None:
            d = self._by_skip[skip_special_tokens] = TokenDecoder(self.tokenizer, skip_special_tokens)
        return d


def _direct_decode(tokenizer: Any, skip: bool) -> Callable[[Sequence[int]], str] | None:
    """The Rust tokenizer's ``decode`` when it is exactly what ``tokenizer.decode`` would run."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls = type(tokenizer)
    if not (
        isinstance(tokenizer, TokenizersBackend)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is TokenizersBackend._decode
    ):
        return None
    backend = tokenizer._tokenizer
    decode = backend.decode

    def direct(ids: Sequence[int]) -> str:
        return decode(ids if isinstance(ids, list) else list(ids), skip_special_tokens=skip)

    return direct


@dataclass
class IncrementalDetokenizer:
    """Feed token ids one flush at a time; get back the newly stable text."""

    tokenizer: Any  # a transformers PreTrainedTokenizer(Fast)
    prompt_ids: Sequence[int] = ()
    skip_special_tokens: bool = True
    ids: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0
    # a shared TokenDecoder for this tokenizer and skip_special_tokens (one is made if not given)
    decoder: TokenDecoder | None = None

    def __post_init__(self) -> None:
        # Start the window on the last few prompt tokens so the first generated token decodes in
        # context (a leading space of a SentencePiece token is kept).
        tail = list(self.prompt_ids[-6:])
        self.ids = tail
        self._prefix_offset = 0
        self._read_offset = len(tail)
        if self.decoder is None:
            self.decoder = TokenDecoder(self.tokenizer, self.skip_special_tokens)
        else:
            assert self.decoder.tokenizer is self.tokenizer
            assert self.decoder.skip_special_tokens == self.skip_special_tokens
        self._decode = self.decoder

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
        self._firsts = frozenset(s[0] for s in self.stops)

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
        # hold back the longest suffix (shorter than the longest stop) that is a prefix of some
        # stop string: candidates start where a stop string's first character is
        hold = 0
        firsts, n = self._firsts, len(buf)
        for i in range(n - min(n, self._longest - 1), n):
            if buf[i] in firsts:
                suffix = buf[i:]
                if any(s.startswith(suffix) for s in self.stops):
                    hold = n - i
                    break
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """End of stream without a match: release what was held back."""
        out, self._held = self._held, ""
        return "" if self.matched is not None else out
