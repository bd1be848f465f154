"""Regenerate the Python code for protos/*.proto (``make protos`` or ``python -m protos.generate``).

The generated files are committed so that an installed package works without grpcio-tools at
import time; ``tests/test_protos.py`` fails when they are stale relative to the .proto sources.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent
PROTOS = ("prep.proto", "exec.proto")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (bundled with grpcio-tools) into ``out_dir``/protos; return the written files."""
    from grpc_tools import protoc  # imported here: only needed when generating

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(PROTO_DIR / p) for p in PROTOS],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return sorted((out_dir / "protos").glob("*_pb2*.py*"))


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for f in generate(Path(tmp)):
            target = PROTO_DIR / f.name
            target.write_bytes(f.read_bytes())
            print(f"wrote {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
