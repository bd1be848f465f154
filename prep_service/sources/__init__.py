"""Checkpoint sources: a local directory, an HF hub repo id, an ``s3://`` prefix, or a ``.gguf`` file.

Each resolves to a local directory holding ``config.json``, the weight files and the tokenizer
files, plus what identifies it (URI, resolved revision) for the manifest and the artifact key.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prep_service.api import PrepError

# What is fetched from remote sources: weights, configs, tokenizer files. Nothing else.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.bin.index.json")
META_PATTERNS = ("*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass
class ResolvedSource:
    uri: str
    kind: str  # local | hub | s3 | gguf
    root: Path  # local directory with config.json, weights, tokenizer files
    name: str  # default model name in the store
    revision: str | None = None
    # Stable identity for the artifact key when content hashes are not used (hub: repo@commit).
    identity: str | None = None
    # Files whose sha256 identifies the source (default: every file under root that is used).
    hashed_files: list[Path] = field(default_factory=list)
    # sha256 of files already known from fetching them (an s3 download hashes what it writes).
    digests: dict[Path, str] = field(default_factory=dict)
    _cleanup: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for fn in reversed(self._cleanup):
            fn()
        self._cleanup.clear()


def _sanitize_name(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "--", s.strip("/")).strip("-.") or "model"
    return s[:128]


def _is_pathlike(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or (os.sep in source and Path(source).exists())


def resolve_source(
    source: str,
    *,
    revision: str | None = None,
    workdir: Path,
    on_stage: Callable[[str], None] = lambda s: None,
) -> ResolvedSource:
    """Turn a user's SOURCE into a local directory. ``workdir`` receives downloads/conversions."""
    if "\x00" in source:
        raise PrepError("source contains a NUL byte")
    if source.startswith("s3://"):
        return _from_s3(source, workdir, on_stage)
    if source.startswith("file://"):
        source = source[len("file://") :]
    elif "://" in source:
        raise PrepError(
            f"unsupported source scheme in {source!r}: use a local path, file://, s3:// or a hub repo id"
        )
    path = Path(source).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file():
            if path.suffix == ".gguf":
                return _from_gguf(path, workdir, on_stage)
            raise PrepError(
                f"{path}: a file source must be a .gguf file; give the checkpoint directory instead"
            )
        return ResolvedSource(uri=f"file://{path}", kind="local", root=path, name=_sanitize_name(path.name))
    if _is_pathlike(source) or not _REPO_ID.match(source):
        raise PrepError(
            f"source not found: {source!r} is not an existing path, an s3:// URI or a hub repo id"
        )
    return _from_hub(source, revision, workdir, on_stage)


def _from_hub(
    repo: str, revision: str | None, workdir: Path, on_stage: Callable[[str], None]
) -> ResolvedSource:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    on_stage("resolving")
    token = os.environ.get("HF_TOKEN") or None
    try:
        info = HfApi(token=token).model_info(repo, revision=revision)
    except RepositoryNotFoundError:
        raise PrepError(
            f"hub repo {repo!r} not found (or HF_TOKEN lacks access); no local path of that name either"
        ) from None
    except RevisionNotFoundError:
        raise PrepError(f"hub repo {repo!r} has no revision {revision!r}") from None
    except (HfHubHTTPError, OSError) as e:
        raise PrepError(
            f"could not reach the Hugging Face Hub for {repo!r} (and no local path of that name): {e}"
        ) from None
    sha = info.sha
    files = {s.rfilename for s in (info.siblings or [])}
    patterns = list(META_PATTERNS) + list(WEIGHT_PATTERNS)
    if not any(f.endswith(".safetensors") for f in files):
        patterns += list(PICKLE_PATTERNS)  # refused later unless --allow-pickle
    on_stage("downloading")
    try:
        local = snapshot_download(
            repo, revision=sha, allow_patterns=patterns, token=token, cache_dir=workdir / "hub"
        )
    except (HfHubHTTPError, OSError) as e:
        raise PrepError(f"download of {repo}@{sha} failed: {e}") from None
    return ResolvedSource(
        uri=f"hf://{repo}",
        kind="hub",
        root=Path(local),
        name=_sanitize_name(repo),
        revision=sha,
        identity=f"hf:{repo}@{sha}",
    )


def _from_s3(uri: str, workdir: Path, on_stage: Callable[[str], None]) -> ResolvedSource:
    from shared.storage import StoreError, open_store

    on_stage("downloading")
    store = open_store(uri.rstrip("/"))
    dest = Path(tempfile.mkdtemp(prefix="s3src-", dir=workdir))
    wanted = (*WEIGHT_PATTERNS, *PICKLE_PATTERNS, *META_PATTERNS)
    try:
        objects = store.list("")
        digests: dict[Path, str] = {}
        got = 0
        for obj in objects:
            if "/" in obj.key or not any(Path(obj.key).match(p) for p in wanted):
                continue  # only the checkpoint's top level, only relevant files
            info = store.download_file(obj.key, dest / obj.key)
            got += 1
            if info.sha256 is not None:
                digests[dest / obj.key] = info.sha256
    except StoreError as e:
        raise PrepError(f"download from {uri} failed: {e}") from None
    if not got:
        raise PrepError(f"{uri}: no checkpoint files under this prefix")
    return ResolvedSource(
        uri=uri.rstrip("/"),
        kind="s3",
        root=dest,
        name=_sanitize_name(uri.rstrip("/").rsplit("/", 1)[-1]),
        digests=digests,
        _cleanup=[lambda: shutil.rmtree(dest, ignore_errors=True)],
    )


def _from_gguf(path: Path, workdir: Path, on_stage: Callable[[str], None]) -> ResolvedSource:
    """Dequantize a GGUF through transformers into a safetensors checkpoint.

    transformers' GGUF loader materializes the whole dequantized model in memory: this path is
    meant for the small GGUF checkpoints it supports (llama, qwen2, qwen2_moe, qwen3, qwen3_moe, phi3).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    on_stage("dequantizing")
    dest = Path(tempfile.mkdtemp(prefix="gguf-", dir=workdir))
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)  # else save_pretrained refuses
        model.save_pretrained(dest)
        del model
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(dest)
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise PrepError(f"{path}: could not load this GGUF through transformers: {e}") from None
    return ResolvedSource(
        uri=f"file://{path}",
        kind="gguf",
        root=dest,
        name=_sanitize_name(path.stem),
        hashed_files=[path],
        _cleanup=[lambda: shutil.rmtree(dest, ignore_errors=True)],
    )
