"""A prepared artifact as the exec service sees it: the manifest read and checked once, the side
files (config, generation_config, tokenizer, chat template) fetched and verified, and each rank's
shard fetched and verified against the manifest's sha256 *before* it is read.

``Artifact`` is the engine's shard source (``arch``, ``target``, ``load(rank)``) and is picklable:
TP worker processes call ``load(rank)`` themselves. This is the exec side's only storage I/O; the
model receives tensors.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.families.base import Architecture
from shared.layout import Target
from shared.manifest import HF_SIDE_FILES, MANIFEST_NAME, Manifest, ManifestError, shard_path
from shared.quantize import SCHEMES
from shared.storage import file_mismatch, split_uri


class ArtifactError(ValueError):
    """The artifact cannot be served: missing, corrupt, or of an unsupported format."""


@dataclass
class Artifact:
    uri: str
    manifest: Manifest
    digest: str  # sha256 of manifest.json as stored
    side_dir: Path  # local directory holding the HF side files

    @property
    def arch(self) -> Architecture:
        return self.manifest.architecture

    @property
    def target(self) -> Target:
        return self.manifest.target

    @property
    def generation_config(self) -> dict[str, Any]:
        p = self.side_dir / "generation_config.json"
        return json.loads(p.read_text()) if p.exists() else {}

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The generation_config's EOS ids (chat models set them to the end-of-turn token), else the
        architecture's."""
        eos = self.generation_config.get("eos_token_id")
        if eos is None:
            return tuple(self.arch.eos_token_ids)
        return tuple(eos) if isinstance(eos, list) else (int(eos),)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.side_dir)

    def load(self, rank: int) -> dict[str, torch.Tensor]:
        """Rank ``rank``'s shard (canonical names + ``rank``), verified against the manifest."""
        from safetensors.torch import load_file

        tp = self.target.tp_degree
        if not 0 <= rank < tp:
            raise ArtifactError(f"rank {rank} out of range for tp {tp}")
        rel = shard_path(rank, tp)
        try:
            entry = self.manifest.file(rel)
        except ManifestError as e:
            raise ArtifactError(f"{self.uri}: {e}") from None
        store, _ = split_uri(self.uri)
        local = store.local_path(rel)
        with tempfile.TemporaryDirectory(prefix="neuron-serve-shard-") as tmp:
            path = Path(local) if local is not None else Path(tmp) / "shard.safetensors"
            if local is None:
                store.download_file(rel, path)
            _verify(path, entry.size, entry.sha256, f"{self.uri}: {rel}")
            return load_file(str(path))


def _verify(path: Path, size: int, sha256: str, what: str) -> None:
    problem = file_mismatch(path, size, sha256, what, "the manifest")
    if problem is not None:
        raise ArtifactError(problem)


def open_artifact(manifest_uri: str, workdir: Path | None = None) -> Artifact:
    """Read and check the manifest, then fetch and verify its side files."""
    try:
        store, key = split_uri(manifest_uri)
    except ValueError as e:
        raise ArtifactError(f"{manifest_uri}: {e}") from None
    if not key.endswith(MANIFEST_NAME):
        raise ArtifactError(f"{manifest_uri}: expected the URI of a {MANIFEST_NAME}")
    try:
        raw = store.get_bytes(key)
    except FileNotFoundError:
        raise ArtifactError(
            f"{manifest_uri}: no manifest there (not prepared, or preparation unfinished)"
        ) from None
    try:
        manifest = Manifest.from_json(raw)
    except ManifestError as e:
        raise ArtifactError(f"{manifest_uri}: {e}") from None
    if manifest.target.quantization not in (None, *SCHEMES):
        raise ArtifactError(
            f"{manifest_uri}: unknown quantization scheme {manifest.target.quantization!r} "
            f"(this build serves {', '.join(SCHEMES)})"
        )
    for r in range(manifest.target.tp_degree):  # every shard is listed before any is fetched
        try:
            manifest.file(shard_path(r, manifest.target.tp_degree))
        except ManifestError as e:
            raise ArtifactError(f"{manifest_uri}: {e}") from None
    side_dir = Path(workdir or tempfile.mkdtemp(prefix="neuron-serve-artifact-"))
    side_dir.mkdir(parents=True, exist_ok=True)
    for entry in manifest.files:
        if entry.path not in HF_SIDE_FILES:
            continue
        local = store.local_path(entry.path)
        dest = side_dir / entry.path
        if local is not None:
            dest.write_bytes(Path(local).read_bytes())
        else:
            store.download_file(entry.path, dest)
        try:
            _verify(dest, entry.size, entry.sha256, f"{manifest_uri}: {entry.path}")
        except ArtifactError:
            raise ArtifactError(
                f"{manifest_uri}: {entry.path} does not match its sha256 in the manifest"
            ) from None
    return Artifact(manifest_uri, manifest, hashlib.sha256(raw).hexdigest(), side_dir)
