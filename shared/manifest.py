"""The artifact manifest (DESIGN §4): written last; a prefix without one is not a model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from shared.families.base import Architecture
from shared.layout import Target

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Files copied from the checkpoint into the artifact so exec needs nothing else.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class ManifestError(ValueError):
    """A manifest that cannot be used: malformed, or of an unsupported schema_version."""


def store_root_uri(manifest_uri: str, manifest: Manifest) -> str | None:
    """The root of the store a published manifest lives in (``{store}/models/{name}/{key}/manifest.json``),
    or None when ``manifest_uri`` is not laid out so (a manifest copied elsewhere)."""
    suffix = f"/models/{manifest.name}/{manifest.artifact_key}/{MANIFEST_NAME}"
    return manifest_uri[: -len(suffix)] if manifest_uri.endswith(suffix) else None


def shard_path(rank: int, tp: int) -> str:
    return f"shards/rank-{rank:05d}-of-{tp:05d}.safetensors"


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    artifact_key: str
    source: dict[str, Any]  # uri, revision, files: [{path, size, sha256}]
    family: str
    architecture: Architecture
    target: Target
    converter_version: str
    files: tuple[FileEntry, ...]
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise ManifestError(f"manifest lists no file {path!r}")

    def to_json(self) -> bytes:
        d = {
            "schema_version": self.schema_version,
            "name": self.name,
            "artifact_key": self.artifact_key,
            "source": self.source,
            "family": self.family,
            "architecture": self.architecture.to_dict(),
            "target": self.target.to_dict(),
            "converter_version": self.converter_version,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
            "created_at": self.created_at,
            "extra": self.extra,
        }
        return json.dumps(d, indent=2, sort_keys=False).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        try:
            d = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"manifest is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ManifestError("manifest is not a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"unsupported manifest schema_version {version!r} (this build reads {SCHEMA_VERSION})"
            )
        try:
            files = tuple(FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in d["files"])
            return cls(
                name=d["name"],
                artifact_key=d["artifact_key"],
                source=d["source"],
                family=d["family"],
                architecture=Architecture.from_dict(d["architecture"]),
                target=Target.from_dict(d["target"]),
                converter_version=d["converter_version"],
                files=files,
                created_at=d.get("created_at", ""),
                extra=d.get("extra", {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"manifest is malformed: {type(e).__name__}: {e}") from None
