"""One preparation's resolved inputs (:class:`Job`) and its progress/cancellation (:class:`Reporter`),
shared by the pipeline's steps (``checkpoint``, ``identity``, ``publish``, ``convert``)."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prep_service.api import PrepareRequest, PrepCancelled, Progress

if TYPE_CHECKING:
    from prep_service.checkpoint import Checkpoint
    from prep_service.sources import ResolvedSource
    from shared.families import Family, ParamRule
    from shared.families.base import Architecture
    from shared.layout import Target
    from shared.storage import ObjectStore

log = logging.getLogger("neuron_serve.prep")


class Reporter:
    """Throttled progress callback plus cancellation checks."""

    def __init__(self, cb: Callable[[Progress], None] | None, cancel: threading.Event | None):
        self.progress = Progress()
        self._on_progress = cb
        self._cancel = cancel
        self._last = 0.0

    def stage(self, name: str, *, bytes_total: int | None = None, tensors_total: int | None = None) -> None:
        self.check()
        self.progress.stage = name
        if bytes_total is not None:
            self.progress.bytes_total, self.progress.bytes_done = bytes_total, 0
        if tensors_total is not None:
            self.progress.tensors_total, self.progress.tensors_done = tensors_total, 0
        log.info("stage %s", name)
        self._emit(force=True)

    def advance(self, nbytes: int = 0, tensors: int = 0, force: bool = False) -> None:
        self.progress.bytes_done += nbytes
        self.progress.tensors_done += tensors
        self._emit(force=force or tensors > 0)  # every tensor/file; hashing chunks are throttled
        self.check()

    def check(self) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise PrepCancelled("preparation cancelled")

    def _emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._on_progress is not None and (force or now - self._last >= 0.1):
            self._last = now
            self._on_progress(Progress(**vars(self.progress)))


def wait(fut: concurrent.futures.Future, rep: Reporter) -> Any:
    """``fut.result()``, still answering cancellation while it waits."""
    while True:
        try:
            return fut.result(timeout=0.1)
        except concurrent.futures.TimeoutError:
            rep.check()


@dataclass(frozen=True)
class Job:
    """One preparation's inputs, resolved and validated."""

    req: PrepareRequest
    src: ResolvedSource
    store: ObjectStore
    work: Path
    rep: Reporter
    ckpt: Checkpoint
    family: Family
    arch: Architecture
    rules: list[ParamRule]
    target: Target
    side_files: list[Path]
