"""The Neuron SDK as plain data: each rank process's environment, the SDK's versions and the device
target. Nothing here imports torch — TorchNeuron reads its cache configuration when it is imported,
so a rank's environment is applied before the process's first ``import torch`` (``apply``).

Facts this follows (Neuron SDK 2.33 documentation, cited in docs/NEURON.md):

* the NEFF cache is a directory, ``TORCH_NEURONX_NEFF_CACHE_DIR`` (shared-filesystem safe: temp
  file + rename), keyed by the StableHLO, the target and the compiler flags but not the compiler
  version — so a graph set's key names neuronx-cc's version itself (``device_target``);
* one process per NeuronCore: ``NEURON_RT_VISIBLE_CORES`` holds that rank's core, taken from the
  cores the container was given (the device plugin sets ``NEURON_RT_VISIBLE_CORES`` to a list or
  range such as ``4-7``);
* compile-only mode on a CPU host with the SDK: ``TORCH_NEURONX_COMPILE_ONLY=1`` plus
  ``NEURON_PLATFORM_TARGET_OVERRIDE`` (no device to detect the target from);
* ``TORCH_NEURONX_DISABLE_FALLBACK_EXECUTION=1``: a graph that fails to compile raises instead of
  running eagerly (the default; set explicitly, since a silent eager fallback would serve at a
  fraction of the speed).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

NEFF_CACHE_DIR = "TORCH_NEURONX_NEFF_CACHE_DIR"
VISIBLE_CORES = "NEURON_RT_VISIBLE_CORES"
COMPILE_ONLY = "TORCH_NEURONX_COMPILE_ONLY"
TARGET_OVERRIDE = "NEURON_PLATFORM_TARGET_OVERRIDE"
CC_FLAGS = "NEURON_CC_FLAGS"
NO_FALLBACK = "TORCH_NEURONX_DISABLE_FALLBACK_EXECUTION"
# the cores the container was given, kept when rank 0 narrows NEURON_RT_VISIBLE_CORES to its own
CONTAINER_CORES = "NEURON_SERVE_CORES"
TARGETS = ("trn2", "trn3")  # what TorchNeuron supports
# the Python packages and the runtime library whose versions change compiled code or its loading
PACKAGES = {"torch_neuronx": "torch-neuronx", "neuronx_cc": "neuronx-cc"}
RUNTIME_DEB = "aws-neuronx-runtime-lib"
PRODUCT_NAME = Path("/sys/devices/virtual/dmi/id/product_name")  # "trn2.48xlarge" on EC2

SDK_MISSING = (
    "backend 'neuron' needs the Neuron SDK (TorchNeuron): cannot import torch_neuronx (install "
    "torch-neuronx 2.13.3.* for torch 2.13.0 from AWS's Neuron index, https://pip.repos.neuron.amazonaws.com, "
    "on a Trn2/Trn3 host, or on a CPU host for compile-only builds; docs/NEURON.md)"
)


class NeuronConfigError(ValueError):
    """A Neuron environment that cannot work (named)."""


def parse_cores(spec: str) -> list[int]:
    """``NEURON_RT_VISIBLE_CORES`` syntax -> core ids: ``"4-7"`` -> [4, 5, 6, 7], ``"0,2"``."""
    cores: list[int] = []
    for part in spec.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise NeuronConfigError(f"{VISIBLE_CORES}={spec!r}: expected core ids like 0-3 or 0,2")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise NeuronConfigError(f"{VISIBLE_CORES}={spec!r}: range {part} is empty")
        cores += range(lo, hi + 1)
    if len(set(cores)) != len(cores):
        raise NeuronConfigError(f"{VISIBLE_CORES}={spec!r}: a core is listed twice")
    return cores


def rank_core(rank: int, tp: int, visible: str | None) -> int:
    """The NeuronCore of ``rank``: the rank-th core the container was given (``visible``), or core
    ``rank`` when none was named; fewer cores than ranks is refused."""
    cores = parse_cores(visible) if visible else list(range(tp))
    if len(cores) < tp:
        raise NeuronConfigError(
            f"tp={tp} needs one NeuronCore per rank but {VISIBLE_CORES}={visible!r} gives {len(cores)}"
        )
    return cores[rank]


@dataclass(frozen=True)
class NeuronEnv:
    """What every rank process of one server (or one compile) shares."""

    neff_cache_dir: str
    compile_only: bool = False
    target: str | None = None  # trn2 | trn3; required in compile-only mode
    cc_flags: str = ""

    def __post_init__(self) -> None:
        if self.target is not None and self.target not in TARGETS:
            raise NeuronConfigError(f"target {self.target!r}: TorchNeuron supports {', '.join(TARGETS)}")
        if self.compile_only and self.target is None:
            raise NeuronConfigError(
                f"compile-only mode ({COMPILE_ONLY}=1) needs {TARGET_OVERRIDE} (trn2 or trn3): "
                "there is no device to detect it from"
            )

    def for_rank(self, rank: int, tp: int, visible: str | None = None) -> dict[str, str]:
        """The variables rank ``rank`` of ``tp`` sets before importing torch (``visible``: the
        container's ``NEURON_RT_VISIBLE_CORES``)."""
        if not 0 <= rank < tp:
            raise NeuronConfigError(f"rank {rank} is not in 0..{tp - 1}")
        env = {
            NEFF_CACHE_DIR: self.neff_cache_dir,
            NO_FALLBACK: "1",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(tp),
        }
        if self.compile_only:
            env[COMPILE_ONLY] = "1"
        else:
            env[VISIBLE_CORES] = str(rank_core(rank, tp, visible))
            if visible:
                env[CONTAINER_CORES] = visible
        if self.target is not None:
            env[TARGET_OVERRIDE] = self.target
        if self.cc_flags:
            env[CC_FLAGS] = self.cc_flags
        return env


def container_cores(environ: Mapping[str, str] | None = None) -> str | None:
    """The NeuronCores this container was given (before any rank took its own)."""
    environ = os.environ if environ is None else environ
    return environ.get(CONTAINER_CORES) or environ.get(VISIBLE_CORES) or None


def default_neff_cache_dir() -> str:
    from platformdirs import user_cache_dir

    return str(Path(user_cache_dir("neuron-serve")) / "neff")


def from_environ(environ: Mapping[str, str] | None = None) -> NeuronEnv:
    """The shared environment as the operator set it (Helm sets these on the container)."""
    environ = os.environ if environ is None else environ
    return NeuronEnv(
        neff_cache_dir=environ.get(NEFF_CACHE_DIR) or default_neff_cache_dir(),
        compile_only=environ.get(COMPILE_ONLY, "") in ("1", "true", "yes"),
        target=environ.get(TARGET_OVERRIDE) or None,
        cc_flags=environ.get(CC_FLAGS, ""),
    )


def apply(env: Mapping[str, str]) -> None:
    """Set ``env`` in this process: before its first ``import torch`` (TorchNeuron reads it then)."""
    if "torch_neuronx" in sys.modules:
        raise NeuronConfigError("the Neuron environment must be set before torch_neuronx is imported")
    os.environ.update(env)


def versions() -> dict[str, str | None]:
    """torch-neuronx, neuronx-cc (Python packages) and the Neuron runtime library (a system package);
    None for what is not installed."""
    out: dict[str, str | None] = {}
    for key, dist in PACKAGES.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    out["runtime"] = _deb_version(RUNTIME_DEB)
    return out


def _deb_version(package: str) -> str | None:
    try:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def detect_target(environ: Mapping[str, str] | None = None, product_name: Path = PRODUCT_NAME) -> str | None:
    """trn2 / trn3: the override if set, else the EC2 instance family; None elsewhere."""
    environ = os.environ if environ is None else environ
    if environ.get(TARGET_OVERRIDE):
        return environ[TARGET_OVERRIDE]
    try:
        family = product_name.read_text().strip().split(".")[0]
    except OSError:
        return None
    return family if family in TARGETS else None


def device_target(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """What a graph key records for neuron: the target, the compiler flags and every SDK version
    (the NEFF cache itself does not key on the compiler version)."""
    environ = os.environ if environ is None else environ
    return {
        "device": "neuron",
        "target": detect_target(environ),
        "neuron_cc_flags": environ.get(CC_FLAGS, ""),
        **versions(),
    }


def require_sdk() -> None:
    """Import torch_neuronx, or raise ``BackendUnavailable`` naming the SDK."""
    from exec_service.runtime.backends import BackendUnavailable

    try:
        __import__("torch_neuronx")
    except ImportError:
        raise BackendUnavailable(SDK_MISSING) from None
