"""``file://`` stores: objects are files under a root directory."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat as stat_mod
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from shared.storage.base import (
    COPY_CHUNK,
    TMP_PREFIX,
    ObjectExists,
    ObjectInfo,
    ObjectStore,
    StoreError,
    check_sha256,
    copy_hashing,
    download_to,
    fsync_dir,
    normalize_prefix,
    not_found,
    temp_sibling,
    unlink_quietly,
    validate_key,
)


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
        tmp = temp_sibling(final)
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
            unlink_quietly(tmp)  # gone already after os.replace; the spare link after os.link
        fsync_dir(final.parent)

    def put_file(self, key: str, path: str | os.PathLike[str], *, sha256: str | None = None) -> ObjectInfo:
        validate_key(key)
        check_sha256(sha256)
        result: dict[str, Any] = {}
        with open(path, "rb") as src:  # a missing source raises FileNotFoundError naming *it*

            def write(dst: BinaryIO) -> None:
                if sha256 is None:
                    result["size"], result["sha256"] = copy_hashing(src, dst)
                else:
                    while chunk := src.read(COPY_CHUNK):
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
        fsync_dir(final.parent)
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
            raise not_found(self.uri_for(key)) from None
        except OSError as exc:
            raise StoreError(f"reading {self.uri_for(key)} failed: {exc}") from exc

    def download_file(self, key: str, path: str | os.PathLike[str]) -> ObjectInfo:
        src_path = self._path(key)
        uri = self.uri_for(key)
        try:
            src = open(src_path, "rb")  # noqa: SIM115 - closed below; open first so absence is cheap
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise not_found(uri) from None
        except OSError as exc:
            raise StoreError(f"reading {uri} failed: {exc}") from exc
        with src:

            def fill(tmp: Path) -> None:
                with open(tmp, "xb") as dst:
                    copy_hashing(src, dst)
                    dst.flush()
                    os.fsync(dst.fileno())

            size, digest = download_to(path, fill, uri)
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
        norm = normalize_prefix(prefix)
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
        norm = normalize_prefix(prefix)
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
