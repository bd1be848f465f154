"""The store contract: object info and errors, key validation, hashing helpers, the ObjectStore ABC.

See the package docstring (``shared/storage/__init__.py``) for the contract every store keeps.
The helpers below the keys section are shared by the two implementations (``file.py``, ``s3.py``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAX_KEY_BYTES = 1024
"""S3's own limit on a key's UTF-8 length; enforced for file:// too so keys stay portable."""

TMP_PREFIX = ".tmp-"
"""Name prefix of in-flight temp files. Reserved: no key segment may start with it."""

COPY_CHUNK = 4 << 20
HASH_CHUNK = 8 << 20
MiB = 1 << 20
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------------------------------
# Types and errors


@dataclass(frozen=True)
class ObjectInfo:
    """What is known about a stored object.

    ``sha256`` (lowercase hex) is filled in where it is cheap to know: results of writes and
    downloads, and S3 ``stat`` (from the object's metadata). ``list`` and file:// ``stat`` leave it
    ``None`` rather than re-reading every byte; the manifest is the authority on checksums.
    """

    key: str
    size: int
    sha256: str | None


class StoreError(Exception):
    """An I/O or remote failure (after the client's own retries). The message names the key's URI."""


class ObjectExists(StoreError):
    """A conditional create found the key already present (the existing object is left untouched)."""


# --------------------------------------------------------------------------------------------------
# Keys and hashing


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe, portable object key; raise ``ValueError`` naming it otherwise.

    Rejected: empty keys, absolute paths, backslashes (a Windows separator that S3 would keep
    literally), ``.``/``..``/empty segments (so ``a//b`` and trailing ``/`` are out), NUL, keys over
    1024 UTF-8 bytes, and segments starting with ``.tmp-`` (reserved for in-flight writes). The
    same rules for both stores mean a key can never escape a file:// root and never means two
    different things on two backends.
    """
    if not isinstance(key, str):
        raise TypeError(f"object key must be str, got {type(key).__name__}: {key!r}")
    if key == "":
        raise ValueError("invalid object key '': must not be empty")
    if "\x00" in key:
        raise ValueError(f"invalid object key {key!r}: contains NUL")
    if "\\" in key:
        raise ValueError(f"invalid object key {key!r}: contains a backslash")
    if key.startswith("/"):
        raise ValueError(f"invalid object key {key!r}: must be relative (no leading '/')")
    try:
        nbytes = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(f"invalid object key {key!r}: not encodable as UTF-8") from exc
    if nbytes > MAX_KEY_BYTES:
        raise ValueError(f"invalid object key {key[:64]!r}...: {nbytes} bytes > {MAX_KEY_BYTES}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"invalid object key {key!r}: empty, '.' or '..' path segment")
        if segment.startswith(TMP_PREFIX):
            raise ValueError(f"invalid object key {key!r}: segments starting {TMP_PREFIX!r} are reserved")
    return key


def normalize_prefix(prefix: str) -> str:
    """``""`` stays ``""``; otherwise drop trailing ``/`` and validate like a key."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be str, got {type(prefix).__name__}: {prefix!r}")
    if prefix == "":
        return ""
    stripped = prefix.rstrip("/")
    if stripped == "":
        raise ValueError(f"invalid prefix {prefix!r}")
    try:
        return validate_key(stripped)
    except ValueError as exc:
        raise ValueError(f"invalid prefix {prefix!r}: {exc}") from None


def under_prefix(key: str, prefix: str) -> bool:
    return prefix == "" or key == prefix or key.startswith(prefix + "/")


def check_sha256(sha256: str | None) -> str | None:
    if sha256 is not None and not SHA256_HEX.fullmatch(sha256):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
    return sha256


def sha256_file(path: str | os.PathLike[str], on_bytes: Callable[[int], None] | None = None) -> str:
    """Lowercase hex SHA-256 of a local file, read in chunks into one reused buffer (memory stays
    bounded); ``on_bytes(n)`` is called after each chunk (progress; raising from it stops)."""
    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if on_bytes is not None:
                on_bytes(n)
    return h.hexdigest()


