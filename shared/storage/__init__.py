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

Modules: ``base.py`` (``ObjectInfo``, the errors, key validation, hashing, the ``ObjectStore``
ABC), ``file.py`` (``FileStore``), ``s3.py`` (``S3Store``); this one opens a store from a URI
(:func:`open_store`, :func:`split_uri`, :func:`default_store_uri`) and re-exports the rest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from shared.storage.base import (
    MAX_KEY_BYTES,
    TMP_PREFIX,
    ObjectExists,
    ObjectInfo,
    ObjectStore,
    StoreError,
    file_mismatch,
    sha256_file,
    validate_key,
)
from shared.storage.file import FileStore
from shared.storage.s3 import S3Store

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
    "file_mismatch",
    "open_store",
    "sha256_file",
    "split_uri",
    "validate_key",
]


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
