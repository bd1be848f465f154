"""The non-weight files of an artifact (config, generation_config, tokenizer, chat template),
fetched next to the process and verified against the manifest before use."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.manifest import HF_SIDE_FILES, MANIFEST_NAME, Manifest, ManifestError
from shared.storage import split_uri


class ArtifactError(ValueError):
    """The artifact cannot be served: missing, corrupt, or of an unsupported format."""


@dataclass
class Artifact:
    uri: str
    manifest: Manifest
    digest: str  # sha256 of manifest.json as stored
    side_dir: Path  # local directory holding the HF side files

    @property
    def generation_config(self) -> dict[str, Any]:
        p = self.side_dir / "generation_config.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.side_dir)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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
        if dest.stat().st_size != entry.size or _sha256(dest) != entry.sha256:
            raise ArtifactError(f"{manifest_uri}: {entry.path} does not match its sha256 in the manifest")
    return Artifact(manifest_uri, manifest, hashlib.sha256(raw).hexdigest(), side_dir)
