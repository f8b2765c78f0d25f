"""Regenerate the Python stubs beside the .proto files.

Run from anywhere: ``python protos/generate.py``. Writes ``*_pb2.py``,
``*_pb2.pyi`` and ``*_pb2_grpc.py`` next to each ``protos/imago/v1/*.proto``.
``python protos/generate.py --check`` exits non-zero when the committed stubs
differ from what the .proto files produce.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = PROTO_ROOT / "imago" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Compile every .proto under imago/v1 into ``out_dir`` (mirroring paths)."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PACKAGE_DIR.glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(root: Path) -> set[str]:
    package = root / "imago" / "v1"
    return {p.name for p in package.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}


def drift() -> list[str]:
    """Names of stubs that are missing, extra or different from a fresh build."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want = generated_files(fresh)
        have = generated_files(PROTO_ROOT)
        changed = [
            name
            for name in sorted(want & have)
            if not filecmp.cmp(fresh / "imago/v1" / name, PACKAGE_DIR / name, shallow=False)
        ]
        return sorted(want ^ have) + changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report drift")
    if parser.parse_args().check:
        stale = drift()
        if stale:
            print("stubs out of date:", ", ".join(stale))
            sys.exit(1)
        print("stubs up to date")
        return
    generate(PROTO_ROOT)


if __name__ == "__main__":
    main()
