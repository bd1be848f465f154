"""Incremental detokenization and stop strings against the real SmolLM2 tokenizer."""

from __future__ import annotations

import functools

import pytest

from exec_service.text import IncrementalDetokenizer, StopMatcher
from tests.helpers import smollm2_gguf

TEXTS = [
    "Hello world, this is a test.",
    "Ünïcödé — naïve café 🤖🚀 ok",
    "日本語のテキストと emoji 👩‍👩‍👧 mixed",
    "  leading spaces and\nnew lines\n\n  indented",
]


@functools.cache
def tokenizer():
    from transformers import AutoTokenizer

    g = smollm2_gguf()
    return AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("flush_every", [1, 3])
def test_streamed_text_equals_decode_and_never_has_replacement_chars(text: str, flush_every: int) -> None:
    tok = tokenizer()
    prompt = tok.encode("Say:", add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids) or text.isascii()  # multi-byte splits exist
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    chunks = [detok.push(ids[i : i + flush_every]) for i in range(0, len(ids), flush_every)]
    chunks.append(detok.flush())
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == tok.decode(ids, clean_up_tokenization_spaces=False)


def test_special_tokens_skipped_or_kept() -> None:
    tok = tokenizer()
    ids = [*tok.encode("hi", add_special_tokens=False), tok.eos_token_id]
    skip = IncrementalDetokenizer(tok, skip_special_tokens=True)
    keep = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert skip.push(ids) + skip.flush() == "hi"
    assert keep.push(ids) + keep.flush() == "hi" + tok.eos_token


def _run(stops, chunks, include=False):
    m = StopMatcher(stops, include_stop_in_output=include)
    out = "".join(m.push(c) for c in chunks)
    return out + m.flush(), m.matched


def test_stop_spanning_chunks_is_held_back_and_not_leaked() -> None:
    m = StopMatcher(["</end>"])
    assert m.push("abc</") == "abc"  # "</" could start the stop: held
    assert m.push("en") == ""
    assert m.push("d> tail") == ""
    assert m.matched == "</end>"
    assert m.push("more") == ""


def test_stop_variants() -> None:
    assert _run(["STOP"], ["a", "bST", "OPc"]) == ("ab", "STOP")
    assert _run(["STOP"], ["a", "bST", "OPc"], include=True) == ("abSTOP", "STOP")
    assert _run(["xyz"], ["xy", "a"]) == ("xya", None)  # held text released when it stops matching
    assert _run(["xyz"], ["abc", "xy"]) == ("abcxy", None)  # released at the end of the stream
    assert _run(["bc", "abcd"], ["xabcd"]) == ("x", "abcd")  # the earliest match wins
    assert _run(["bc", "xb"], ["axbc"]) == ("a", "xb")
    assert _run([], ["plain"]) == ("plain", None)


def _held_reference(buf: str, stops: list[str]) -> int:
    """The hold-back rule, written plainly: the longest suffix of ``buf`` (shorter than the longest
    stop) that is a prefix of some stop string."""
    longest = max(len(s) for s in stops)
    for n in range(min(len(buf), longest - 1), 0, -1):
        if any(s.startswith(buf[-n:]) for s in stops):
            return n
    return 0


def test_stop_hold_back_matches_the_plain_rule() -> None:
    import random

    rng = random.Random(5)
    alphabet = "ab</>\n "
    for _ in range(3000):
        stops = ["".join(rng.choices(alphabet, k=rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        m = StopMatcher(stops)
        sent = ""
        for _ in range(rng.randint(1, 6)):
            chunk = "".join(rng.choices(alphabet, k=rng.randint(0, 5)))
            buf = m._held + chunk
            out = m.push(chunk)
            sent += out
            if m.matched is not None:
                break
            assert len(buf) - len(out) == _held_reference(buf, stops), (stops, buf)
        else:
            sent += m.flush()
        if m.matched is None:
            assert not any(s in sent for s in stops)


def test_token_decoder_equals_tokenizer_decode_and_takes_the_direct_path() -> None:
    from exec_service.text import TokenDecoder, TokenDecoders

    tok = tokenizer()
    ids = [*tok.encode(" ".join(TEXTS), add_special_tokens=False), tok.eos_token_id, 1]
    for skip in (True, False):
        dec = TokenDecoders(tok).get(skip)
        assert dec._decode != dec._generic  # a fast tokenizer: straight to the Rust decode
        for a in range(0, len(ids), 7):
            for b in (a, a + 1, a + 2, a + 9):
                want = tok.decode(ids[a:b], skip_special_tokens=skip, clean_up_tokenization_spaces=False)
                assert dec(ids[a:b]) == want
                assert dec(tuple(ids[a:b])) == want
                assert dec(ids[a:b]) == want  # cached one-token windows too

    class Overrides(type(tok)):  # a class with its own decode keeps tokenizer.decode
        def _decode(self, token_ids, **kw):
            return "<" + super()._decode(token_ids, **kw) + ">"

    odd = Overrides.__new__(Overrides)
    odd.__dict__.update(tok.__dict__)
    dec = TokenDecoder(odd)
    assert dec._decode == dec._generic
    assert dec(ids[:3]) == "<" + tok.decode(ids[:3], skip_special_tokens=True) + ">"
