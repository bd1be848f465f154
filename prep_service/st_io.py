"""Streaming safetensors I/O with bounded memory.

``safetensors.safe_open`` memory-maps the whole file: reading every tensor of a 1.5 GB file makes
1.5 GB of pages resident in this process. Preparation must keep its RSS near one tensor, so the
reader here reads each tensor's bytes with plain ``readinto`` into a fresh buffer, and the writer
writes a precomputed header followed by the tensors in order, hashing as it goes.
The file format is the documented safetensors one: u64-LE header length, JSON header, data.

The writer starts the kernel's writeback of each written range as it goes (``sync_file_range``
on Linux), so the disk works while the next tensors are converted and the final ``fsync`` only
waits for the tail instead of the whole file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import queue
import struct
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
WRITEBACK_CHUNK = 32 * 1024 * 1024  # start writeback of every this many bytes written
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: initiate writeback of dirty pages, do not wait


def _load_sync_file_range() -> Callable[..., int] | None:
    """libc's ``sync_file_range`` (Linux only; the os module does not expose it), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` of ``fd`` to disk now, without
    waiting. Purely a performance hint: durability still comes from the ``fsync`` at the end (this
    call is a no-op where unavailable, and its errors are ignored: fsync reports real I/O errors)."""
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


class SafetensorsFormatError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header; errors name the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsFormatError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsFormatError(f"{path}: invalid safetensors header length {n}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsFormatError(f"{path}: header is not valid JSON ({e})") from None
    out: dict[str, TensorInfo] = {}
    base = 8 + n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[meta["dtype"]]
            start, end = (int(x) for x in meta["data_offsets"])
            shape = tuple(int(s) for s in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has an invalid header entry") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * dtype.itemsize or base + end > size or start < 0:
            raise SafetensorsFormatError(
                f"{path}: tensor {name!r} data offsets {start}..{end} do not match its shape/dtype "
                f"or the file size (truncated file?)"
            )
        out[name] = TensorInfo(name, dtype, shape, base + start, base + end)
    return out


def read_tensor(path: Path, info: TensorInfo) -> torch.Tensor:
    """Read one tensor into its own memory (no mmap)."""
    buf = bytearray(info.nbytes)
    with open(path, "rb", buffering=0) as f:
        f.seek(info.start)
        view = memoryview(buf)
        got = 0
        while got < info.nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise SafetensorsFormatError(f"{path}: unexpected end of file reading {info.name!r}")
            got += n
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


class _Worker:
    """Applies ``fn`` to buffers, in order, on a helper thread (file writes and hashlib release the
    GIL), so writing and hashing one tensor overlap reading and converting the next. At most one
    pending buffer: memory stays bounded. An exception in ``fn`` stops the work and is raised to the
    caller by the next ``put`` or by ``finish``."""

    def __init__(self, fn: Callable[[memoryview], object], name: str) -> None:
        self._fn = fn
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None and not self._stopped:  # after either: drain, so put never blocks
                try:
                    self._fn(item[1])
                except BaseException as e:  # handed to the caller by put() or finish()
                    self._error = e

    def put(self, keepalive: object, data: memoryview) -> None:
        """Queue ``data``; ``keepalive`` is the tensor whose memory it views."""
        if self._error is not None:
            raise self._error
        self._queue.put((keepalive, data))

    def finish(self) -> None:
        """Wait until everything queued is done; raise the first error."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Skip what is still queued and wait for the buffer in progress (a write must not outlive
        the file descriptor it writes to)."""
        self._stopped = True
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class StreamingWriter:
    """Writes a safetensors file whose tensors (names, shapes, dtypes, order) are known up front.

    The header is written first; tensors must then be written in the planned order. Each tensor's
    own memory (no copy into a write buffer) goes to two helper threads: one writes it to the file
    (unbuffered) and starts the kernel's writeback every ``WRITEBACK_CHUNK`` bytes, one feeds the
    file's sha256. ``close`` checks every planned tensor was written, waits for both, and fsyncs
    the file once.
    """

    def __init__(self, path: Path, plan: Iterable[PlannedTensor], metadata: dict[str, str] | None = None):
        self.path = path
        self._plan = list(plan)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        off = 0
        for t in self._plan:
            if t.dtype not in _NAMES:
                raise SafetensorsFormatError(f"dtype {t.dtype} of {t.name!r} cannot be stored")
            header[t.name] = {
                "dtype": _NAMES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [off, off + t.nbytes],
            }
            off += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in close() / abort()
        self._hash = hashlib.sha256()
        self._sha = _Worker(self._hash.update, "shard-sha256")
        self._writer = _Worker(self._write_all, "shard-write")
        self._written = 0  # writer thread only: bytes written so far
        self._written_back = 0  # writer thread only: bytes [0, this) have had writeback started
        self.size = 0
        self._emit(memoryview(struct.pack("<Q", len(raw)) + raw), None)
        self._next = 0

    def _write_all(self, view: memoryview) -> None:
        done = 0
        while done < len(view):  # a raw write may be short
            done += self._file.write(view[done:])
        self._written += done
        if self._written - self._written_back >= WRITEBACK_CHUNK:
            start_writeback(self._file.fileno(), self._written_back, self._written - self._written_back)
            self._written_back = self._written

    def _emit(self, data: memoryview, keepalive: object) -> None:
        view = data.cast("B")
        self._writer.put(keepalive, view)
        self._sha.put(keepalive, view)
        self.size += len(view)

    def write(self, name: str, t: torch.Tensor) -> None:
        if self._next >= len(self._plan):
            raise SafetensorsFormatError(f"{self.path}: unplanned tensor {name!r}")
        p = self._plan[self._next]
        if (p.name, p.dtype, p.shape) != (name, t.dtype, tuple(t.shape)):
            raise SafetensorsFormatError(
                f"{self.path}: expected {p.name} {p.dtype} {list(p.shape)}, got {name} {t.dtype} {list(t.shape)}"
            )
        t = t.contiguous()
        if t.numel():
            self._emit(memoryview(t.view(torch.uint8).reshape(-1).numpy()), t)
        self._next += 1

    def close(self) -> str:
        """Finish the file; returns its sha256 hex. Raises if tensors are missing or a write failed."""
        if self._next != len(self._plan):
            self.abort()
            missing = self._plan[self._next].name
            raise SafetensorsFormatError(f"{self.path}: closed before writing {missing!r}")
        try:
            self._writer.finish()
            os.fsync(self._file.fileno())
        except BaseException:
            self.abort()
            raise
        self._file.close()
        self._sha.finish()
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._writer.abort()
        self._sha.abort()
        if not self._file.closed:
            self._file.close()
