"""The prep pipeline: resolve a checkpoint, convert + TP-shard it tensor by tensor, publish it.

Order of work (DESIGN §4): validate everything that can be validated before writing a byte
(config → family → architecture → target; every tensor present, used and of the right shape, found
from the safetensors headers alone), then stream one canonical tensor at a time through the
family's conversion and the generic sharder into per-rank shard writers, upload the files, and
write the manifest last with a conditional create.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch._dynamo  # see the comment after `log`

from prep_service.api import NAME_PATTERN, PrepareRequest, PrepareResult, PrepCancelled, PrepError, Progress
from prep_service.sources import ResolvedSource, resolve_source
from prep_service.sources.digests import DigestCache, sha256_file
from prep_service.st_io import (
    PlannedTensor,
    SafetensorsFormatError,
    StreamingWriter,
    TensorInfo,
    read_header,
    read_tensor,
)
from shared.families import Family, ParamRule, UnsupportedModel, family_for_config
from shared.families.base import Architecture
from shared.layout import LayoutError, Target, canonical_shape, make_target, shard
from shared.manifest import HF_SIDE_FILES, MANIFEST_NAME, SCHEMA_VERSION, FileEntry, Manifest, shard_path
from shared.quantize import canonical_tensors, target_rules
from shared.storage import ObjectExists, ObjectStore, StoreError, open_store

log = logging.getLogger("neuron_serve.prep")

# Planning (``validate``) runs the families' torch.cat/stack on meta tensors, and those meta kernels
# import torch._dynamo on their first call: 1.1-1.7 s on the bench machine, once per process. It is
# imported with this module instead (the CLI and the prep server import it only to prepare), so
# that start-up cost is not paid inside the first preparation, where it was the largest single item
# of a warm 0.5 GB run (docs/PERFORMANCE.md, "Prep hot spots").

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PIPELINE_VERSION = "prep-2"  # bump when the shard format or pipeline changes what is written


class _Reporter:
    """Throttled progress callback plus cancellation checks."""

    def __init__(self, cb: Callable[[Progress], None] | None, cancel: threading.Event | None):
        self.p = Progress()
        self._cb = cb
        self._cancel = cancel
        self._last = 0.0

    def stage(self, name: str, *, bytes_total: int | None = None, tensors_total: int | None = None) -> None:
        self.check()
        self.p.stage = name
        if bytes_total is not None:
            self.p.bytes_total, self.p.bytes_done = bytes_total, 0
        if tensors_total is not None:
            self.p.tensors_total, self.p.tensors_done = tensors_total, 0
        log.info("stage %s", name)
        self._emit(force=True)

    def advance(self, nbytes: int = 0, tensors: int = 0, force: bool = False) -> None:
        self.p.bytes_done += nbytes
        self.p.tensors_done += tensors
        self._emit(force=force or tensors > 0)  # every tensor/file; hashing chunks are throttled
        self.check()

    def check(self) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise PrepCancelled("preparation cancelled")

    def _emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._cb is not None and (force or now - self._last >= 0.1):
            self._last = now
            self._cb(Progress(**vars(self.p)))


# ---------------------------------------------------------------------------------------------
# Checkpoint reading
# ---------------------------------------------------------------------------------------------


class Checkpoint(Mapping[str, torch.Tensor]):
    """A lazy mapping from HF key to tensor over the checkpoint's weight files.

    ``infos`` (shapes/dtypes) come from the safetensors headers alone; ``__getitem__`` reads one
    tensor. Pickle files (only with allow_pickle) are loaded with ``torch.load(weights_only=True)``.
    """

    def __init__(self, root: Path, allow_pickle: bool, key_prefixes: tuple[str, ...]):
        self.root = root
        st = sorted(root.glob("*.safetensors"))
        pickles = sorted(p for pat in ("*.bin", "*.pt", "*.pth") for p in root.glob(pat))
        self.files: list[Path] = st or pickles
        self._where: dict[str, tuple[Path, TensorInfo | None]] = {}
        self._loaded: dict[str, torch.Tensor] = {}
        if not st and pickles and not allow_pickle:
            raise PrepError(
                f"{pickles[0]}: pickle checkpoints can run arbitrary code when loaded and are refused; "
                "convert the checkpoint to safetensors, or pass --allow-pickle to load it with "
                "torch.load(weights_only=True)"
            )
        if not self.files:
            raise PrepError(f"{root}: no weight files (*.safetensors) in the checkpoint directory")
        for path in self.files:
            if path.suffix == ".safetensors":
                try:
                    entries = [(k, (path, info)) for k, info in read_header(path).items()]
                except SafetensorsFormatError as e:
                    raise PrepError(str(e)) from None
            else:
                try:
                    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # torch raises many types for a bad pickle
                    raise PrepError(f"{path}: not loadable with torch.load(weights_only=True): {e}") from None
                if not isinstance(sd, Mapping):
                    raise PrepError(f"{path}: does not contain a state dict")
                entries = []
                for k, t in sd.items():
                    self._loaded[k] = t
                    entries.append((k, (path, None)))
            for key, loc in entries:
                key = _strip(key, key_prefixes)
                if key in self._where:
                    raise PrepError(
                        f"tensor {key!r} appears in both {self._where[key][0].name} and {loc[0].name}"
                    )
                self._where[key] = loc

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        _, info = self._where[key]
        if info is None:
            t = self._loaded[key]
            return t.dtype, tuple(t.shape)
        return info.dtype, info.shape

    def nbytes(self, key: str) -> int:
        dtype, shape = self.info(key)
        return dtype.itemsize * int(torch.Size(shape).numel())

    def file_of(self, key: str) -> Path:
        return self._where[key][0]

    def __getitem__(self, key: str) -> torch.Tensor:
        path, info = self._where[key]
        if info is None:
            return self._loaded[key]
        try:
            return read_tensor(path, info)
        except SafetensorsFormatError as e:
            raise PrepError(str(e)) from None

    def __contains__(self, key: object) -> bool:
        return key in self._where  # Mapping's default would read the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class _SingleThreadedTorch:
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


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p) :]
    return key


class _MetaView(Mapping[str, torch.Tensor]):
    """Meta tensors with the checkpoint's shapes: runs conversion + sharding without data."""

    def __init__(self, ckpt: Checkpoint):
        self._c = ckpt

    def __getitem__(self, key: str) -> torch.Tensor:
        dtype, shape = self._c.info(key)
        return torch.empty(shape, dtype=dtype, device="meta")

    def __iter__(self) -> Iterator[str]:
        return iter(self._c)

    def __len__(self) -> int:
        return len(self._c)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def _converted(
    rule: ParamRule, tensors: Mapping[str, torch.Tensor], target: Target
) -> Iterator[tuple[str, torch.Tensor]]:
    """The canonical tensor(s) of one rule in the target dtype: the tensor itself, or for a quantized
    weight its int8 values and its ``_scale`` (``shared.quantize.canonical_tensors``, which the exec
    side's in-process conversion uses too)."""
    yield from canonical_tensors(rule.name, _cast(rule.build(tensors), DTYPES[target.dtype]), target)


