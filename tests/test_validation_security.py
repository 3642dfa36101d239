"""AuthorizationPolicy / RequestAuthentication: what is accepted with a warning (Istio's validation warnings),
and that a bad document in an apply stores nothing."""

from __future__ import annotations

from mizzen.services.mesh.validation import check_documents
from mizzen.services.mesh.yamlio import Document


def _ap(name: str, spec: dict) -> Document:
    return Document("policies.yaml", 0, {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                                         "metadata": {"name": name, "namespace": "shop"}, "spec": spec})


def _warnings(doc: Document) -> list[tuple[str, str]]:
    warnings: list = []
    objects, errors = check_documents([doc], warnings=warnings)
    assert errors == [] and len(objects) == 1
    return [(e.path, e.message) for w in warnings for e in w.errors]


def test_deny_with_only_http_attributes_warns_like_istio():
    got = _warnings(_ap("deny-get", {"action": "DENY", "rules": [
        {"to": [{"operation": {"methods": ["GET"]}}]},
        {"to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}]},
        {"from": [{"source": {"requestPrincipals": ["*"]}}]},
        {"from": [{"source": {"namespaces": ["a"]}}]}]}))
    msg = ("configured AuthorizationPolicy will deny all traffic to TCP ports under its scope due to the use of "
           "only HTTP attributes in a DENY rule; it is recommended to explicitly specify the port")
    assert got == [("spec.rules[0]", msg), ("spec.rules[2]", msg)]


def test_selector_without_labels_warns_and_custom_provider_is_translated():
    got = _warnings(_ap("ext", {"selector": {}, "action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{}]}))
    assert ("spec.selector", "workload selector specified without labels") in got
    assert not [w for w in got if w[0] == "spec.provider"]  # CUSTOM is translated (translator/extauthz.py)


def test_allow_policy_has_no_warnings():
    assert _warnings(_ap("ok", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})) == []


def test_one_bad_document_rejects_the_whole_apply():
    good = _ap("good", {"rules": [{}]})
    bad = Document("policies.yaml", 1, {**_ap("bad", {"rules": [{"from": []}]}).obj})
    objects, errors = check_documents([good, bad])
    assert objects == []
    assert [(e.source, e.index, e.kind, e.namespace, e.name) for e in errors] == [
        ("policies.yaml", 1, "AuthorizationPolicy", "shop", "bad")]
    assert [(f.path, f.message) for f in errors[0].errors] == [
        ("spec.rules[0].from", "`from` must not be empty, found at rule 0")]
