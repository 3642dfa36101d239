"""check_documents over real multi-document YAML files: where errors are reported, all-or-nothing results,
namespace defaulting, normalisation and duplicate detection."""

from __future__ import annotations

import copy

import orjson
import yaml

from mizzen.services.mesh.errors import ApplyError
from mizzen.services.mesh.validation import check_documents
from mizzen.services.mesh.yamlio import Document, load_paths, load_text

VS = """
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: webserver
spec:
  hosts: [webserver]
  http:
  - route:
    - destination: {host: webserver, subset: v1}
"""
BAD_DR = """
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: webserver
  namespace: prod
spec:
  host: webserver
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v1
    labels: {version: v2}
"""
SVC = """
apiVersion: v1
kind: Service
metadata:
  name: webserver
spec:
  ports:
  - {name: http-web, port: 80, targetPort: 3030}
  selector: {app: webserver}
"""
NS = """
apiVersion: v1
kind: Namespace
metadata:
  name: prod
  namespace: ignored
"""


def _write(tmp_path, name: str, *docs: str):
    path = tmp_path / name
    path.write_text("---".join(docs))
    return path


def test_one_bad_document_rejects_the_whole_file_and_names_it(tmp_path):
    path = _write(tmp_path, "mesh.yaml", VS, BAD_DR, SVC)
    objects, errors = check_documents(load_paths([str(path)]))
    assert objects == []
    assert len(errors) == 1
    err = errors[0]
    assert (err.source, err.index, err.kind, err.namespace, err.name) == (str(path), 1, "DestinationRule", "prod", "webserver")
    assert [(e.path, e.message) for e in err.errors] == [("spec.subsets[1].name", "duplicate subset names: v1")]
    assert str(err) == f"{path}, document 1: DestinationRule prod/webserver: spec.subsets[1].name: duplicate subset names: v1"
    body = ApplyError(errors).to_json()
    assert body["details"][0]["errors"] == [{"field": "spec.subsets[1].name", "message": "duplicate subset names: v1"}]


def test_every_bad_document_of_every_file_is_reported(tmp_path):
    bad_vs = VS.replace("subset: v1", "subset: v_1").replace("name: webserver", "name: other")
    a = _write(tmp_path, "a.yaml", VS, bad_vs)
    b = _write(tmp_path, "b.yaml", SVC, BAD_DR, "\nkind: Mystery\napiVersion: v1\nmetadata: {name: x}\n")
    objects, errors = check_documents(load_paths([str(a), str(b)]))
    assert objects == []
    assert [(e.source, e.index, e.kind) for e in errors] == [
        (str(a), 1, "VirtualService"), (str(b), 1, "DestinationRule"), (str(b), 2, "Mystery")]
    assert errors[0].errors[0].path == "spec.http[0].route[0].destination.subset"
    assert errors[2].errors[0].message == "unknown kind 'Mystery'"


def test_valid_apply_returns_normalised_copies_in_order(tmp_path):
    path = _write(tmp_path, "ok.yaml", VS, SVC, NS)
    docs = load_paths([str(path)])
    before = copy.deepcopy([d.obj for d in docs])
    objects, errors = check_documents(docs, default_namespace="team-a")
    assert errors == []
    assert [(o["kind"], o["metadata"].get("namespace")) for o in objects] == [
        ("VirtualService", "team-a"), ("Service", "team-a"), ("Namespace", None)]
    assert [d.obj for d in docs] == before, "the caller's documents must not be modified"
    # the raw shape is kept: the translator reads these dicts directly
    assert objects[0]["spec"]["http"][0]["route"][0]["destination"] == {"host": "webserver", "subset": "v1"}


def test_nulls_are_dropped_and_map_keys_become_strings():
    text = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: finance
  labels:
spec:
  selector:
    matchLabels: {app: finance}
  mtls:
  portLevelMtls:
    8080: {mode: DISABLE}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: nulls}
