"""The object store: one small interface over a local directory (``file://``) and S3 (``s3://``).

Both services talk to artifacts only through :class:`ObjectStore`, so the prep service can publish
to a laptop's cache directory or to a bucket with the same code, and the exec service can load from
either. The contract that matters for correctness (DESIGN.md §4):

* every write is an *atomic publish*: a reader sees either no object or the complete object, never a
  partial one (temp file + ``os.replace`` locally; a single PUT / completed multipart upload on S3);
* :meth:`ObjectStore.create_exclusive` is a conditional create, used for ``manifest.json`` which is
  written **last**: two concurrent preparations of the same artifact cannot both "win";
* keys are validated the same way for both stores (:func:`validate_key`), so a key that works on a
  developer's ``file://`` store also works on S3 and can never escape the store root.

Keys are ``/``-separated and relative to the store root. Prefix arguments (``list``,
``delete_prefix``) match whole path segments: prefix ``models/x`` covers ``models/x`` and
``models/x/...`` but not ``models/xy`` — so deleting one artifact cannot take a sibling with it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import os
import re
import stat as stat_mod
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, unquote

__all__ = [
    "MAX_KEY_BYTES",
    "TMP_PREFIX",
    "FileStore",
    "ObjectExists",
    "ObjectInfo",
    "ObjectStore",
    "S3Store",
    "StoreError",
    "default_store_uri",
    "open_store",
    "sha256_file",
    "split_uri",
    "validate_key",
]

MAX_KEY_BYTES = 1024
"""S3's own limit on a key's UTF-8 length; enforced for file:// too so keys stay portable."""

TMP_PREFIX = ".tmp-"
"""Name prefix of in-flight temp files. Reserved: no key segment may start with it."""

_COPY_CHUNK = 4 << 20
_MiB = 1 << 20
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


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


def _normalize_prefix(prefix: str) -> str:
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


def _under_prefix(key: str, prefix: str) -> bool:
    return prefix == "" or key == prefix or key.startswith(prefix + "/")


