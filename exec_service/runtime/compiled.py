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

A neuron graph set carries one file instead, ``NEFF_CACHE``: the TorchNeuron NEFF cache directory
(``TORCH_NEURONX_NEFF_CACHE_DIR``) a compile filled from empty, as a tar. Installing it extracts the
NEFFs into this process's NEFF cache directory, whose *variable* was set before torch was imported
(``runtime/neuron/sdk.py``); TorchNeuron looks a graph's NEFF up there when it compiles it (at the
runner's warm-up), keyed by the graph's StableHLO, the target and the compiler flags. A warm-up that
writes a new NEFF compiled a graph the set did not hold: ``check_loaded`` refuses that under
``--graphs required`` (``strict``).
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
GRAPH_FILES = (MEGA_CACHE, CPU_KERNELS)  # cpu, cuda
NEFF_CACHE = "neff-cache.tar"
NEURON_GRAPH_FILES = (NEFF_CACHE,)
COMPILED, EAGER = "compiled", "eager"


def graph_files(backend: str) -> tuple[str, ...]:
    """The files a graph set of ``backend`` must hold."""
    return NEURON_GRAPH_FILES if backend == "neuron" else GRAPH_FILES


_installed: set[str] = set()  # graph keys installed into this process


class GraphSetInstallError(RuntimeError):
    """A verified graph set could not be put into this process's compiler caches."""


class GraphSetMiss(GraphSetInstallError):
    """A graph of a strict (``--graphs required``) graph set had to be compiled at start."""


@dataclass(frozen=True)
class CompiledGraphs:
    """A verified graph set on local disk, as every rank's runtime uses it (picklable)."""

    key: str
    directory: str  # holds graph_files(backend)
    compiled: frozenset[str] = field(default_factory=frozenset)  # graph names run compiled; others eager
    backend: str = "cpu"
    strict: bool = False  # a graph the set does not hold is an error, not a compile (neuron)

    def runs_compiled(self, name: str) -> bool:
        return name in self.compiled

    def compiled_state(self) -> frozenset[str] | None:
        """What a compile would change (neuron: the NEFF cache's files), to compare after a graph's
        first call; None where nothing is tracked."""
        return neff_files() if self.backend == "neuron" else None

    def check_loaded(self, name: str, before: frozenset[str] | None) -> None:
        """After graph ``name``'s first call: under ``strict``, a NEFF that was not there before
        means the graph was compiled here — refused, naming the graph."""
        if not self.strict or before is None:
            return
        new = sorted((self.compiled_state() or frozenset()) - before)
        if new:
            raise GraphSetMiss(
                f"graph {name} was compiled at start ({len(new)} new file(s) in the NEFF cache, e.g. "
                f"{new[0]}): graph set {self.key} does not hold it; rebuild the graph set with "
                "neuron-serve compile for this SDK, target and NEURON_CC_FLAGS"
            )


def inductor_cache_dir() -> Path:
    from torch._inductor.runtime.runtime_utils import cache_dir

    return Path(cache_dir())


def install(graphs: CompiledGraphs) -> None:
    """Load the mega-cache and the kernel libraries into this process (once per key)."""
    if graphs.key in _installed:
        return
    directory = Path(graphs.directory)
    try:
        if graphs.backend == "neuron":
            _extract_kernels(directory / NEFF_CACHE, neff_cache_dir(), mode=0o644)
        else:
            import torch

            torch.compiler.load_cache_artifacts((directory / MEGA_CACHE).read_bytes())
            _extract_kernels(directory / CPU_KERNELS, inductor_cache_dir())
    except (OSError, tarfile.TarError, ValueError, RuntimeError) as e:
        raise GraphSetInstallError(f"graph set {graphs.key}: cannot install: {e}") from e
    _installed.add(graphs.key)


def neff_cache_dir() -> Path:
    """This process's TorchNeuron NEFF cache directory (its variable is set before torch is
    imported: ``runtime/neuron/sdk.py``)."""
    from exec_service.runtime.neuron.sdk import NEFF_CACHE_DIR

    value = os.environ.get(NEFF_CACHE_DIR)
    if not value:
        raise ValueError(f"{NEFF_CACHE_DIR} is not set: the neuron rank environment was not applied")
    path = Path(value)
    path.mkdir(parents=True, exist_ok=True)
    return path


def neff_files() -> frozenset[str]:
    """Every file under the NEFF cache directory, relative."""
    root = neff_cache_dir()
    return frozenset(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _extract_kernels(tar_path: Path, cache_dir: Path, mode: int = 0o755) -> int:
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
                os.chmod(tmp, mode)
                os.replace(tmp, dest)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            n += 1
    return n


def capture(directory: Path, backend: str = "cpu") -> None:
    """After compiling every graph in this process: write ``graph_files(backend)`` into
    ``directory``.

    The process must have started from an empty Inductor cache directory (``fresh_cache_dir``;
    neuron: an empty NEFF cache directory, ``fresh_neff_cache_dir``): then everything under it
    belongs to the graphs compiled here."""
    if backend == "neuron":
        root = neff_cache_dir()
        files = sorted(p for p in root.rglob("*") if p.is_file())
        if not files:
            raise RuntimeError(f"the NEFF cache {root} is empty: no graph was compiled")
        with tarfile.open(directory / NEFF_CACHE, "w") as tf:
            for f in files:
                tf.add(f, f.relative_to(root).as_posix())
        return
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


def fresh_neff_cache_dir() -> Path:
    """A new empty NEFF cache directory for this process (a neuron compile; before torch is
    imported): the graph set captures all of it."""
    from exec_service.runtime.neuron.sdk import NEFF_CACHE_DIR

    path = Path(tempfile.mkdtemp(prefix="neuron-serve-neff-"))
    os.environ[NEFF_CACHE_DIR] = str(path)
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
