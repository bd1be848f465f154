"""The prep pipeline: resolve a checkpoint, convert + TP-shard it tensor by tensor, publish it.

Order of work (DESIGN §4): validate everything that can be validated before writing a byte
(config → family → architecture → target; every tensor present, used and of the right shape, found
from the safetensors headers alone), then stream one canonical tensor at a time through the
family's conversion and the generic sharder into per-rank shard writers, upload the files, and
write the manifest last with a conditional create.

This module is the orchestration; the steps live beside it:

    checkpoint.py   config.json, the lazy checkpoint mapping, header-only validation and planning
    identity.py     source digests, the artifact key, reuse of a finished artifact
    publish.py      staging, the shard writers, upload, the manifest written last, cleanup
    job.py          one preparation's inputs and its progress/cancellation reporter
"""

from __future__ import annotations

import concurrent.futures
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from prep_service.api import NAME_PATTERN, PrepareRequest, PrepareResult, PrepError, Progress
from prep_service.checkpoint import Checkpoint, load_config, validate
from prep_service.identity import PIPELINE_VERSION, Identity, SourceDigests
from prep_service.job import Job, Reporter, wait
from prep_service.publish import convert_and_publish
from prep_service.sources import ResolvedSource, resolve_source
from shared.families import UnsupportedModel, family_for_config
from shared.layout import LayoutError, make_target
from shared.manifest import HF_SIDE_FILES
from shared.quantize import target_rules
from shared.storage import ObjectStore, StoreError, open_store

__all__ = ["PIPELINE_VERSION", "prepare"]


def prepare(
    req: PrepareRequest,
    *,
    progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
) -> PrepareResult:
    """Prepare ``req.source`` into the store; idempotent by artifact key. See the module docstring."""
    rep = Reporter(progress, cancel)
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
    req: PrepareRequest, src: ResolvedSource, store: ObjectStore, work: Path, rep: Reporter
) -> PrepareResult:
    cfg = load_config(src.root)
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

    # The digests not yet known are hashed on a helper thread while the pipeline goes on (hashlib
    # releases the GIL): planning, and — when the artifact key needs them — a speculative
    # conversion into staging that is dropped if the finished digests name an artifact that
    # already exists.
    digests = SourceDigests(src, hashed)
    job = Job(req, src, store, work, rep, ckpt, family, arch, rules, target, side_files)
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="prep") as pool:
        planned = pool.submit(validate, ckpt, family, arch, rules, target)
        hashing = pool.submit(digests.compute_missing)
        try:
            rep.stage("hashing", bytes_total=digests.missing_bytes)
            ident = Identity(job, name, hashed, digests.known)
            if ident.key is not None and (reused := ident.existing()) is not None:
                rep.stage("done")
                return reused
            return convert_and_publish(job, ident, wait(planned, rep), hashing)
        finally:
            digests.stop()
