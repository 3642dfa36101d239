"""Regenerate the checked-in Python modules for certauth's protos (run from the repository root):

    python3 proto/generate.py

Only the message modules (`*_pb2.py`) are generated; the services are wired with grpc's generic handlers in
services/certauth, so no `istio`/`mizzen` top-level import paths are needed. tests/test_certauth_proto.py
regenerates into a temporary directory and fails when the checked-in files differ.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "services/certauth/proto_gen"
# proto file (relative to proto/) → checked-in module name
MODULES = {"istio/v1/auth/ca.proto": "ca_pb2.py", "mizzen/v1/trust.proto": "trust_pb2.py"}


def generate(out_dir: Path) -> dict[str, bytes]:
    """Compile every proto into `out_dir`; returns module name → generated source bytes."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    result: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for proto, module in MODULES.items():
            rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={tmp}",
                              str(ROOT / "proto" / proto)])
            if rc != 0:
                raise SystemExit(f"protoc failed on proto/{proto}")
            generated = Path(tmp) / proto.replace(".proto", "_pb2.py")
            result[module] = generated.read_bytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    for module, data in result.items():
        (out_dir / module).write_bytes(data)
    return result


if __name__ == "__main__":
    generate(OUT)
    print(f"wrote {', '.join(MODULES.values())} to {OUT.relative_to(ROOT)}", file=sys.stderr)
