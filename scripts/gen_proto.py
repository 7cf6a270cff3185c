"""Regenerate joblet_persist/_proto from proto/*.proto.

Usage: python scripts/gen_proto.py [--check]

With --check, generate into a temporary directory and exit 1 if the result
differs from the committed files (used by CI).
"""

import filecmp
import pathlib
import re
import shutil
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "joblet_persist" / "_proto"
INIT = '"""Generated protobuf and gRPC code; regenerate with scripts/gen_proto.py."""\n'


def generate(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.name) for p in PROTO_DIR.glob("*.proto"))
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    # grpc_tools emits absolute imports ("import persist_pb2"); make them
    # package-relative so the code imports as joblet_persist._proto.*.
    for path in sorted(out.glob("*_pb2*.py*")):
        text = path.read_text()
        text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
        path.write_text(text)
    (out / "__init__.py").write_text(INIT)


def main(argv: list[str]) -> int:
    if "--check" in argv:
        with tempfile.TemporaryDirectory() as tmp:
            tmpdir = pathlib.Path(tmp) / "_proto"
            generate(tmpdir)
            names = sorted(p.name for p in tmpdir.iterdir() if p.is_file())
            committed = sorted(
                p.name for p in OUT_DIR.iterdir() if p.is_file() and p.suffix in (".py", ".pyi")
            )
            if names != committed:
                print(f"generated files differ: expected {names}, found {committed}")
                return 1
            _, mismatch, errors = filecmp.cmpfiles(tmpdir, OUT_DIR, names, shallow=False)
            if mismatch or errors:
                print(
                    "joblet_persist/_proto is out of date with proto/: "
                    f"{mismatch + errors}; run python scripts/gen_proto.py"
                )
                return 1
            print("joblet_persist/_proto matches proto/")
            return 0
    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    generate(OUT_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
