"""Generates the gRPC stubs of mediacache_client from proto/, or checks the committed ones.

    python generate.py          # rewrite src/mediacache_client/_proto
    python generate.py --check  # exit 1 when the committed stubs differ from fresh ones

Needs grpcio-tools 1.71 exactly (`pip install grpcio-tools==1.71.0`): its output is what is
committed, and other versions write other version checks into the stubs.
"""

import filecmp
import pathlib
import sys
import tempfile

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTO = PROTO_ROOT / "mediacache" / "v1" / "mediacache.proto"
TARGET = HERE / "src" / "mediacache_client" / "_proto"
FILES = ["__init__.py", "mediacache_pb2.py", "mediacache_pb2.pyi", "mediacache_pb2_grpc.py"]


def generate(into: pathlib.Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"--python_out={scratch}",
                f"--pyi_out={scratch}",
                f"--grpc_python_out={scratch}",
                str(PROTO),
            ]
        )
        if status != 0:
            sys.exit(f"protoc failed with status {status}")
        out = pathlib.Path(scratch) / "mediacache" / "v1"
        into.mkdir(parents=True, exist_ok=True)
        (into / "__init__.py").write_text('"""Generated from proto/mediacache/v1/mediacache.proto by generate.py."""\n')
        for name in FILES[1:]:
            text = (out / name).read_text()
            # The stubs live inside the package, not at the top level the proto's path implies.
            text = text.replace("from mediacache.v1 import mediacache_pb2", "from . import mediacache_pb2")
            (into / name).write_text(text)


def main() -> None:
    if "--check" not in sys.argv[1:]:
        generate(TARGET)
        return
    with tempfile.TemporaryDirectory() as fresh:
        generate(pathlib.Path(fresh))
        _, mismatch, errors = filecmp.cmpfiles(fresh, TARGET, FILES, shallow=False)
        if mismatch or errors:
            sys.exit(
                f"stale stubs in {TARGET.relative_to(HERE)}: {mismatch + errors} differ from the proto; "
                "run `python generate.py` (with grpcio-tools==1.71.0)"
            )


if __name__ == "__main__":
    main()
