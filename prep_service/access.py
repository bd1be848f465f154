"""What remote callers of the prep server may read and write: :class:`AccessPolicy`.

A request's ``output`` must lie under one of the allowed store URIs and a local source under one of
the allowed directories. URIs are compared in a normal form (:func:`normalize_store_uri`) so that
``..`` segments, percent-encoding or a sibling with a common prefix (``/srv/storeX``) cannot get
around the check.
"""

from __future__ import annotations

import dataclasses
import os
from urllib.parse import unquote

from prep_service.api import PrepareRequest, PrepError


def normalize_store_uri(uri: str) -> str:
    """A comparable form of a store URI; raises PrepError for one with '.' or '..' segments."""
    if uri.startswith("s3://"):
        parts = uri[len("s3://") :].rstrip("/").split("/")
        if any(p in (".", "..") for p in parts) or not parts[0]:
            raise PrepError(f"invalid S3 URI {uri!r} ('.'/'..' segments are not allowed)")
        return "s3://" + "/".join(p for p in parts if p)
    if "://" in uri and not uri.startswith("file://"):
        raise PrepError(f"unsupported store URI scheme in {uri!r}")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return "file://" + os.path.normpath(os.path.abspath(unquote(path)))


def _within(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


@dataclasses.dataclass(frozen=True)
class AccessPolicy:
    """What remote callers may read and write on this server's behalf.

    ``outputs``: store URI prefixes a request may publish to (default: the server's store).
    ``source_roots``: local directories a request's local/file:// source must lie under; ``None``
    allows any local path (development only — set ``--source-root`` in production).
    """

    outputs: tuple[str, ...]
    source_roots: tuple[str, ...] | None = None

    def check_compile(self, output: str | None, manifest_uri: str) -> None:
        """A compile publishes to ``output``, or beside the manifest when there is none: either must
        lie in a store this server may write to (PermissionError -> PERMISSION_DENIED)."""
        target = output or manifest_uri
        if not target.startswith(("s3://", "file://", "/")):
            raise PrepError(f"manifest_uri: expected a file:// or s3:// URI, got {manifest_uri!r}")
        if not any(_within(normalize_store_uri(target), normalize_store_uri(a)) for a in self.outputs):
            what = "output" if output else "manifest_uri (graph sets are published to its store)"
            raise PermissionError(f"{what} {target!r} is outside the stores this server may write to")

    def check(self, req: PrepareRequest) -> None:
        """Raises PermissionError (-> PERMISSION_DENIED) or PrepError (-> INVALID_ARGUMENT)."""
        out = normalize_store_uri(req.output) if req.output else None
        if out is not None and not any(_within(out, normalize_store_uri(a)) for a in self.outputs):
            raise PermissionError(f"output {req.output!r} is outside the stores this server may write to")
        src = req.source
        if src.startswith("s3://"):
            normalize_store_uri(src)
            return
        looks_local = src.startswith(("file://", "/", ".", "~")) or (os.sep in src and os.path.exists(src))
        if looks_local and self.source_roots is not None:
            path = os.path.realpath(
                os.path.expanduser(src[len("file://") :] if src.startswith("file://") else src)
            )
            if not any(_within("file://" + path, "file://" + os.path.realpath(r)) for r in self.source_roots):
                raise PermissionError(f"source {src!r} is outside the directories this server may read")
