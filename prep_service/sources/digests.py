"""sha256 of source files, remembered by file identity.

Preparing the same checkpoint again (another tp degree, dtype, quantization, or after a failure)
would otherwise re-read and re-hash every byte of it before converting anything: ~1 s per GB at
sha256's single-core speed. The digest of a file is remembered in a small JSON entry per file,
keyed by its real path and trusted only while the file's identity is unchanged: device, inode,
size, mtime and ctime (all in nanoseconds). Any write, truncation, replacement (new inode), chmod
or ``touch`` changes one of them and the file is hashed again.

Racy writes: timestamps advance in clock ticks, so a file modified right after being hashed could
keep the same mtime. An entry is therefore only recorded when the file was not modified in the
``RACY_S`` seconds before hashing began and its identity did not change while it was hashed (the
"racily clean" rule git applies to its index).

Location: ``$NEURON_SERVE_DIGEST_CACHE`` (a directory; ``off`` disables the cache), else
``source-sha256/`` in the user cache directory (next to the default store).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from shared.storage import sha256_file  # a module global: tests count the files it hashes

ENV = "NEURON_SERVE_DIGEST_CACHE"
RACY_S = 2.0
_FIELDS = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")


def _identity(st: os.stat_result) -> dict[str, int]:
    return {k: int(getattr(st, k)) for k in _FIELDS}


class DigestCache:
    """File path -> sha256, valid while the file's identity is unchanged. ``root=None`` disables it."""

    def __init__(self, root: Path | None):
        self.root = root

    @classmethod
    def default(cls) -> DigestCache:
        env = os.environ.get(ENV)
        if env is not None:
            return cls(None if env.strip().lower() in ("", "off", "0", "none") else Path(env).expanduser())
        import platformdirs

        return cls(Path(platformdirs.user_cache_dir("neuron-serve")) / "source-sha256")

    def _entry(self, real: str) -> Path:
        assert self.root is not None
        return self.root / (
            hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:40] + ".json"
        )

    def lookup(self, path: Path) -> str | None:
        """The remembered digest if the file is unchanged since it was recorded, else None."""
        if self.root is None:
            return None
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
            entry = json.loads(self._entry(real).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("path") != real or entry.get("id") != _identity(st):
            return None
        digest = entry.get("sha256")
        return digest if isinstance(digest, str) and len(digest) == 64 else None

    def sha256(self, path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
        """The file's sha256: remembered, or computed (and remembered when that is safe)."""
        hit = self.lookup(path)
        if hit is not None:
            if on_bytes:
                on_bytes(os.stat(path).st_size)
            return hit
        real = os.path.realpath(path)
        started_ns = time.time_ns()
        before = os.stat(real)
        digest = sha256_file(Path(real), on_bytes)
        if self.root is not None:
            with contextlib.suppress(OSError):
                after = os.stat(real)
                quiet_since = started_ns - int(RACY_S * 1e9)
                if (
                    _identity(before) == _identity(after)
                    and before.st_mtime_ns < quiet_since
                    and before.st_ctime_ns < quiet_since
                ):
                    self._store(real, after, digest)
        return digest

    def _store(self, real: str, st: os.stat_result, digest: str) -> None:
        """Atomic (temp file + rename): a concurrent reader sees the old entry or the new one."""
        assert self.root is not None
        self.root.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"path": real, "id": _identity(st), "sha256": digest}).encode()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._entry(real))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
