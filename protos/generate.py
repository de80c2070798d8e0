"""Generate the Python stubs from protos/pixart/v1/pixart.proto with grpcio-tools.

Run from anywhere: `python -m protos.generate` writes protos/pixart/v1/pixart_pb2{,_grpc}.py;
`python -m protos.generate --check` exits non-zero when the committed stubs differ from a fresh generation.
The .proto is compiled with the repository root as include path, so the stubs import each other as
`protos.pixart.v1...`, which is how the installed package is laid out.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("protos/pixart/v1/pixart.proto")
GENERATED = ("pixart_pb2.py", "pixart_pb2_grpc.py")

# Lines that carry the generator's version rather than the contract: a drift check must not fail on them.
_VERSION_LINE = re.compile(r"^(# Protobuf Python Version:.*|\s*\d+,\s*$|GRPC_GENERATED_VERSION = .*)$", re.M)


def _include_dirs() -> list[str]:
    import google.rpc.status_pb2  # the googleapis-common-protos wheel ships its .proto files beside the modules
    import grpc_tools

    google_root = Path(google.rpc.status_pb2.__file__).parent.parent.parent
    well_known = resources.files(grpc_tools) / "_proto"
    return [str(ROOT), str(google_root), str(well_known)]


def generate(out_dir: Path) -> list[Path]:
    """Compile the .proto into `out_dir` (which gets the protos/pixart/v1/ layout); return the written files."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", *(f"-I{d}" for d in _include_dirs())]
    args += [f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", str(PROTO)]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    return [out_dir / PROTO.parent / name for name in GENERATED]


def normalized(text: str) -> str:
    """The stub text without generator-version lines."""
    return _VERSION_LINE.sub("", text)


def drift() -> list[str]:
    """Names of committed stub files that differ from a fresh generation (empty when in sync)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            f.name
            for f in fresh
            if not (ROOT / PROTO.parent / f.name).exists()
            or normalized(f.read_text()) != normalized((ROOT / PROTO.parent / f.name).read_text())
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report drift; exit 1 if the stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = drift()
        for name in stale:
            print(f"stale: {PROTO.parent / name} (run python -m protos.generate)", file=sys.stderr)
        return 1 if stale else 0
    generate(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
