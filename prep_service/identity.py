"""What names an artifact: the source files' digests, the artifact key, and reuse of a finished one.

``artifact_key = sha256(source identity, family + converter version, PIPELINE_VERSION, manifest
schema, target)[:32]`` (DESIGN §4). The source identity is ``repo@commit`` for hub sources and the
source files' sha256 otherwise, so the same weights reached by another path reuse the same artifact.

Digests already known (fetched with a download, or remembered for an unchanged local file by
``prep_service.sources.digests``) are not computed again; :class:`SourceDigests` hashes the rest on
a helper thread while the pipeline plans and — when the key needs them — converts speculatively.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

from prep_service.api import PrepareResult, PrepCancelled
from prep_service.job import Job
from prep_service.sources import ResolvedSource
from prep_service.sources.digests import DigestCache
from shared.families import Family
from shared.layout import Target
from shared.manifest import MANIFEST_NAME, SCHEMA_VERSION

log = logging.getLogger("neuron_serve.prep")

PIPELINE_VERSION = "prep-2"  # bump when the shard format or pipeline changes what is written


def artifact_key(identity: object, family: Family, target: Target) -> str:
    blob = json.dumps(
        {
            "source": identity,
            "family": family.name,
            "converter": family.converter_version,
            "pipeline": PIPELINE_VERSION,
            "schema": SCHEMA_VERSION,
            "target": target.to_dict(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class SourceDigests:
    """The sha256 of the files that identify a source: the known ones at once, the rest computed by
    :meth:`compute_missing` (meant for a helper thread; :meth:`stop` makes it give up)."""

    def __init__(self, src: ResolvedSource, hashed: list[Path]) -> None:
        self._cache = DigestCache.default()
        self.known: dict[Path, str | None] = {p: src.digests.get(p) or self._cache.lookup(p) for p in hashed}
        self.missing = [p for p in hashed if self.known[p] is None]
        self._stop = threading.Event()

    @property
    def missing_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.missing)

    def compute_missing(self) -> dict[Path, str]:
        def on_bytes(_: int) -> None:
            if self._stop.is_set():
                raise PrepCancelled("hashing stopped")

        return {p: self._cache.sha256(p, on_bytes) for p in self.missing}

    def stop(self) -> None:
        self._stop.set()


class Identity:
    """The artifact's name, key and place in the store.

    The key is known up front when the source has a stable identity (hub: repo@commit) or every
    digest is already known; otherwise it is set by :meth:`add` once the digests are in.
    """

    def __init__(self, job: Job, name: str, hashed: list[Path], known: dict[Path, str | None]):
        self._job = job
        self.name = name
        self._hashed = hashed
        self.digests = dict(known)
        self.key: str | None = None
        if job.src.identity is not None or self.complete:
            self._set_key()

    @property
    def complete(self) -> bool:
        return all(d is not None for d in self.digests.values())

    def add(self, digests: dict[Path, str]) -> None:
        self.digests.update(digests)
        if self.key is None:
            self._set_key()

    def source_files(self) -> list[dict]:
        return [
            {
                "path": p.name if self._job.src.kind == "gguf" else str(p.relative_to(self._job.src.root)),
                "size": p.stat().st_size,
                "sha256": self.digests[p],
            }
            for p in self._hashed
        ]

    def _set_key(self) -> None:
        identity = self._job.src.identity or [(f["path"], f["sha256"]) for f in self.source_files()]
        self.key = artifact_key(identity, self._job.family, self._job.target)

    @property
    def prefix(self) -> str:
        return f"models/{self.name}/{self.key}"

    @property
    def manifest_key(self) -> str:
        return f"{self.prefix}/{MANIFEST_NAME}"

    def existing(self) -> PrepareResult | None:
        """The finished artifact of this key, unless ``force`` asks to prepare it again."""
        assert self.key is not None
        store = self._job.store
        if self._job.req.force or not store.exists(self.manifest_key):
            return None
        uri = store.uri_for(self.manifest_key)
        log.info("artifact %s exists; reusing", uri)
        return PrepareResult(uri, self.key, True, json.loads(store.get_bytes(self.manifest_key)))