def file_mismatch(path: Path, size: int, sha256: str, what: str, listed_in: str) -> str | None:
    """Why a fetched file is not the one ``listed_in`` (e.g. "the manifest") lists, or None."""
    if not path.exists():
        return f"{what} is missing from the store"
    actual = path.stat().st_size
    if actual != size:
        return f"{what}: size {actual} does not match {listed_in}'s {size} bytes"
    digest = sha256_file(path)
    if digest != sha256:
        return f"{what}: sha256 {digest} does not match {listed_in}'s {sha256}"
    return None


def copy_hashing(src: BinaryIO, dst: BinaryIO) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` hashing on the way: one pass over the bytes instead of two."""
    h = hashlib.sha256()
    size = 0
    while chunk := src.read(COPY_CHUNK):
        h.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    return size, h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Persist a rename: without it a crash can lose the directory entry of a 'published' file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(final: Path) -> Path:
    # Same directory as the final name, so os.replace / os.link never cross a filesystem.
    return final.parent / f"{TMP_PREFIX}{final.name}.{uuid.uuid4().hex}"


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def not_found(uri: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, "object not found", uri)


def download_to(dest: str | os.PathLike[str], fill: Callable[[Path], None], what: str) -> tuple[int, str]:
    """Create ``dest`` atomically: ``fill`` writes a temp sibling, which is hashed and renamed.

    A crash or error never leaves a truncated file under the final name, so a loader that finds
    the file can trust it is complete (its sha256 is still checked against the manifest).
    """
    final = Path(dest)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"downloading {what} to {final}: {exc}") from exc
    tmp = temp_sibling(final)
    try:
        fill(tmp)
        size = os.path.getsize(tmp)
        digest = sha256_file(tmp)
        os.replace(tmp, final)
    except (StoreError, FileNotFoundError):
        raise
    except OSError as exc:
        raise StoreError(f"downloading {what} to {final}: {exc}") from exc
    finally:
        unlink_quietly(tmp)
    fsync_dir(final.parent)
    return size, digest


# --------------------------------------------------------------------------------------------------
# Interface


class ObjectStore(ABC):
    """A flat key → bytes store rooted at :attr:`uri`. See the module docstring for the contract."""

    uri: str
    """Normalized root: ``file:///abs/dir`` or ``s3://bucket[/prefix]``, no trailing slash."""

    def uri_for(self, key: str) -> str:
        """Full URI of ``key`` (accepted by :func:`split_uri`)."""
        return f"{self.uri}/{validate_key(key)}"

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None) -> ObjectInfo:
        """Publish a local file atomically. ``sha256`` (hex) is trusted if given, else computed."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        """Publish ``data`` atomically, replacing any existing object."""

    @abstractmethod
    def create_exclusive(self, key: str, data: bytes) -> ObjectInfo:
        """Create ``key`` only if absent (atomically); raise :class:`ObjectExists` otherwise."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The whole object; ``FileNotFoundError`` if absent. Meant for small objects (manifests)."""

    @abstractmethod
    def download_file(self, key: str, path: str | os.PathLike[str]) -> ObjectInfo:
        """Write the object to ``path`` atomically (temp + rename); size and sha256 of what was written."""

    def exists(self, key: str) -> bool:
        """True if an object (not a mere prefix) is stored under ``key``."""
        return self.stat(key) is not None

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size (and sha256 where cheaply known) of ``key``, or ``None`` if absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """All objects under ``prefix`` (whole segments), recursively, keys relative to the root, sorted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (``""`` = everything); return how many were deleted."""

    def local_path(self, key: str) -> Path | None:
        """Local filesystem path of ``key`` for stores that have one (lets callers mmap), else None."""
        validate_key(key)
        return None

    def staging_root(self) -> Path | None:
        """A local directory where files meant for :meth:`adopt_file` can be written so that
        publishing them is a rename (file:// stores); None where publishing means uploading."""
        return None

    def adopt_file(self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None) -> ObjectInfo:
        """Publish a file the caller no longer needs (it may be moved rather than copied)."""
        info = self.put_file(key, path, sha256=sha256)
        Path(path).unlink(missing_ok=True)
        return info

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