def validate(
    ckpt: Checkpoint, family: Family, arch: Architecture, rules: list[ParamRule], target: Target
) -> list[list[PlannedTensor]]:
    """Every tensor present, used and well-shaped — from the headers alone. Returns per-rank plans."""
    used: set[str] = set()
    for rule in rules:
        for src in rule.sources:
            if src not in ckpt:
                names = ", ".join(p.name for p in ckpt.files)
                raise PrepError(
                    f"tensor {src!r} (needed for {rule.name}) is missing from the checkpoint ({names})"
                )
            used.add(src)
    ignore = [re.compile(p) for p in family.ignore_key_patterns]
    for key in ckpt:
        if key not in used and not any(p.fullmatch(key) for p in ignore):
            raise PrepError(
                f"unexpected tensor {key!r} in {ckpt.file_of(key).name}: not used by the {family.name} "
                "converter (does config.json describe these weights?)"
            )
    meta = _MetaView(ckpt)
    plans: list[list[PlannedTensor]] = [
        [PlannedTensor("rank", torch.int32, (1,))] for _ in range(target.tp_degree)
    ]
    for rule in rules:
        srcs = ", ".join(f"{s} {list(ckpt.info(s)[1])}" for s in rule.sources)
        try:
            t = rule.build(meta)
        except RuntimeError as e:
            raise PrepError(f"{rule.name}: source tensors have incompatible shapes ({srcs}): {e}") from None
        want = canonical_shape(rule.name, arch)
        if want is not None and tuple(t.shape) != want:
            raise PrepError(
                f"{rule.name}: expected shape {list(want)} from config.json, got {list(t.shape)} from {srcs}"
            )
        for name, c in _converted(rule, meta, target):
            for r, part in enumerate(shard(name, c, arch, target)):
                plans[r].append(PlannedTensor(name, part.dtype, tuple(part.shape)))
    return plans


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


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


