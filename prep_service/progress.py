"""Progress of a preparation on a terminal or in a log: :class:`ProgressPrinter` (``neuron-serve
prepare`` and the ``demo`` command use it)."""

from __future__ import annotations

import threading
import time
from typing import TextIO

from prep_service.api import Progress


class ProgressPrinter:
    """Prints a preparation's progress to ``stream``: a tqdm bar on a terminal, else one line per
    stage change (``prepare: converting 1.2 GiB/2.9 GiB tensors 40/98``).

    Pass it as ``prepare(..., progress=printer)`` — it is a ``Callable[[Progress], None]``, safe to
    call from the pipeline's thread — and call :meth:`close` when the preparation ends.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._stage: str | None = None
        self._last_refresh = 0.0
        self._bar = None
        if stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=None, unit="B", unit_scale=True, unit_divisor=1024, file=stream, dynamic_ncols=True
            )

    def __call__(self, p: Progress) -> None:
        with self._lock:
            stage_changed = p.stage != self._stage
            self._stage = p.stage
            if self._bar is None:
                if stage_changed:
                    self._line(p)
                return
            now = time.monotonic()
            if not stage_changed and now - self._last_refresh < 0.1:
                return
            self._last_refresh = now
            bar = self._bar
            if stage_changed:
                bar.set_description_str(p.stage, refresh=False)
            bar.total = p.bytes_total or None
            bar.n = p.bytes_done
            if p.tensors_total:
                bar.set_postfix_str(f"tensors {p.tensors_done}/{p.tensors_total}", refresh=False)
            bar.refresh()

    def _line(self, p: Progress) -> None:
        parts = [f"prepare: {p.stage}"]
        if p.bytes_total:
            parts.append(f"{human_bytes(p.bytes_done)}/{human_bytes(p.bytes_total)}")
        if p.tensors_total:
            parts.append(f"tensors {p.tensors_done}/{p.tensors_total}")
        print(" ".join(parts), file=self._stream, flush=True)

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None


def human_bytes(n: int) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
