"""The serving shape: batch size, sequence length and the static buckets, with their rules.

One place for the rules, used by the runtime (``RuntimeConfig``), by ``exec-server`` / ``compile``
at argument parsing (an impossible shape exits 2 naming the flag, never a server that binds and
never becomes ready) and mirrored by the Helm chart's render-time check. No torch import: argument
errors stay fast.

* ``context_buckets`` (prefill lengths): each >= 2 (a [1, 1] prefill would look like decode); the
  largest <= ``max_seq_len`` and dividing it, so that a padded prefill chunk never writes past the
  cache. Default (:func:`default_context_buckets`): the largest = ``max_seq_len`` up to 512, else the
  largest power of two <= 512 dividing it (or, when that is under 64, the largest divisor <= 512);
  plus a quarter of it for short prompts when that is >= 16. 2048 -> (128, 512), 256 -> (64, 256).
* ``kv_buckets`` (attention lengths): each >= 1, the largest equal to ``max_seq_len``.
  Default: powers of two from the smallest context bucket, then ``max_seq_len``.
* ``batch_buckets`` (rows of a step: decode, and prefill chunks batched together): each >= 1, the
  largest equal to ``max_batch_size``. Default: powers of two below ``max_batch_size``, then it
  (8 -> 1, 2, 4, 8; 6 -> 1, 2, 4, 6). The engine runs each step in the smallest bucket that holds
  its rows, so one running request does not pay for ``max_batch_size``.
* ``speculation`` (``off`` | ``ngram`` | ``draft``) and ``num_speculative_tokens`` k: with speculation
  on, the verify graphs (S = k + 1) join the graph set; k is 1..16 (0 = the default, 4) and k + 2 <=
  ``max_seq_len``. The drafter is part of the shape because it sets the verify graph's q width (one-hot
  n-gram drafts vs a draft model's candidates); the draft model itself is not (``--draft-model``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_DEFAULT_CONTEXT_BUCKET = 512
SPECULATION_METHODS = ("off", "ngram", "draft")
DEFAULT_SPECULATIVE_TOKENS = 4
MAX_SPECULATIVE_TOKENS = 16


class ShapeError(ValueError):
    """An impossible serving shape; ``field`` names the setting (a RuntimeConfig/ServingShape field)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def default_context_buckets(max_seq_len: int) -> tuple[int, ...]:
    if max_seq_len < 2:
        raise ShapeError("max_seq_len", f"max_seq_len must be >= 2, got {max_seq_len}")
    if max_seq_len <= MAX_DEFAULT_CONTEXT_BUCKET:
        largest = max_seq_len
    else:
        largest = next(b for b in (512, 256, 128, 64, 32, 16, 8, 4, 2, 1) if max_seq_len % b == 0)
        if largest < 64:  # e.g. 1000: 8 would mean 125 chunks for a long prompt; 500 divides it
            largest = max(d for d in range(2, MAX_DEFAULT_CONTEXT_BUCKET + 1) if max_seq_len % d == 0)
    small = largest // 4
    return (small, largest) if small >= 16 else (largest,)


def pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 2 lo, 4 lo, ... below hi, then hi."""
    out, b = [], max(lo, 1)
    while b < hi:
        out.append(b)
        b *= 2
    return (*out, hi)


@dataclass(frozen=True)
class ServingShape:
    """Empty bucket tuples are derived from ``max_seq_len`` (see the module docstring)."""

    max_batch_size: int = 8
    max_seq_len: int = 2048
    context_buckets: tuple[int, ...] = field(default=())
    kv_buckets: tuple[int, ...] = field(default=())
    batch_buckets: tuple[int, ...] = field(default=())
    speculation: str = "off"  # SPECULATION_METHODS
    num_speculative_tokens: int = 0  # k (0 = DEFAULT_SPECULATIVE_TOKENS with speculation on)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ShapeError("max_batch_size", f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_seq_len < 2:
            raise ShapeError("max_seq_len", f"max_seq_len must be >= 2, got {self.max_seq_len}")
        ctx = tuple(sorted(set(self.context_buckets))) or default_context_buckets(self.max_seq_len)
        if ctx[0] < 2:
            raise ShapeError(
                "context_buckets",
                f"context buckets must be >= 2 (a [1, 1] prefill would look like decode): {ctx}",
            )
        if ctx[-1] > self.max_seq_len or self.max_seq_len % ctx[-1] != 0:
            raise ShapeError(
                "context_buckets",
                f"max_seq_len ({self.max_seq_len}) must be a multiple of the largest context bucket "
                f"({ctx[-1]}) so that a padded prefill chunk never writes past the cache",
            )
        kv = tuple(sorted(set(self.kv_buckets))) or pow2_buckets(ctx[0], self.max_seq_len)
        if kv[0] < 1 or kv[-1] != self.max_seq_len:
            raise ShapeError(
                "kv_buckets",
                f"KV buckets must be >= 1 and the largest KV bucket must equal max_seq_len "
                f"({self.max_seq_len}): {kv}",
            )
        batch = tuple(sorted(set(self.batch_buckets))) or pow2_buckets(1, self.max_batch_size)
        if batch[0] < 1 or batch[-1] != self.max_batch_size:
            raise ShapeError(
                "batch_buckets",
                f"batch buckets must be >= 1 and the largest batch bucket must equal max_batch_size "
                f"({self.max_batch_size}): {batch}",
            )
        object.__setattr__(self, "context_buckets", ctx)
        object.__setattr__(self, "kv_buckets", kv)
        object.__setattr__(self, "batch_buckets", batch)
        object.__setattr__(self, "num_speculative_tokens", self._speculative_tokens())

    def _speculative_tokens(self) -> int:
        if self.speculation not in SPECULATION_METHODS:
            raise ShapeError(
                "speculation",
                f"speculation must be one of {', '.join(SPECULATION_METHODS)}, got {self.speculation!r}",
            )
        k = self.num_speculative_tokens
        if self.speculation == "off":
            return 0
        k = k or DEFAULT_SPECULATIVE_TOKENS
        if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ShapeError(
                "num_speculative_tokens",
                f"num_speculative_tokens must be in 1..{MAX_SPECULATIVE_TOKENS}, got {k}",
            )
        if k + 2 > self.max_seq_len:
            raise ShapeError(
                "num_speculative_tokens",
                f"num_speculative_tokens ({k}) + 2 must be <= max_seq_len ({self.max_seq_len})",
            )
        return k

    def fields(self) -> dict[str, object]:
        """The shape as keyword arguments (``RuntimeConfig(**shape.fields(), ...)``)."""
        return {f: getattr(self, f) for f in SHAPE_FIELDS}

    def cli_flags(self) -> list[str]:
        """The shape as ``exec-server`` / ``compile`` flags, every bucket spelled out (the
        speculation flags only with speculation on)."""
        out: list[str] = []
        for f in SHAPE_FIELDS:
            v = getattr(self, f)
            if f in SPECULATION_FIELDS and self.speculation == "off":
                continue
            out += [f"--{f.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
        return out


SPECULATION_FIELDS = ("speculation", "num_speculative_tokens")
SHAPE_FIELDS = (
    "max_batch_size",
    "max_seq_len",
    "context_buckets",
    "kv_buckets",
    "batch_buckets",
    *SPECULATION_FIELDS,
)


def bucket_for(buckets: tuple[int, ...], n: int) -> int:
    """The smallest bucket >= n (buckets sorted; n must fit the largest)."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"no bucket holds {n} (largest {buckets[-1]})")
