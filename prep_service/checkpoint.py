"""The checkpoint side of a preparation: its ``config.json``, a lazy tensor mapping over its weight
files, and the validation and shard planning done from the safetensors headers alone.

:func:`validate` runs the whole conversion path (``shared.conversion``) on meta tensors with the
checkpoint's shapes: every tensor present, used and of the shape ``config.json`` implies, and every
rank's shard file planned (names, dtypes, shapes) before a byte of weight data is read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch._dynamo  # see the comment below

from prep_service.api import PrepError
from prep_service.st_io import PlannedTensor, SafetensorsFormatError, TensorInfo, read_header, read_tensor
from shared.conversion import RANK_DTYPE, RANK_KEY, RANK_SHAPE, shard_built
from shared.families import Family, ParamRule
from shared.families.base import Architecture
from shared.layout import Target, canonical_shape

# Planning (``validate``) runs the families' torch.cat/stack on meta tensors, and those meta kernels
# import torch._dynamo on their first call: 1.1-1.7 s on the bench machine, once per process. It is
# imported with this module instead (the CLI and the prep server import it only to prepare), so
# that start-up cost is not paid inside the first preparation, where it was the largest single item
# of a warm 0.5 GB run (docs/PERFORMANCE.md, "Prep hot spots").


def load_config(root: Path) -> dict:
    """The checkpoint directory's ``config.json`` as a dict; PrepError naming the file otherwise."""
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


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p) :]
    return key


class MetaView(Mapping[str, torch.Tensor]):
    """Meta tensors with the checkpoint's shapes: runs conversion + sharding without data."""

    def __init__(self, ckpt: Checkpoint):
        self._ckpt = ckpt

    def __getitem__(self, key: str) -> torch.Tensor:
        dtype, shape = self._ckpt.info(key)
        return torch.empty(shape, dtype=dtype, device="meta")

    def __iter__(self) -> Iterator[str]:
        return iter(self._ckpt)

    def __len__(self) -> int:
        return len(self._ckpt)


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
    meta = MetaView(ckpt)
    plans: list[list[PlannedTensor]] = [
        [PlannedTensor(RANK_KEY, RANK_DTYPE, RANK_SHAPE)] for _ in range(target.tp_degree)
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
        for name, parts in shard_built(rule.name, t, arch, target):
            for r, part in enumerate(parts):
                plans[r].append(PlannedTensor(name, part.dtype, tuple(part.shape)))
    return plans