def _load_config(root: Path) -> dict:
    cfg_path = root / "config.json"
    if not cfg_path.exists():
        what = "is empty" if root.is_dir() and not any(root.iterdir()) else "has no config.json"
        raise PrepError(f"{root}: {what}; expected a Hugging Face checkpoint directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrepError(f"{cfg_path}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise PrepError(f"{cfg_path}: not a JSON object")
    return cfg


STAGING_PREFIX = ".tmp-staging-"
STALE_STAGING_S = 24 * 3600


def _sweep_stale_staging(root: Path) -> None:
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


def prepare(
    req: PrepareRequest,
    *,
    progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
) -> PrepareResult:
    """Prepare ``req.source`` into the store; idempotent by artifact key. See the module docstring."""
    rep = _Reporter(progress, cancel)
    try:
        store = open_store(req.output)
    except ValueError as e:
        raise PrepError(f"output {req.output!r}: {e}") from None
    rep.stage("resolving")
    with tempfile.TemporaryDirectory(prefix="neuron-serve-prep-") as work:
        src = resolve_source(req.source, revision=req.revision, workdir=Path(work), on_stage=rep.stage)
        try:
            return _prepare(req, src, store, Path(work), rep)
        except StoreError as e:
            raise PrepError(f"store {store.uri}: {e}") from None
        finally:
            src.close()


def _prepare(
    req: PrepareRequest, src: ResolvedSource, store: ObjectStore, work: Path, rep: _Reporter
) -> PrepareResult:
    cfg = _load_config(src.root)
    try:
        family = family_for_config(cfg)
        arch = family.arch_from_hf(cfg)
        target = make_target(
            arch, req.tp_degree, req.dtype, req.gqa_strategy, req.quantize, req.quantize_lm_head
        )
    except (UnsupportedModel, LayoutError) as e:
        raise PrepError(f"{src.root / 'config.json'}: {e}") from None

    ckpt = Checkpoint(src.root, req.allow_pickle, family.key_prefixes)
    side_files = [src.root / n for n in HF_SIDE_FILES if (src.root / n).is_file()]
    hashed = src.hashed_files or [*ckpt.files, *side_files]
    name = req.name or src.name
    if not NAME_PATTERN.match(name):
        raise PrepError(f"model name {name!r} must match {NAME_PATTERN.pattern}")

    rules = target_rules(family.rules(arch), arch, target)

    # Source digests: the ones already known (fetched with a download, or remembered for an
    # unchanged local file) are not computed again; the rest are hashed on a helper thread while
    # the pipeline goes on (hashlib releases the GIL): planning, and — when the artifact key
    # needs them — a speculative conversion into staging that is dropped if the finished digests
    # name an artifact that already exists.
    cache = DigestCache.default()
    known = {p: src.digests.get(p) or cache.lookup(p) for p in hashed}
    todo = [p for p in hashed if known[p] is None]
    stop_hashing = threading.Event()

    def hash_missing() -> dict[Path, str]:
        def on_bytes(_: int) -> None:
            if stop_hashing.is_set():
                raise PrepCancelled("hashing stopped")

        return {p: cache.sha256(p, on_bytes) for p in todo}

    job = _Job(req, src, store, work, rep, ckpt, family, arch, rules, target, side_files)
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="prep") as pool:
        planned = pool.submit(validate, ckpt, family, arch, rules, target)
        hashing = pool.submit(hash_missing)
        try:
            rep.stage("hashing", bytes_total=sum(p.stat().st_size for p in todo))
            ident = _Identity(job, name, hashed, known)
            if ident.key is not None and (reused := ident.existing()) is not None:
                rep.stage("done")
                return reused
            return _convert_and_publish(job, ident, _wait(planned, rep), hashing)
        finally:
            stop_hashing.set()


@dataclass(frozen=True)
class _Job:
    """One preparation's inputs, resolved and validated."""

    req: PrepareRequest
    src: ResolvedSource
    store: ObjectStore
    work: Path
    rep: _Reporter
    ckpt: Checkpoint
    family: Family
    arch: Architecture
    rules: list[ParamRule]
    target: Target
    side_files: list[Path]


def _wait(fut: concurrent.futures.Future, rep: _Reporter) -> Any:
    """``fut.result()``, still answering cancellation while it waits."""
    while True:
        try:
            return fut.result(timeout=0.1)
        except concurrent.futures.TimeoutError:
            rep.check()


class _Identity:
    """What names the artifact: the source files' digests, the artifact key and where it lives.

    The key is known up front when the source has a stable identity (hub: repo@commit) or every
    digest is already known; otherwise it is set by :meth:`add` once the digests are in.
    """

    def __init__(self, job: _Job, name: str, hashed: list[Path], known: dict[Path, str | None]):
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


def _convert_and_publish(
    job: _Job, ident: _Identity, plans: list[list[PlannedTensor]], hashing: concurrent.futures.Future
) -> PrepareResult:
    """Stream every tensor through conversion and sharding into staged shard files, then publish
    them and write the manifest last."""
    req, src, store, rep = job.req, job.src, job.store, job.rep
    ckpt, arch, rules, target = job.ckpt, job.arch, job.rules, job.target
    # Staged next to the store when it is local (publishing is then a rename), else in ``work``.
    staging_root = store.staging_root()
    if staging_root is not None:
        _sweep_stale_staging(staging_root)
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
            w.write("rank", torch.tensor([r], dtype=torch.int32))
        with _SingleThreadedTorch():
            for rule in rules:
                for tname, t in _converted(rule, ckpt, target):
                    for r, part in enumerate(shard(tname, t, arch, target)):
                        writers[r].write(tname, part)
                    del t, part
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
            ident.add(_wait(hashing, rep))
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
    reused: PrepareResult, writers: list[StreamingWriter], staging: Path, rep: _Reporter
) -> PrepareResult:
    """End a speculative conversion whose artifact turned out to exist: nothing was published."""
    for w in writers:
        w.abort()
    shutil.rmtree(staging, ignore_errors=True)
    rep.stage("done")
    return reused