spec:
  hosts: [reviews]
  gateways:
  http:
  - route:
    - destination: {host: reviews}
      weight:
"""
    objects, errors = check_documents(load_text(text, "nulls.yaml"))
    assert errors == []
    pa, vs = objects
    assert pa["spec"] == {"selector": {"matchLabels": {"app": "finance"}}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}
    assert "labels" not in pa["metadata"]
    assert vs["spec"]["http"][0]["route"][0] == {"destination": {"host": "reviews"}}
    assert "gateways" not in vs["spec"]
    orjson.dumps(objects)  # storable as JSON: no None where a list is expected, no integer keys


def test_a_null_route_means_no_route():
    text = VS.replace("  - route:\n    - destination: {host: webserver, subset: v1}\n", "  - route:\n")
    objects, errors = check_documents(load_text(text, "x.yaml"))
    assert objects == []
    assert [(e.path, e.message) for e in errors[0].errors] == [
        ("spec.http[0]", "HTTP route, redirect or direct_response is required")]


def test_duplicates_within_one_apply_are_rejected(tmp_path):
    a = _write(tmp_path, "a.yaml", SVC)
    b = _write(tmp_path, "b.yaml", SVC.replace("port: 80", "port: 81"))
    objects, errors = check_documents(load_paths([str(a), str(b)]))
    assert objects == []
    assert len(errors) == 1 and errors[0].source == str(b)
    assert errors[0].errors[0].path == "metadata.name"
    assert errors[0].errors[0].message == f"duplicate of {a}, document 0 in the same apply"


def test_same_name_in_other_namespace_or_kind_is_not_a_duplicate():
    other_ns = SVC.replace("name: webserver", "name: webserver\n  namespace: prod")
    objects, errors = check_documents(load_text("---".join([SVC, other_ns, VS]), "x.yaml"))
    assert errors == []
    assert len(objects) == 3


def test_yaml_errors_pass_through_and_block_the_apply():
    docs = load_text(SVC, "good.yaml") + load_text("kind: Service\nmetadata: [unclosed\n", "broken.yaml")
    objects, errors = check_documents(docs)
    assert objects == []
    assert len(errors) == 1 and errors[0].source == "broken.yaml"
    assert "invalid YAML" in errors[0].errors[0].message


def test_kind_and_api_version_are_checked():
    text = """
apiVersion: security.istio.io/v1alpha3
kind: PeerAuthentication
metadata: {name: a}
---
metadata: {name: b}
---
- just
- a list
"""
    objects, errors = check_documents(load_text(text, "x.yaml"))
    assert objects == []
    assert [(e.index, e.errors[0].path, e.errors[0].message) for e in errors] == [
        (0, "apiVersion", "apiVersion 'security.istio.io/v1alpha3' is not served for PeerAuthentication "
                          "(use security.istio.io/v1beta1, security.istio.io/v1)"),
        (1, "kind", "kind is required"),
        (2, "", "document is not a mapping"),
    ]


def test_list_documents_are_expanded_with_their_own_indexes():
    text = f"""
apiVersion: v1
kind: List
items:
- {{apiVersion: v1, kind: Service, metadata: {{name: a}}, spec: {{ports: [{{port: 80}}]}}}}
- {{apiVersion: v1, kind: Service, metadata: {{name: b}}, spec: {{ports: [{{port: 0}}]}}}}
---
{NS}
"""
    objects, errors = check_documents(load_text(text, "list.yaml"))
    assert objects == []
    assert [(e.index, e.name, e.errors[0].path) for e in errors] == [(1, "b", "spec.ports[0].port")]


def test_every_served_networking_version_is_validated_alike():
    for version in ("v1alpha3", "v1beta1", "v1"):
        bad = VS.replace("v1alpha3", version).replace("subset: v1", "subset: V.1")
        objects, errors = check_documents([Document("x.yaml", 0, yaml.safe_load(bad))])
        assert objects == []
        assert errors[0].errors[0].message == "subset name is invalid: V.1"
