"""Generate the Python gRPC modules from every ``.proto`` under this folder.

Run by ``setup.py`` at build time and by ``make proto``; the output lands next to the
package path the proto file declares (``edgeplane_proto/...``) and is not committed.
"""

from __future__ import annotations

import pathlib
import sys

PROTO_ROOT = pathlib.Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent


def generate(out: pathlib.Path = REPO_ROOT) -> None:
    from grpc_tools import protoc

    include = pathlib.Path(protoc.__file__).parent / "_proto"
    for proto in sorted(PROTO_ROOT.rglob("*.proto")):
        rel = proto.relative_to(PROTO_ROOT)
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                str(rel),
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on {rel} (exit {code})")


if __name__ == "__main__":
    generate()
    sys.exit(0)
