"""The checked-in Python modules of proto/ (services/mesh/proto_gen, made by services/mesh/protogen.py) match
their .proto files: every .proto has a module, and each module's descriptor is what protoc makes of the file."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from mizzen.services.mesh import protogen

REPO = Path(__file__).resolve().parents[1]


def test_every_proto_has_a_current_module():
    assert protogen.proto_files(), "no .proto files found under proto/"
    r = subprocess.run([sys.executable, "-m", "mizzen.services.mesh.protogen", "--check"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for proto in protogen.proto_files():
        assert __import__(protogen.module_name(proto), fromlist=["DESCRIPTOR"]).DESCRIPTOR.name == \
            str(proto.relative_to(protogen.PROTO_DIR))


def test_an_edited_proto_is_reported_stale(tmp_path, monkeypatch):
    copy = tmp_path / "proto"
    shutil.copytree(protogen.PROTO_DIR, copy)
    target = copy / "mizzen/v1/snapshot.proto"
    target.write_text(target.read_text().replace("bool names_only = 4;", "bool names_only = 4;\n  string extra = 9;"))
    (copy / "mizzen/v1/new.proto").write_text('syntax = "proto3";\npackage mizzen.v1;\nmessage New {}\n')
    monkeypatch.setattr(protogen, "PROTO_DIR", copy)
    problems = protogen.mismatches()
    assert any("snapshot.proto" in p and "stale" in p for p in problems), problems
    assert any("new.proto" in p and "no generated module" in p for p in problems), problems
    assert not any("events.proto" in p for p in problems), problems


def test_generated_code_imports_only_the_installed_package_path(tmp_path):
    """Regenerating into a scratch dir gives importable modules whose cross-imports use mizzen.services..."""
    written = protogen.generate(tmp_path)
    for path in written:
        for line in path.read_text().splitlines():
            if re.match(r"from \S+ import \w+_pb2\b", line):
                assert line.startswith(("from google.protobuf", f"from {protogen.PACKAGE}")), line
