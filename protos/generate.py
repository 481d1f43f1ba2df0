"""Regenerate the Python stubs in ``onnxprune/_proto/`` from ``protos/onnxprune/v1/compressor.proto``.

Run ``python protos/generate.py`` after editing the proto and commit the result; ``tests/test_service_proto.py``
regenerates into a temporary directory and fails when the committed stubs are stale.

protoc names Python modules after the proto's path (``onnxprune.v1.compressor_pb2``), which would collide with
the real ``onnxprune`` package, so the stubs are flattened into ``onnxprune._proto`` and the one cross-import
in the gRPC stub is rewritten to match.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
PROTO = "onnxprune/v1/compressor.proto"
STUB_DIR = REPO_ROOT / "onnxprune" / "_proto"
STUBS = ("compressor_pb2.py", "compressor_pb2.pyi", "compressor_pb2_grpc.py")
_ORIGINAL_IMPORT = "from onnxprune.v1 import compressor_pb2 as"
_FLAT_IMPORT = "from onnxprune._proto import compressor_pb2 as"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on the service proto and write the flattened stubs into ``out_dir``.

    Raises:
        RuntimeError: when protoc fails (its message is on stderr).
    """
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(PROTO_ROOT / PROTO),
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
        written = []
        for name in STUBS:
            text = (Path(tmp) / "onnxprune" / "v1" / name).read_text()
            text = text.replace(_ORIGINAL_IMPORT, _FLAT_IMPORT)
            target = out_dir / name
            target.write_text(text)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=STUB_DIR, help="where to write the stubs")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
