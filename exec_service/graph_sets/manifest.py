"""``graphs.json``: the graph set's manifest, written last (a conditional create, like
``manifest.json``): a prefix without one is not a graph set.

    schema_version, graph_key, key_inputs (everything the key is computed from, in clear),
    graphs: [{name, kind, batch, seq, kv_len, greedy, inputs: [{name, dtype, shape}],
              run ("compiled" | "eager"), compile_s, compiled_ms, eager_ms}],
    files: [{path, size, sha256}], created_at, compile_s (the whole build)

``run`` records the path each graph takes when loaded: "compiled", or "eager" where the eager
graph measured faster at build time (``compile --prefer fastest``; both step times are kept).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from exec_service.graph_sets.key import graph_key
from exec_service.runtime.compiled import COMPILED, EAGER, graph_files
from exec_service.runtime.graphs import GraphSpec
from exec_service.runtime.step_io import INPUTS
from shared.manifest import FileEntry

SCHEMA_VERSION = 1
GRAPHS_JSON = "graphs.json"


class GraphSetError(ValueError):
    """A graph set that cannot be used: malformed, of another schema, damaged or incomplete."""


@dataclass(frozen=True)
class GraphEntry:
    name: str
    kind: str
    batch: int
    seq: int
    kv_len: int
    greedy: bool
    inputs: tuple[dict[str, Any], ...]
    run: str = COMPILED
    compile_s: float = 0.0
    compiled_ms: float | None = None
    eager_ms: float | None = None

    @classmethod
    def of(cls, spec: GraphSpec, **measured: Any) -> GraphEntry:
        dims = spec.dims()
        inputs = tuple(
            {
                "name": n,
                "dtype": str(INPUTS[n].dtype).removeprefix("torch."),
                "shape": list(INPUTS[n].shape(dims)),
            }
            for n in spec.input_names()
        )
        return cls(spec.name, spec.kind, spec.batch, spec.seq, spec.kv_len, spec.greedy, inputs, **measured)


@dataclass(frozen=True)
class GraphSetManifest:
    graph_key: str
    key_inputs: dict[str, Any]
    graphs: tuple[GraphEntry, ...]
    files: tuple[FileEntry, ...]
    created_at: str = ""
    compile_s: float = 0.0
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        """The backend the set was built for (its required files depend on it)."""
        backend = self.key_inputs.get("backend")
        return backend.get("name", "cpu") if isinstance(backend, dict) else "cpu"

    @property
    def compiled_names(self) -> frozenset[str]:
        return frozenset(g.name for g in self.graphs if g.run == COMPILED)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["graphs"] = [asdict(g) for g in self.graphs]
        d["files"] = [asdict(f) for f in self.files]
        return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes | str, what: str = GRAPHS_JSON) -> GraphSetManifest:
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise GraphSetError(f"{what}: not JSON: {e}") from None
        if not isinstance(d, dict):
            raise GraphSetError(f"{what}: expected a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise GraphSetError(
                f"{what}: schema_version {version!r} is not supported (this build reads {SCHEMA_VERSION})"
            )
        try:
            graphs = tuple(GraphEntry(**{**g, "inputs": tuple(g["inputs"])}) for g in d["graphs"])
            files = tuple(FileEntry(**f) for f in d["files"])
            m = cls(
                graph_key=d["graph_key"],
                key_inputs=d["key_inputs"],
                graphs=graphs,
                files=files,
                created_at=d.get("created_at", ""),
                compile_s=float(d.get("compile_s", 0.0)),
                extra=d.get("extra", {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise GraphSetError(f"{what}: malformed: {type(e).__name__}: {e}") from None
        if graph_key(m.key_inputs) != m.graph_key:
            raise GraphSetError(f"{what}: graph_key {m.graph_key} is not the hash of its key_inputs")
        for g in m.graphs:
            if g.run not in (COMPILED, EAGER):
                raise GraphSetError(
                    f"{what}: graph {g.name}: run must be {COMPILED!r} or {EAGER!r}, got {g.run!r}"
                )
        have = {f.path for f in m.files}
        missing = [p for p in graph_files(m.backend) if p not in have]
        if missing:
            raise GraphSetError(f"{what}: lists no {', '.join(missing)}")
        return m
