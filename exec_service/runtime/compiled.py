"""Compiled step graphs as artifacts, the runtime's side: what one graph set holds on local disk,
how a rank installs it into this process's compiler caches, and how a compile captures it.

A graph set (``exec_service.graph_sets``) carries two files per backend build:

* ``MEGA_CACHE``: ``torch.compiler.save_cache_artifacts()`` — the Dynamo / AOTAutograd / Inductor
  cache entries of every compiled graph (the same portable cache format TorchNeuron keeps its
  NEFFs in). ``load_cache_artifacts`` puts them into this process's caches: a later
  ``torch.compile`` of the same graph still traces it with Dynamo (seconds) but finds its
  AOTAutograd and FX graph entries and runs no Inductor compilation;
* ``CPU_KERNELS``: the C++ kernel libraries (``*.so``) Inductor built for them. The mega-cache holds
  the kernels' source, not the built libraries: without this file every loaded graph would run the
  C++ compiler again (measured: SmolLM2 decode graph 23.8 s to first call with the mega-cache alone,
  22 kernels rebuilt). Libraries are keyed by the hash of their source, so they go back to the same
  relative path under the cache directory and are loaded from there.

Weights never enter either: every parameter is a graph input (``torch.compile`` lifts module
parameters to inputs; no freezing), so one graph set serves every checkpoint of an architecture.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MEGA_CACHE = "mega-cache.bin"
CPU_KERNELS = "cpu-kernels.tar"
GRAPH_FILES = (MEGA_CACHE, CPU_KERNELS)
COMPILED, EAGER = "compiled", "eager"

_installed: set[str] = set()  # graph keys installed into this process


class GraphSetInstallError(RuntimeError):
    """A verified graph set could not be put into this process's compiler caches."""


@dataclass(frozen=True)
class CompiledGraphs:
    """A verified graph set on local disk, as every rank's runtime uses it (picklable)."""

    key: str
    directory: str  # holds GRAPH_FILES
    compiled: frozenset[str] = field(default_factory=frozenset)  # graph names run compiled; others eager

    def runs_compiled(self, name: str) -> bool:
        return name in self.compiled


def inductor_cache_dir() -> Path:
    from torch._inductor.runtime.runtime_utils import cache_dir

    return Path(cache_dir())


def install(graphs: CompiledGraphs) -> None:
    """Load the mega-cache and the kernel libraries into this process (once per key)."""
    if graphs.key in _installed:
        return
    import torch

    directory = Path(graphs.directory)
    try:
        torch.compiler.load_cache_artifacts((directory / MEGA_CACHE).read_bytes())
        _extract_kernels(directory / CPU_KERNELS, inductor_cache_dir())
    except (OSError, tarfile.TarError, ValueError, RuntimeError) as e:
        raise GraphSetInstallError(f"graph set {graphs.key}: cannot install: {e}") from e
    _installed.add(graphs.key)


def _extract_kernels(tar_path: Path, cache_dir: Path) -> int:
    """Regular files only, relative paths inside ``cache_dir`` only; each written to a temporary
    sibling and renamed (ranks of one host share the cache directory)."""
    n = 0
    with tarfile.open(tar_path) as tf:
        for member in tf.getmembers():
            rel = Path(member.name)
            if not member.isfile() or rel.is_absolute() or ".." in rel.parts:
                raise ValueError(f"{tar_path.name}: refusing member {member.name!r}")
            dest = cache_dir / rel
            if dest.exists() and dest.stat().st_size == member.size:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(member)
            assert src is not None
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(src.read())
                os.chmod(tmp, 0o755)
                os.replace(tmp, dest)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            n += 1
    return n


def capture(directory: Path) -> None:
    """After compiling every graph in this process: write ``GRAPH_FILES`` into ``directory``.

    The process must have started from an empty Inductor cache directory (``fresh_cache_dir``):
    then every library under it belongs to the graphs compiled here."""
    import torch

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise RuntimeError("torch.compiler.save_cache_artifacts() returned nothing: no graph was compiled")
    (directory / MEGA_CACHE).write_bytes(saved[0])
    root = inductor_cache_dir()
    with tarfile.open(directory / CPU_KERNELS, "w") as tf:
        for so in sorted(root.rglob("*.so")):
            tf.add(so, so.relative_to(root).as_posix())


def fresh_cache_dir() -> Path:
    """Point this process's Inductor cache at a new empty directory (before its first compile)."""
    path = Path(tempfile.mkdtemp(prefix="neuron-serve-inductor-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def compile_counters() -> dict[str, int]:
    """The compiler's own counters of cache use: how many graphs were compiled (misses) or found."""
    from torch._dynamo.utils import counters

    ind, aot = counters["inductor"], counters["aot_autograd"]
    return {
        "fxgraph_cache_hit": int(ind.get("fxgraph_cache_hit", 0)),
        "fxgraph_cache_miss": int(ind.get("fxgraph_cache_miss", 0)),
        "autograd_cache_hit": int(aot.get("autograd_cache_hit", 0)),
        "autograd_cache_miss": int(aot.get("autograd_cache_miss", 0)),
    }
