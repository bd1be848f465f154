"""Publishing a preparation: shard files staged and written tensor by tensor, uploaded, the
manifest written last with a conditional create, and everything cleaned up on failure.

Staging is next to a local store (publishing is then a rename) or in the job's work directory.
A failure or cancellation after the upload began deletes the partial prefix; a process killed
mid-way leaves files but no manifest, and a prefix without a manifest is not a model.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import shutil
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from prep_service.api import PrepareResult
from prep_service.identity import PIPELINE_VERSION, Identity
from prep_service.job import Job, Reporter, wait
from prep_service.st_io import PlannedTensor, StreamingWriter
from shared.conversion import RANK_KEY, convert_rule, rank_tensor
from shared.manifest import FileEntry, Manifest, shard_path
from shared.storage import ObjectExists, ObjectStore, StoreError, sha256_file

log = logging.getLogger("neuron_serve.prep")


STAGING_PREFIX = ".tmp-staging-"
STALE_STAGING_S = 24 * 3600


def sweep_stale_staging(root: Path) -> None:
    """Remove staging directories that a killed preparation left in a local store over a day ago
    (invisible to readers — ``.tmp-`` names are never keys — but they hold disk space)."""
    now = time.time()
    for d in root.glob(STAGING_PREFIX + "*"):
        try:
            if now - d.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(d, ignore_errors=True)
                log.info("removed stale staging directory %s", d)
        except OSError:
            continue


def _already_uploaded(store: ObjectStore, key: str, entry: FileEntry) -> bool:
    """A file an interrupted earlier run already published (the artifact key fixes the content,
    so the same key with the same size and sha256 is the same file)."""
    try:
        info = store.stat(key)
    except StoreError:
        return False
    if info is None or info.size != entry.size:
        return False
    if info.sha256 is None:
        local = store.local_path(key)
        return local is not None and sha256_file(local) == entry.sha256
    return info.sha256 == entry.sha256


class SingleThreadedTorch:
    """Run conversion's torch ops with one intra-op thread, restoring the setting afterwards.

    Those ops are memory-bound copies (cat, cast, slices) while the shard writers' sha256 threads
    keep the other core(s) busy; with the default pool every op is an OpenMP region that waits for
    a descheduled thread: a 0.8 GB ``torch.cat`` took 0.8 s at 2 threads and 0.2 s at 1 on the
    2-core bench machine (docs/PERFORMANCE.md, "Prep hot spots"). The thread count is per process,
    so concurrent preparations (the prep server) share one count: the first sets it, the last
    restores it.
    """

    _lock = threading.Lock()
    _active = 0
    _saved = 0

    def __enter__(self) -> None:
        cls = type(self)
        with cls._lock:
            if cls._active == 0:
                cls._saved = torch.get_num_threads()
                torch.set_num_threads(1)
            cls._active += 1

    def __exit__(self, *exc: object) -> None:
        cls = type(self)
        with cls._lock:
            cls._active -= 1
            if cls._active == 0:
                torch.set_num_threads(cls._saved)


def convert_and_publish(
    job: Job, ident: Identity, plans: list[list[PlannedTensor]], hashing: concurrent.futures.Future
) -> PrepareResult:
    """Stream every tensor through conversion and sharding into staged shard files, then publish
    them and write the manifest last."""
    req, src, store, rep = job.req, job.src, job.store, job.rep
    ckpt, arch, rules, target = job.ckpt, job.arch, job.rules, job.target
    # Staged next to the store when it is local (publishing is then a rename), else in ``work``.
    staging_root = store.staging_root()
    if staging_root is not None:
        sweep_stale_staging(staging_root)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=staging_root or job.work))
    (staging / "shards").mkdir(parents=True)
    tp = target.tp_degree
    # The artifact key is not in the shard header: it may not be known yet (see _prepare); the
    # manifest binds the shards to the artifact by their sha256.
    writers = [
        StreamingWriter(
            staging / shard_path(r, tp),
            plans[r],
            metadata={"format": "pt", "rank": str(r), "tp_degree": str(tp)},
        )
        for r in range(tp)
    ]
    uploaded = False

    def reuse_if_finished() -> PrepareResult | None:
        """Once the digests are in, the key is known: an existing artifact ends the speculation."""
        if ident.key is None and hashing.done():
            ident.add(hashing.result())
            return ident.existing()
        return None

    try:
        rep.stage(
            "converting",
            bytes_total=sum(ckpt.nbytes(s) for r in rules for s in r.sources),
            tensors_total=len(rules),
        )
        for r, w in enumerate(writers):
            w.write(RANK_KEY, rank_tensor(r))
        with SingleThreadedTorch():
            for rule in rules:
                for tname, parts in convert_rule(rule, ckpt, arch, target):
                    for r, part in enumerate(parts):
                        writers[r].write(tname, part)
                    del parts, part
                rep.advance(sum(ckpt.nbytes(s) for s in rule.sources), tensors=1)
                if (reused := reuse_if_finished()) is not None:
                    return _dropped(reused, writers, staging, rep)
        files: list[FileEntry] = []
        for r, w in enumerate(writers):
            files.append(FileEntry(shard_path(r, tp), w.size, w.close()))
        for p in job.side_files:
            shutil.copyfile(p, staging / p.name)
            files.append(FileEntry(p.name, (staging / p.name).stat().st_size, sha256_file(staging / p.name)))

        if not ident.complete:
            ident.add(wait(hashing, rep))
            if (reused := ident.existing()) is not None:
                return _dropped(reused, writers, staging, rep)
        assert ident.key is not None
        prefix, manifest_key = ident.prefix, ident.manifest_key
        rep.stage("uploading", bytes_total=sum(f.size for f in files))
        uploaded = True
        for f in files:
            obj = f"{prefix}/{f.path}"
            if _already_uploaded(store, obj, f):
                log.info("%s is already in the store (same size and sha256): not uploaded again", obj)
            else:
                store.adopt_file(obj, staging / f.path, sha256=f.sha256)
            rep.advance(f.size, force=True)

        manifest = Manifest(
            name=ident.name,
            artifact_key=ident.key,
            source={
                "uri": src.uri,
                "kind": src.kind,
                "revision": src.revision,
                "files": ident.source_files(),
            },
            family=job.family.name,
            architecture=arch,
            target=target,
            converter_version=f"{job.family.converter_version}+{PIPELINE_VERSION}",
            files=tuple(files),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        rep.check()
        try:
            store.create_exclusive(manifest_key, manifest.to_json())
            reused = False
        except ObjectExists:  # a concurrent identical preparation (or --force over an existing one) won
            if not req.force:
                reused = True
            else:
                store.put_bytes(manifest_key, manifest.to_json())
                reused = False
        rep.stage("done")
        shutil.rmtree(staging, ignore_errors=True)
        return PrepareResult(store.uri_for(manifest_key), ident.key, reused, json.loads(manifest.to_json()))
    except BaseException:
        for w in writers:
            w.abort()
        shutil.rmtree(staging, ignore_errors=True)
        if uploaded and not store.exists(ident.manifest_key):
            try:
                store.delete_prefix(ident.prefix + "/")
            except StoreError:
                log.warning("could not clean up %s after a failed preparation", ident.prefix, exc_info=True)
        raise


def _dropped(
    reused: PrepareResult, writers: list[StreamingWriter], staging: Path, rep: Reporter
) -> PrepareResult:
    """End a speculative conversion whose artifact turned out to exist: nothing was published."""
    for w in writers:
        w.abort()
    shutil.rmtree(staging, ignore_errors=True)
    rep.stage("done")
    return reused
