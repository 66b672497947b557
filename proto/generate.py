"""Regenerate the Python modules of ``proto/*.proto``: ``python -m proto.generate`` (from the repo root).

The generated modules are checked in (so installing needs no code generation); tests/test_proto.py
regenerates them into a temporary folder and fails when they differ from the checked-in ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent


def generate(out_dir: Path) -> list[Path]:
    """Compile every ``proto/*.proto`` into ``out_dir/proto/``; returns the generated files."""
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(PROTO_DIR.glob("*.proto"))
    for source in sources:
        # -I ROOT makes the generated grpc module import "from proto import spinn_v1_pb2", our package.
        rc = protoc.main(["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}",
                          f"--grpc_python_out={out_dir}", str(source.relative_to(ROOT))])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {source} (exit {rc})")
    return sorted((out_dir / "proto").glob("*_pb2*.py"))


if __name__ == "__main__":
    files = generate(ROOT)
    print("\n".join(str(f.relative_to(ROOT)) for f in files))
    sys.exit(0)
