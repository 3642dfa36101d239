"""Reading YAML the way kubectl does: multi-document files, directories, Lists, and clear errors."""

from __future__ import annotations

from mizzen.services.mesh.errors import DocumentError
from mizzen.services.mesh.yamlio import Document, load_paths, load_text


def test_duplicate_keys_are_refused_with_their_line():
    (err,) = load_text("kind: Service\nmetadata: {name: a}\nkind: Pod\n", "dup.yaml")
    assert isinstance(err, DocumentError)
    assert "line 3, column 1" in str(err) and "duplicate key 'kind'" in str(err)


def test_documents_keep_source_and_index_and_lists_are_expanded(tmp_path):
    (tmp_path / "b.yaml").write_text("kind: A\n---\n---\nkind: B\n")
    (tmp_path / "a.yml").write_text("kind: List\nitems: [{kind: C}, {kind: D}]\n")
    (tmp_path / "notes.txt").write_text("ignored")
    docs = load_paths([str(tmp_path)])
    assert [(d.source.rsplit("/", 1)[1], d.index, d.obj["kind"]) for d in docs if isinstance(d, Document)] == [
        ("a.yml", 0, "C"), ("a.yml", 1, "D"), ("b.yaml", 0, "A"), ("b.yaml", 1, "B")]


def test_non_mapping_document_and_unreadable_file(tmp_path):
    (err,) = load_text("- just\n- a list\n", "l.yaml")
    assert isinstance(err, DocumentError) and "not a mapping" in str(err)
    (missing,) = load_paths([str(tmp_path / "nope.yaml")])
    assert isinstance(missing, DocumentError) and "cannot read" in str(missing)
