"""Graph sets in an object store: find one by key, fetch it with every file verified, publish one.

Publishing puts every file first and ``graphs.json`` last with a conditional create: a reader sees
a complete graph set or none, and of two concurrent builds of one key the first wins (the second
answers the winner's URI). Fetching checks each file's size and sha256 against ``graphs.json`` and
refuses a damaged one, naming it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from exec_service.graph_sets.key import graph_set_prefix
from exec_service.graph_sets.manifest import GRAPHS_JSON, GraphSetError, GraphSetManifest
from shared.manifest import FileEntry
from shared.storage import ObjectExists, ObjectStore, file_mismatch, sha256_file

log = logging.getLogger("neuron_serve.graphs")


def graphs_json_key(key: str) -> str:
    return f"{graph_set_prefix(key)}/{GRAPHS_JSON}"


def graph_set_uri(store: ObjectStore, key: str) -> str:
    return store.uri_for(graphs_json_key(key))


def find(store: ObjectStore, key: str) -> GraphSetManifest | None:
    """The published graph set of ``key``, or None (StoreError when the store fails)."""
    try:
        raw = store.get_bytes(graphs_json_key(key))
    except FileNotFoundError:
        return None
    m = GraphSetManifest.from_json(raw, what=graph_set_uri(store, key))
    if m.graph_key != key:
        raise GraphSetError(f"{graph_set_uri(store, key)}: holds graph_key {m.graph_key}, not {key}")
    return m


def fetch(store: ObjectStore, manifest: GraphSetManifest, dest: Path | None = None) -> Path:
    """Every file of the graph set into ``dest`` (a new temporary directory by default), each
    verified against its size and sha256 in ``graphs.json``."""
    dest = Path(dest or tempfile.mkdtemp(prefix=f"neuron-serve-graphs-{manifest.graph_key[:8]}-"))
    dest.mkdir(parents=True, exist_ok=True)
    prefix = graph_set_prefix(manifest.graph_key)
    for entry in manifest.files:
        local = dest / entry.path
        local.parent.mkdir(parents=True, exist_ok=True)
        what = f"graph set {manifest.graph_key}: {entry.path}"
        try:
            store.download_file(f"{prefix}/{entry.path}", local)
        except FileNotFoundError:
            raise GraphSetError(f"{what} is missing from the store") from None
        problem = file_mismatch(local, entry.size, entry.sha256, what, GRAPHS_JSON)
        if problem is not None:
            raise GraphSetError(problem)
    return dest


def file_entries(directory: Path) -> tuple[FileEntry, ...]:
    return tuple(
        FileEntry(p.relative_to(directory).as_posix(), p.stat().st_size, sha256_file(p))
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    )


def publish(store: ObjectStore, directory: Path, manifest: GraphSetManifest, replace: bool = False) -> str:
    """Put the files listed in ``manifest`` (from ``directory``), then ``graphs.json``; return its URI.
    An existing graph set of the key is left as it is (the first publisher wins) unless ``replace``
    (``compile --force``): a server loading the old one meanwhile sees a sha256 mismatch and refuses
    it, never a mix."""
    prefix = graph_set_prefix(manifest.graph_key)
    for entry in manifest.files:
        store.put_file(f"{prefix}/{entry.path}", directory / entry.path, sha256=entry.sha256)
    if replace:
        store.put_bytes(graphs_json_key(manifest.graph_key), manifest.to_json())
        return graph_set_uri(store, manifest.graph_key)
    try:
        store.create_exclusive(graphs_json_key(manifest.graph_key), manifest.to_json())
    except ObjectExists:
        log.info("graph set %s was published meanwhile; keeping that one", manifest.graph_key)
    return graph_set_uri(store, manifest.graph_key)
