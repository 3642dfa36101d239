"""Table tests: every document in tests/validation_data/valid is accepted, every one in .../invalid is rejected
with the exact field path and (a substring of) the message its `_expect` names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mizzen.services.mesh.kinds import KINDS
from mizzen.services.mesh.validation import check_documents
from mizzen.services.mesh.yamlio import Document, load_paths
from tests.conftest import SEED_MESH

DATA = Path(__file__).parent / "validation_data"


def _valid_documents() -> list[Document]:
    docs = load_paths([str(p) for p in sorted((DATA / "valid").glob("*.yaml"))])
    assert all(isinstance(d, Document) for d in docs), "valid data must parse as YAML"
    return docs


def _invalid_cases() -> list[tuple[Document, dict]]:
    cases = []
    for path in sorted((DATA / "invalid").glob("*.yaml")):
        for i, obj in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d is not None):
            expect = obj.pop("_expect")
            cases.append((Document(path.name, i, obj), expect))
    return cases


VALID = _valid_documents()
INVALID = _invalid_cases()


def _doc_id(d: Document) -> str:
    name = (d.obj.get("metadata") or {}).get("name", "?")
    return f"{Path(d.source).name}:{d.index}:{d.obj.get('kind')}:{name}"


@pytest.mark.parametrize("doc", VALID, ids=_doc_id)
def test_valid_document_is_accepted(doc: Document):
    objects, errors = check_documents([doc])
    assert errors == [], "\n".join(str(e) for e in errors)
    assert len(objects) == 1
    assert objects[0]["kind"] == doc.obj["kind"]


def test_valid_table_covers_every_kind_and_api_version():
    seen = {(d.obj["kind"], d.obj["apiVersion"]) for d in VALID}
    for kind in KINDS:
        for version in kind.versions:
            assert (kind.kind, kind.api_version(version)) in seen, f"no valid {kind.kind} at {version}"


def test_valid_table_holds_the_seed_example_resources():
    seed = {(d.obj["kind"], d.obj["metadata"]["name"]) for d in VALID if Path(d.source).name == "seed.yaml"}
    assert {("Service", "proxy"), ("DestinationRule", "webserver"), ("VirtualService", "webserver"),
            ("ServiceEntry", "github"), ("DestinationRule", "github")} <= seed


@pytest.mark.parametrize(("doc", "expect"), INVALID, ids=[_doc_id(d) for d, _ in INVALID])
def test_invalid_document_is_rejected_with_path_and_message(doc: Document, expect: dict):
    objects, errors = check_documents([doc])
    assert objects == []
    assert len(errors) == 1
    err = errors[0]
    assert (err.source, err.index) == (doc.source, doc.index)
    found = [(e.path, e.message) for e in err.errors]
    assert any(path == expect["path"] and expect["message"] in msg for path, msg in found), (
        f"expected {expect['path']}: …{expect['message']}…\n got: {found}")


def test_invalid_table_is_large_and_spans_kinds():
    assert len(INVALID) >= 60
    kinds = {d.obj.get("kind") for d, _ in INVALID}
    assert {k.kind for k in KINDS} <= kinds


def test_seed_mesh_fixture_validates():
    """The shared fixture of the seed mesh (written for the translator tests) must be valid input too."""
    if not SEED_MESH.is_dir():
        pytest.skip("tests/fixtures/seed-mesh not present yet")
    docs = load_paths([str(SEED_MESH)])
    objects, errors = check_documents(docs)
    assert errors == [], "\n".join(str(e) for e in errors)
    assert objects
