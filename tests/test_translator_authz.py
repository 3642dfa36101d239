"""AuthorizationPolicy → RBAC filters, checked against istiod's own golden files
(istio/istio pilot/pkg/security/authz/builder/testdata/{http,tcp}/*-in.yaml → *-out.yaml, the non-extended
variants: principals via `authenticated`, as a sidecar gets them), plus the selection rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb
from google.protobuf import json_format

from mizzen.services.translator import authz
from mizzen.services.translator.push_context import PushContext

DATA = Path(__file__).parent / "translator_data" / "authz"
HTTPBIN = {"app": "httpbin", "version": "v1"}

HTTP_CASES = {
    "allow-empty-rule": ["allow-empty-rule-out.yaml"],
    "allow-full-rule": ["allow-full-rule-out.yaml"],
    "allow-nil-rule": ["allow-nil-rule-out.yaml"],
    "allow-path": ["allow-path-out.yaml"],
    "audit-full-rule": ["audit-full-rule-out.yaml"],
    "deny-and-allow": ["deny-and-allow-out1.yaml", "deny-and-allow-out2.yaml"],
    "deny-empty-rule": ["deny-empty-rule-out.yaml"],
    "dry-run-allow-and-deny": ["dry-run-allow-and-deny-out1.yaml", "dry-run-allow-and-deny-out2.yaml"],
    "dry-run-allow": ["dry-run-allow-out.yaml"],
    "dry-run-mix": ["dry-run-mix-out.yaml"],
    "multiple-policies": ["multiple-policies-out.yaml"],
    "single-policy": ["single-policy-out.yaml"],
    "trust-domains": ["trust-domains-out.yaml"],
}
TCP_CASES = {
    "allow-both-http-tcp": ["allow-both-http-tcp-out.yaml"],
    "allow-only-http": ["allow-only-http-out.yaml"],
    "audit-both-http-tcp": ["audit-both-http-tcp-out.yaml"],
    "deny-both-http-tcp": ["deny-both-http-tcp-out.yaml"],
    "dry-run-mix": ["dry-run-mix-out.yaml"],
}


def _policies(path: Path) -> list:
    objs = [o for o in yaml.safe_load_all(path.read_text()) if o]
    for i, o in enumerate(objs):  # creation order = file order, as Istio's test store keeps them
        o["metadata"]["creationTimestamp"] = f"2020-01-01T00:00:{i:02d}Z"
    push = PushContext.from_resources(objs)
    assert push.errors == []
    return authz.select(push.security.authorization, "istio-system", "foo", HTTPBIN)


def _golden(path: Path, cls) -> dict:
    msg = cls()
    json_format.ParseDict(yaml.safe_load(path.read_text()), msg)
    return json_format.MessageToDict(msg)


@pytest.mark.parametrize("name", sorted(HTTP_CASES))
def test_http_filters_match_istiod(name: str):
    got = [json_format.MessageToDict(f) for f in authz.http_rbac_filters(_policies(DATA / "http" / f"{name}-in.yaml"))]
    want = [_golden(DATA / "http" / w, hcm_pb.HttpFilter) for w in HTTP_CASES[name]]
    assert got == want


@pytest.mark.parametrize("name", sorted(TCP_CASES))
def test_tcp_filters_match_istiod(name: str):
    got = [json_format.MessageToDict(f) for f in authz.tcp_rbac_filters(_policies(DATA / "tcp" / f"{name}-in.yaml"))]
    want = [_golden(DATA / "tcp" / w, lc.Filter) for w in TCP_CASES[name]]
    assert got == want