def _check_sha256(sha256: str | None) -> str | None:
    if sha256 is not None and not _SHA256_HEX.fullmatch(sha256):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
    return sha256


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Lowercase hex SHA-256 of a local file, read in chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _copy_hashing(src: BinaryIO, dst: BinaryIO) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` hashing on the way: one pass over the bytes instead of two."""
    h = hashlib.sha256()
    size = 0
    while chunk := src.read(_COPY_CHUNK):
        h.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    return size, h.hexdigest()


def _fsync_dir(path: Path) -> None:
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


def _temp_sibling(final: Path) -> Path:
    # Same directory as the final name, so os.replace / os.link never cross a filesystem.
    return final.parent / f"{TMP_PREFIX}{final.name}.{uuid.uuid4().hex}"


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _not_found(uri: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, "object not found", uri)


def _download_to(dest: str | os.PathLike[str], fill: Callable[[Path], None], what: str) -> tuple[int, str]:
    """Create ``dest`` atomically: ``fill`` writes a temp sibling, which is hashed and renamed.

    A crash or error never leaves a truncated file under the final name, so a loader that finds
    the file can trust it is complete (its sha256 is still checked against the manifest).
    """
    final = Path(dest)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"downloading {what} to {final}: {exc}") from exc
    tmp = _temp_sibling(final)
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
        _unlink_quietly(tmp)
    _fsync_dir(final.parent)
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


# --------------------------------------------------------------------------------------------------
# file://


class FileStore(ObjectStore):
    """Objects are files under a root directory (created on demand by the first write).

    Writes go to a ``.tmp-*`` sibling that is fsynced and then renamed over the final name, so
    readers (including ones that mmap the file) never see a partial object. ``create_exclusive``
    publishes with ``os.link``, which fails atomically if the name exists. Every key is also checked
    *after* resolving symlinks, so a symlink planted inside the root cannot redirect a write outside.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        # abspath (not resolve): keep the caller's spelling of the root in URIs, normalize ".." away.
        self.root = Path(os.path.abspath(Path(root).expanduser()))
        self.uri = self.root.as_uri()

    def uri_for(self, key: str) -> str:
        # Percent-encode like Path.as_uri() does for the root, so open_store/split_uri round-trip.
        return f"{self.uri}/{quote(validate_key(key), safe='/')}"

    # -- paths --------------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        path = self.root.joinpath(*validate_key(key).split("/"))
        self._check_inside(path, key)
        return path

    def _check_inside(self, path: Path, what: str) -> None:
        real_root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
            raise ValueError(f"object key {what!r} resolves outside the store root {self.uri} (symlink?)")

    # -- writes -------------------------------------------------------------------------------------

    def _publish(self, key: str, write: Callable[[BinaryIO], None], *, exclusive: bool) -> None:
        final = self._path(key)
        uri = self.uri_for(key)
        tmp = _temp_sibling(final)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._check_inside(final, key)  # again: mkdir may have walked through a new symlink
            with open(tmp, "xb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    raise ObjectExists(f"object already exists: {uri}") from None
            else:
                os.replace(tmp, final)
        except StoreError:
            raise
        except OSError as exc:
            raise StoreError(f"writing {uri} failed: {exc}") from exc
        finally:
            _unlink_quietly(tmp)  # gone already after os.replace; the spare link after os.link
        _fsync_dir(final.parent)

    def put_file(self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None) -> ObjectInfo:
        validate_key(key)
        _check_sha256(sha256)
        result: dict[str, Any] = {}
        with open(path, "rb") as src:  # a missing source raises FileNotFoundError naming *it*

            def write(dst: BinaryIO) -> None:
                if sha256 is None:
                    result["size"], result["sha256"] = _copy_hashing(src, dst)
                else:
                    while chunk := src.read(_COPY_CHUNK):
                        dst.write(chunk)
                    result["size"], result["sha256"] = dst.tell(), sha256

            self._publish(key, write, exclusive=False)
        return ObjectInfo(key, result["size"], result["sha256"])

    def staging_root(self) -> Path | None:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def adopt_file(self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None) -> ObjectInfo:
        """On the same filesystem: fsync, then an atomic rename into place (no copy)."""
        src = Path(path)
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            same_fs = os.stat(src).st_dev == os.stat(final.parent).st_dev
        except OSError:
            same_fs = False
        if not same_fs:
            return super().adopt_file(key, src, sha256=sha256)
        size = src.stat().st_size
        try:
            with open(src, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(src, final)
        except OSError as exc:
            raise StoreError(f"publishing {self.uri_for(key)} failed: {exc}") from exc
        _fsync_dir(final.parent)
        return ObjectInfo(key, size, sha256)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        validate_key(key)
        self._publish(key, lambda f: f.write(data), exclusive=False)
        return ObjectInfo(key, len(data), hashlib.sha256(data).hexdigest())

    def create_exclusive(self, key: str, data: bytes) -> ObjectInfo:
        validate_key(key)
        self._publish(key, lambda f: f.write(data), exclusive=True)
        return ObjectInfo(key, len(data), hashlib.sha256(data).hexdigest())

    # -- reads --------------------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise _not_found(self.uri_for(key)) from None
        except OSError as exc:
            raise StoreError(f"reading {self.uri_for(key)} failed: {exc}") from exc

    def download_file(self, key: str, path: str | os.PathLike[str]) -> ObjectInfo:
        src_path = self._path(key)
        uri = self.uri_for(key)
        try:
            src = open(src_path, "rb")  # noqa: SIM115 - closed below; open first so absence is cheap
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise _not_found(uri) from None
        except OSError as exc:
            raise StoreError(f"reading {uri} failed: {exc}") from exc
        with src:

            def fill(tmp: Path) -> None:
                with open(tmp, "xb") as dst:
                    _copy_hashing(src, dst)
                    dst.flush()
                    os.fsync(dst.fileno())

            size, digest = _download_to(path, fill, uri)
        return ObjectInfo(key, size, digest)

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StoreError(f"stat {self.uri_for(key)} failed: {exc}") from exc
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(key, st.st_size, None)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        norm = _normalize_prefix(prefix)
        start = self.root.joinpath(*norm.split("/")) if norm else self.root
        if norm:
            self._check_inside(start, norm)
        if start.is_file():
            info = self.stat(norm)
            return [info] if info is not None else []
        out: list[ObjectInfo] = []
        real_root = os.path.realpath(self.root).rstrip(os.sep) + os.sep

        def on_error(exc: OSError) -> None:
            if not isinstance(exc, FileNotFoundError):
                raise StoreError(f"listing {self.uri}/{norm} failed: {exc}") from exc

        for dirpath, _dirnames, filenames in os.walk(start, onerror=on_error):
            for name in filenames:
                if name.startswith(TMP_PREFIX):
                    continue
                full = os.path.join(dirpath, name)
                key = os.path.relpath(full, self.root).replace(os.sep, "/")
                try:
                    validate_key(key)
                except ValueError:
                    continue  # not addressable through this API (e.g. a stray "a\\b" file)
                if not os.path.realpath(full).startswith(real_root):
                    continue  # symlink leading out of the root
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue  # deleted while we walked
                except OSError as exc:
                    raise StoreError(f"stat {self.uri_for(key)} failed: {exc}") from exc
                if stat_mod.S_ISREG(st.st_mode):
                    out.append(ObjectInfo(key, st.st_size, None))
        out.sort(key=lambda info: info.key)
        return out

    # -- deletes ------------------------------------------------------------------------------------

    def delete_prefix(self, prefix: str) -> int:
        norm = _normalize_prefix(prefix)
        count = 0
        for info in self.list(norm):
            try:
                os.unlink(self.root.joinpath(*info.key.split("/")))
                count += 1
            except FileNotFoundError:
                continue  # a concurrent delete got there first
            except OSError as exc:
                raise StoreError(f"deleting {self.uri_for(info.key)} failed: {exc}") from exc
        self._prune_empty_dirs(norm)
        return count

    def _prune_empty_dirs(self, norm: str) -> None:
        """Remove directories left empty under (and above) the prefix; never the root itself."""
        start = self.root.joinpath(*norm.split("/")) if norm else self.root
        if start.is_dir():
            for dirpath, _dirnames, _filenames in os.walk(start, topdown=False):
                if Path(dirpath) != self.root:
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)  # fails (and is skipped) while anything, e.g. a temp, remains
        parent = start.parent if norm else self.root
        while parent != self.root and self.root in parent.parents:
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = parent.parent

    def local_path(self, key: str) -> Path | None:
        """The object's path (it may not exist yet); safe to mmap because writes replace, never modify."""
        return self._path(key)


# --------------------------------------------------------------------------------------------------
# s3://


class S3Store(ObjectStore):
    """Objects in an S3 bucket (under an optional key prefix), through boto3.

    * Credentials, region and endpoint come from the standard boto3 chain; ``AWS_ENDPOINT_URL`` /
      ``AWS_ENDPOINT_URL_S3`` are honoured by botocore itself (an explicit ``endpoint_url`` wins).
      With a custom endpoint, path-style addressing is used (S3-compatible servers such as SeaweedFS
      or MinIO rarely have wildcard DNS for virtual-hosted buckets).
    * Retries: botocore "standard" mode (exponential backoff with jitter, also on throttling and
      connection errors); failures that survive them become :class:`StoreError` naming the key.
    * Integrity: uploads ask for SHA-256 checksums, so the server verifies every part of a multipart
      upload (and every single PUT); the whole-file sha256 is stored as user metadata ``sha256``.
    * ``create_exclusive`` uses ``If-None-Match: *`` (S3 conditional writes).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        multipart_threshold: int = 8 * _MiB,
        multipart_chunksize: int = 8 * _MiB,
        max_concurrency: int = 4,
        addressing_style: str | None = None,
        client: Any | None = None,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not bucket or "/" in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=max_concurrency > 1,
        )
        if client is not None:
            self._client = client
            self.region_name = client.meta.region_name
            return
        # A private Session per store: boto3's default session is global state and not thread-safe.
        session = boto3.session.Session(region_name=region_name)
        self.region_name = region_name or session.region_name or "us-east-1"
        custom_endpoint = (
            endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        config = Config(
            region_name=self.region_name,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, 2 * max_concurrency),
            s3={"addressing_style": addressing_style or ("path" if custom_endpoint else "auto")},
            user_agent_extra="neuron-serve",
        )
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)

    @property
    def client(self) -> Any:
        """The underlying boto3 S3 client (thread-safe; shared by all calls on this store)."""
        return self._client

    @property
    def endpoint_url(self) -> str:
        return str(self._client.meta.endpoint_url)

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- errors -------------------------------------------------------------------------------------

    @staticmethod
    def _error_code(exc: Exception) -> tuple[str, int | None]:
        response = getattr(exc, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code, status

    def _fail(self, op: str, uri: str, exc: BaseException) -> Exception:
        """Translate a boto error into this module's exceptions (called after botocore's retries)."""
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code, status = self._error_code(exc)
            if code in ("NoSuchKey", "404", "NotFound"):
                return _not_found(uri)
            message = exc.response.get("Error", {}).get("Message", "")
            return StoreError(f"S3 {op} {uri} failed: {code or status} {message}".rstrip())
        return StoreError(f"S3 {op} {uri} failed: {type(exc).__name__}: {exc}")

    @staticmethod
    def _boto_errors() -> tuple[type[BaseException], ...]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        return (ClientError, BotoCoreError, Boto3Error)

    # -- writes -------------------------------------------------------------------------------------

    def put_file(self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None) -> ObjectInfo:
        validate_key(key)
        _check_sha256(sha256)
        src = Path(path)
        size = src.stat().st_size  # a missing source raises FileNotFoundError naming *it*
        digest = sha256 or sha256_file(src)
        uri = self.uri_for(key)
        extra = {
            "ChecksumAlgorithm": "SHA256",  # per-part SHA-256, verified by the server
            "Metadata": {"sha256": digest},
            "ContentType": "application/octet-stream",
        }
        try:
            self._client.upload_file(
                str(src), self.bucket, self._k(key), ExtraArgs=extra, Config=self._transfer
            )
        except self._boto_errors() as exc:
            raise self._fail("upload", uri, exc) from exc
        return ObjectInfo(key, size, digest)

    def _put(self, key: str, data: bytes, **conditions: str) -> ObjectInfo:
        digest = hashlib.sha256(data)
        self._client.put_object(
            Bucket=self.bucket,
            Key=self._k(key),
            Body=data,
            ChecksumSHA256=base64.b64encode(digest.digest()).decode("ascii"),
            Metadata={"sha256": digest.hexdigest()},
            ContentType="application/octet-stream",
            **conditions,
        )
        return ObjectInfo(key, len(data), digest.hexdigest())

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        validate_key(key)
        try:
            return self._put(key, bytes(data))
        except self._boto_errors() as exc:
            raise self._fail("put", self.uri_for(key), exc) from exc

    def create_exclusive(self, key: str, data: bytes) -> ObjectInfo:
        """Conditional PUT (``If-None-Match: *``).

        412 PreconditionFailed (present) and 409 ConditionalRequestConflict (a concurrent
        conditional write to the same key is in flight) both mean "someone else is creating it":
        :class:`ObjectExists`. Caveat inherited from S3: if our PUT succeeded but its response was
        lost and botocore retried, the retry sees our own object and we report ObjectExists.
        """
        from botocore.exceptions import ClientError

        validate_key(key)
        uri = self.uri_for(key)
        try:
            return self._put(key, bytes(data), IfNoneMatch="*")
        except ClientError as exc:
            code, status = self._error_code(exc)
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise ObjectExists(f"object already exists: {uri}") from exc
            raise self._fail("conditional put", uri, exc) from exc
        except self._boto_errors() as exc:
            raise self._fail("conditional put", uri, exc) from exc

    # -- reads --------------------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        validate_key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._k(key))
            with contextlib.closing(response["Body"]) as body:
                return bytes(body.read())
        except self._boto_errors() as exc:
            raise self._fail("get", self.uri_for(key), exc) from exc

    def download_file(self, key: str, path: str | os.PathLike[str]) -> ObjectInfo:
        validate_key(key)
        uri = self.uri_for(key)

        def fill(tmp: Path) -> None:
            try:  # ranged GETs in parallel for large objects
                self._client.download_file(self.bucket, self._k(key), str(tmp), Config=self._transfer)
            except self._boto_errors() as exc:
                raise self._fail("download", uri, exc) from exc

        size, digest = _download_to(path, fill, uri)
        return ObjectInfo(key, size, digest)

    def stat(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        validate_key(key)
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._k(key), ChecksumMode="ENABLED")
        except ClientError as exc:
            code, status = self._error_code(exc)
            if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail("head", self.uri_for(key), exc) from exc
        except self._boto_errors() as exc:
            raise self._fail("head", self.uri_for(key), exc) from exc
        return ObjectInfo(key, int(head["ContentLength"]), _sha256_from_head(head))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        norm = _normalize_prefix(prefix)
        if norm:
            s3_prefix = self._k(norm)
        else:
            s3_prefix = f"{self.prefix}/" if self.prefix else ""
        strip = len(self.prefix) + 1 if self.prefix else 0
        out: list[ObjectInfo] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=s3_prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = str(obj["Key"])[strip:]
                    if not _under_prefix(key, norm):
                        continue  # "models/xy" when asked for "models/x"
                    try:
                        validate_key(key)
                    except ValueError:
                        continue  # directory markers ("a/") and keys this API cannot address
                    out.append(ObjectInfo(key, int(obj["Size"]), None))
        except self._boto_errors() as exc:
            raise self._fail("list", f"{self.uri}/{norm}", exc) from exc
        out.sort(key=lambda info: info.key)
        return out

    # -- deletes ------------------------------------------------------------------------------------

    def delete_prefix(self, prefix: str) -> int:
        keys = [info.key for info in self.list(prefix)]
        for batch in _batches(keys, 1000):  # DeleteObjects takes at most 1000 keys
            try:
                response = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._k(k)} for k in batch], "Quiet": True},
                )
            except self._boto_errors() as exc:
                raise self._fail("delete", self.uri_for(batch[0]), exc) from exc
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise StoreError(
                    f"S3 delete under {self.uri}/{prefix} failed for {len(errors)} keys, "
                    f"e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message', '')}".rstrip()
                )
        return len(keys)

    # -- buckets ------------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (tests and dev servers; production buckets pre-exist)."""
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            code, status = self._error_code(exc)
            if not (status == 404 or code in ("404", "NoSuchBucket", "NotFound")):
                raise self._fail("head bucket", f"s3://{self.bucket}", exc) from exc
        except self._boto_errors() as exc:
            raise self._fail("head bucket", f"s3://{self.bucket}", exc) from exc
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region_name and self.region_name != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region_name}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as exc:
            code, _ = self._error_code(exc)
            if code not in ("BucketAlreadyOwnedByYou",):
                raise self._fail("create bucket", f"s3://{self.bucket}", exc) from exc
        except self._boto_errors() as exc:
            raise self._fail("create bucket", f"s3://{self.bucket}", exc) from exc


def _sha256_from_head(head: dict[str, Any]) -> str | None:
    """Our ``sha256`` metadata; else a full-object ChecksumSHA256 (single-part uploads by others)."""
    meta = head.get("Metadata") or {}
    value = meta.get("sha256")
    if isinstance(value, str) and _SHA256_HEX.fullmatch(value):
        return value
    checksum = head.get("ChecksumSHA256")
    if isinstance(checksum, str) and "-" not in checksum and head.get("ChecksumType") != "COMPOSITE":
        try:
            raw = base64.b64decode(checksum, validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(raw) == 32:
            return raw.hex()
    return None


def _batches(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --------------------------------------------------------------------------------------------------
# URIs


def default_store_uri() -> str:
    """``$NEURON_SERVE_STORE`` if set, else ``file://<user cache dir>/neuron-serve/store``."""
    env = os.environ.get("NEURON_SERVE_STORE")
    if env:
        return env
    import platformdirs

    return (Path(platformdirs.user_cache_dir("neuron-serve")) / "store").as_uri()


def _scheme(uri: str) -> str | None:
    head, sep, _ = uri.partition("://")
    return head.lower() if sep else None


def _file_uri_path(uri: str) -> Path:
    """``file:///abs`` or ``file://localhost/abs`` → Path (percent-decoded, like Path.as_uri encodes)."""
    rest = uri[len("file://") :]
    if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]
    if not rest.startswith("/"):
        raise ValueError(f"file URI must be absolute (file:///path), got {uri!r}")
    return Path(unquote(rest))


def _s3_parts(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, path = rest.partition("/")
    if not bucket:
        raise ValueError(f"S3 URI names no bucket: {uri!r}")
    return bucket, path


def open_store(uri: str | os.PathLike[str] | None = None, **options: Any) -> ObjectStore:
    """Open the store rooted at ``uri`` (``None`` → :func:`default_store_uri`).

    ``file:///dir`` or a plain local path → :class:`FileStore`; ``s3://bucket[/prefix]`` →
    :class:`S3Store` (``options`` such as ``endpoint_url`` are passed to it). Any other scheme is a
    ``ValueError`` naming it. Nothing is contacted or created here.
    """
    text = default_store_uri() if uri is None else os.fspath(uri)
    if text == "":
        raise ValueError("empty store URI")
    scheme = _scheme(text)
    if scheme is None:
        return FileStore(text, **options)
    if scheme == "file":
        return FileStore(_file_uri_path(text), **options)
    if scheme == "s3":
        bucket, prefix = _s3_parts(text)
        stripped = prefix.strip("/")
        if stripped:
            try:
                validate_key(stripped)
            except ValueError as exc:
                raise ValueError(f"invalid S3 prefix in {text!r}: {exc}") from None
        return S3Store(bucket, stripped, **options)
    raise ValueError(f"unsupported store URI scheme {scheme!r} in {text!r}: expected file:// or s3://")


def split_uri(uri: str | os.PathLike[str], **options: Any) -> tuple[ObjectStore, str]:
    """Split an *object* URI into (store rooted at the object's directory, object name).

    ``s3://b/p/models/x/k/manifest.json`` → (``S3Store("b", "p/models/x/k")``, ``"manifest.json"``);
    ``file:///d/manifest.json`` or ``/d/manifest.json`` → (``FileStore("/d")``, ``"manifest.json"``).
    A URI ending in ``/`` names a directory, not an object: ``ValueError``.
    """
    text = os.fspath(uri)
    scheme = _scheme(text)
    if scheme not in (None, "file", "s3"):
        raise ValueError(f"unsupported URI scheme {scheme!r} in {text!r}: expected file:// or s3://")
    if text.endswith("/") or text == "":
        raise ValueError(f"URI does not name an object: {text!r}")
    if scheme == "s3":
        bucket, path = _s3_parts(text)
        if not path:
            raise ValueError(f"URI does not name an object: {text!r}")
        parent, _, name = path.rpartition("/")
        validate_key(path)
        return S3Store(bucket, parent, **options), name
    local = _file_uri_path(text) if scheme == "file" else Path(os.path.abspath(Path(text).expanduser()))
    name = local.name
    validate_key(name)
    return FileStore(local.parent, **options), name
