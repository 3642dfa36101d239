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

from mizzen.services.translator import authz, security
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
    return security.select(push.security.authorization, "istio-system", "foo", HTTPBIN)


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


# --- selection, wiring and RequestAuthentication ----------------------------------------------------------------
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2  # noqa: E402

from mizzen.services.translator.proxy import Proxy  # noqa: E402
from mizzen.services.translator.snapshot import build_snapshot  # noqa: E402

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"


def _ap(name: str, ns: str, spec: dict, ts: int = 0) -> dict:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": f"2024-01-01T00:00:{ts:02d}Z"},
            "spec": spec}


def _mesh(*extra: dict) -> list[dict]:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "b1", "namespace": "default",
                                                          "labels": {"app": "b", "version": "v1"}},
           "spec": {}, "status": {"podIP": "10.0.0.2"}}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b", "namespace": "default"},
           "spec": {"clusterIP": "10.96.0.5", "selector": {"app": "b"},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                              {"name": "tcp", "port": 90, "targetPort": 9090}]}}
    ep = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "b", "namespace": "default"},
          "subsets": [{"addresses": [{"ip": "10.0.0.2", "targetRef": {"kind": "Pod", "name": "b1",
                                                                      "namespace": "default"}}],
                       "ports": [{"name": "http", "port": 8080}, {"name": "tcp", "port": 9090}]}]}
    jwks = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "keys", "namespace": "auth"},
            "spec": {"clusterIP": "10.96.0.9", "ports": [{"name": "http", "port": 8080}]}}
    return [pod, svc, ep, jwks, *extra]


def _names(push: PushContext, labels: dict, ns: str = "default") -> list[str]:
    return [c.name for c in security.select(push.security.authorization, push.mesh.root_namespace, ns, labels)]


def test_selection_root_namespace_selector_and_target_refs():
    push = PushContext.from_resources(_mesh(
        _ap("mesh-wide", "istio-system", {"action": "DENY", "rules": [{}]}, 1),
        _ap("ns-wide", "default", {}, 2),
        _ap("for-b", "default", {"selector": {"matchLabels": {"app": "b"}}}, 3),
        _ap("for-c", "default", {"selector": {"matchLabels": {"app": "c"}}}, 4),
        _ap("other-ns", "shop", {}, 5),
        _ap("gateway-edge", "default", {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                                        "name": "edge"}]}, 6),
    ))
    assert _names(push, {"app": "b", "version": "v1"}) == ["mesh-wide", "ns-wide", "for-b"]
    assert _names(push, {"app": "c"}) == ["mesh-wide", "ns-wide", "for-c"]
    # targetRefs reach only the Kubernetes Gateway they name (sidecars never); selector policies still apply
    # to gateways (ENABLE_SELECTOR_BASED_K8S_GATEWAY_POLICY, on by default).
    gw = {"app": "edge", "gateway.networking.k8s.io/gateway-name": "edge"}
    assert _names(push, gw) == ["mesh-wide", "ns-wide", "gateway-edge"]
    assert _names(push, {"gateway.networking.k8s.io/gateway-name": "other"}) == ["mesh-wide", "ns-wide"]


def _inbound_filters(push: PushContext) -> tuple[list, list]:
    proxy = Proxy.for_pod(next(o for o in _mesh() if o["kind"] == "Pod"), push)
    return security.inbound_filters(push, proxy)


def test_tcp_chain_drops_http_only_allow_rules_and_widens_deny():
    push = PushContext.from_resources(_mesh(
        _ap("allow-get", "default", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]},
                                               {"from": [{"source": {"principals": ["a/b"]}}]}]}, 1),
        _ap("deny-hdr", "default", {"action": "DENY", "rules": [
            {"from": [{"source": {"ipBlocks": ["10.1.0.0/16"]}}],
             "when": [{"key": "request.headers[x-a]", "values": ["1"]}]}]}, 2)))
    http, tcp = _inbound_filters(push)
    assert [f.name for f in http] == ["envoy.filters.http.rbac"] * 2
    deny, allow = (json_format.MessageToDict(f)["typedConfig"]["rules"] for f in tcp)
    assert deny["action"] == "DENY" and "action" not in allow  # ALLOW is proto's zero value
    assert list(allow["policies"]) == ["ns[default]-policy[allow-get]-rule[1]"]  # rule 0 is HTTP only
    ids = deny["policies"]["ns[default]-policy[deny-hdr]-rule[0]"]["principals"][0]["andIds"]["ids"]
    assert ids == [{"orIds": {"ids": [{"directRemoteIp": {"addressPrefix": "10.1.0.0", "prefixLen": 16}}]}}]


def test_filters_sit_first_on_inbound_chains_and_before_the_router():
    ra = {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
          "metadata": {"name": "jwt", "namespace": "default"},
          "spec": {"jwtRules": [{"issuer": "z-iss", "jwks": '{"keys":[]}', "presence": "REQUIRED"},
                                {"issuer": "a-iss", "jwksUri": "http://keys.auth.svc.cluster.local:8080/jwks",
                                 "fromHeaders": [{"name": "x-jwt", "prefix": "Bearer "}], "fromParams": ["tok"],
                                 "outputPayloadToHeader": "x-payload", "forwardOriginalToken": True,
                                 "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}], "timeout": "2s"},
                                {"issuer": "m-iss", "jwksUri": "https://nowhere.example/jwks"}]}}
    push = PushContext.from_resources(_mesh(_ap("a", "default", {"rules": [{}]}), ra))
    proxy = Proxy.for_pod(_mesh()[0], push)
    lst = build_snapshot(push, proxy).resources(LISTENER)["virtualInbound"]
    d = json_format.MessageToDict(lst)
    for fc in d["filterChains"]:
        filters = fc["filters"]
        if filters[-1]["name"] == "envoy.tcp_proxy":
            assert [f["name"] for f in filters] == ["envoy.filters.network.rbac", "envoy.tcp_proxy"]
        else:
            names = [h["name"] for h in filters[0]["typedConfig"]["httpFilters"]]
            assert names[:2] == ["envoy.filters.http.jwt_authn", "envoy.filters.http.rbac"], names
            assert names[-1] == "envoy.filters.http.router"
    http, _ = security.inbound_filters(push, proxy)
    cfg = jwt_pb2.JwtAuthentication()
    http[0].typed_config.Unpack(cfg)
    p0, p1, p2 = (cfg.providers[f"origins-{i}"] for i in range(3))
    assert (p0.issuer, p1.issuer, p2.issuer) == ("a-iss", "m-iss", "z-iss")  # sorted by issuer, as istiod
    assert p0.remote_jwks.http_uri.cluster == "outbound|8080||keys.auth.svc.cluster.local"
    assert p0.remote_jwks.http_uri.timeout.seconds == 2 and p0.remote_jwks.cache_duration.seconds == 300
    assert (p0.from_headers[0].name, p0.from_headers[0].value_prefix, list(p0.from_params)) == ("x-jwt", "Bearer ",
                                                                                              ["tok"])
    assert p0.forward and p0.forward_payload_header == "x-payload" and p0.payload_in_metadata == "payload"
    assert p0.claim_to_headers[0].header_name == "x-sub"
    assert list(p0.normalize_payload_in_metadata.space_delimited_claims) == ["permission", "scope"]
    assert p1.local_jwks.inline_string == __import__(
        "mizzen.services.translator.authn", fromlist=["UNREACHABLE_JWKS"]).UNREACHABLE_JWKS  # no such service
    assert any("nowhere.example" in e for e in push.errors)
    assert p2.local_jwks.inline_string == '{"keys":[]}'
    req = cfg.rules[0].requires.requires_any.requirements
    # origins-0, origins-1, origins-2, then AND(each provider OR allow_missing; origins-2 is REQUIRED)
    assert [r.provider_name for r in req[:3]] == ["origins-0", "origins-1", "origins-2"]
    inner = req[3].requires_all.requirements
    assert inner[0].requires_any.requirements[1].HasField("allow_missing")
    assert inner[2].provider_name == "origins-2"
    assert cfg.bypass_cors_preflight


def test_no_policies_no_filters_and_shared_layers():
    push = PushContext.from_resources(_mesh())
    assert _inbound_filters(push) == ([], [])
    assert security.layer_key(push, Proxy.for_pod(_mesh()[0], push)) == ()


def test_gateway_chains_get_jwt_and_rbac():
    gw_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ingress-1", "namespace": "default",
                                                             "labels": {"istio": "ingressgateway"}},
              "spec": {}, "status": {"podIP": "10.0.0.50"}}
    gateway = {"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
               "metadata": {"name": "edge", "namespace": "default"},
               "spec": {"selector": {"istio": "ingressgateway"},
                        "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]},
                                    {"port": {"number": 31400, "name": "tcp", "protocol": "TCP"}, "hosts": ["*"]}]}}
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "metadata": {"name": "edge", "namespace": "default"},
          "spec": {"hosts": ["*"], "gateways": ["edge"],
                   "http": [{"route": [{"destination": {"host": "b.default.svc.cluster.local",
                                                        "port": {"number": 80}}}]}],
                   "tcp": [{"route": [{"destination": {"host": "b.default.svc.cluster.local",
                                                       "port": {"number": 90}}}]}]}}
    ra = {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
          "metadata": {"name": "jwt", "namespace": "default"},
          "spec": {"selector": {"matchLabels": {"istio": "ingressgateway"}},
                   "jwtRules": [{"issuer": "iss", "jwks": '{"keys":[]}'}]}}
    ap = _ap("gw", "default", {"selector": {"matchLabels": {"istio": "ingressgateway"}},
                               "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]})
    push = PushContext.from_resources(_mesh(gw_pod, gateway, vs, ra, ap))
    lds = build_snapshot(push, Proxy.for_pod(gw_pod, push, router=True)).resources(LISTENER)
    http = json_format.MessageToDict(lds["0.0.0.0_80"])["filterChains"][0]["filters"][0]["typedConfig"]
    assert [h["name"] for h in http["httpFilters"]][:2] == ["envoy.filters.http.jwt_authn", "envoy.filters.http.rbac"]
    assert http["httpFilters"][0]["typedConfig"]["providers"]["origins-0"]["clearRouteCache"] is True
    tcp = json_format.MessageToDict(lds["0.0.0.0_31400"])["filterChains"][0]["filters"]
    # requestPrincipals cannot be checked on TCP: the ALLOW rule is dropped there, so TCP is denied
    assert [f["name"] for f in tcp] == ["envoy.filters.network.rbac", "envoy.tcp_proxy"]
    assert "policies" not in tcp[0]["typedConfig"]["rules"]


def test_proxy_config_listener_prints_istioctl_rbac_lines():
    from mizzen.services.cli import tables
    from mizzen.services.mesh import configdump

    push = PushContext.from_resources(_mesh(
        _ap("allow-get", "default", {"selector": {"matchLabels": {"app": "b"}},
                                     "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}, 1),
        _ap("deny-ip", "default", {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["1.2.3.4"]}}]}]},
            2)))
    snap = build_snapshot(push, Proxy.for_pod(_mesh()[0], push))
    dump = configdump.snapshot_dump(snap.merged())
    table = tables.listener_table(dump, tables.ListenerFilter(port=15006))
    lines = table.splitlines()
    assert lines[0].split() == ["ADDRESS", "PORT", "MATCH", "DESTINATION"]
    # HTTP port 8080 has both; TCP port 9090 only the DENY (the ALLOW rule is HTTP only); the catch-all chains
    # of virtualInbound (no port) print under the listener's port.
    assert lines[-3:] == [
        "8080 RBAC policies: ns[default]-policy[allow-get]-rule[0], ns[default]-policy[deny-ip]-rule[0]",
        "9090 RBAC policies: ns[default]-policy[deny-ip]-rule[0]",
        "15006 RBAC policies: ns[default]-policy[allow-get]-rule[0], ns[default]-policy[deny-ip]-rule[0]",
    ]
    # without policies the table is istioctl's alone
    plain = build_snapshot(PushContext.from_resources(_mesh()), Proxy.for_pod(_mesh()[0], push))
    assert "RBAC" not in tables.listener_table(configdump.snapshot_dump(plain.merged()))


# --- CUSTOM (ext_authz), against istiod's golden files (custom-*, copied from istio/istio 86c9f01f
# pilot/pkg/security/authz/builder/testdata) with builder_test.go's mesh configs ------------------------------
from mizzen.services.translator import extauthz  # noqa: E402

_EXT = "my-custom-ext-authz.foo.svc.cluster.local"
MESH_GRPC_NO_NS = {"name": "default", "envoyExtAuthzGrpc": {
    "service": _EXT, "port": 9000, "failOpen": True, "statusOnError": "403"}}
MESH_GRPC = {"name": "default", "envoyExtAuthzGrpc": {
    "service": f"foo/{_EXT}", "port": 9000, "timeout": "2ms", "failOpen": True, "statusOnError": "403",
    "includeRequestBodyInCheck": {"maxRequestBytes": 4096, "allowPartialMessage": True}}}
MESH_HTTP = {"name": "default", "envoyExtAuthzHttp": {
    "service": f"foo/{_EXT}", "port": 9000, "timeout": "10s", "failOpen": True, "statusOnError": "403",
    "pathPrefix": "/check", "includeRequestHeadersInCheck": ["x-custom-id", "x-prefix-*", "*-suffix"],
    "includeHeadersInCheck": ["should-not-include-when-IncludeRequestHeadersInCheck-is-set"],
    "includeAdditionalHeadersInCheck": {"x-header-1": "value-1", "x-header-2": "value-2"},
    "includeRequestBodyInCheck": {"maxRequestBytes": 2048, "allowPartialMessage": True, "packAsBytes": True},
    "headersToUpstreamOnAllow": ["Authorization", "x-prefix-*", "*-suffix"],
    "headersToDownstreamOnDeny": ["Set-cookie", "x-prefix-*", "*-suffix"],
    "headersToDownstreamOnAllow": ["Set-cookie", "x-prefix-*", "*-suffix"]}}
# istiod's meshConfigInvalid (port 999999, pathPrefix "check", statusOnError 999): the registry refuses it at
# apply; a provider naming no known service is the same "bad provider" path at push time.
MESH_BAD = {"name": "default", "envoyExtAuthzHttp": {"service": "foo/my-custom-ext-authz", "port": 9000}}
CUSTOM_HTTP_CASES = {
    "custom-grpc-provider-no-namespace": (MESH_GRPC_NO_NS, "custom-simple-http-in.yaml"),
    "custom-grpc-provider": (MESH_GRPC, "custom-simple-http-in.yaml"),
    "custom-http-provider": (MESH_HTTP, "custom-simple-http-in.yaml"),
    "custom-bad-multiple-providers": (MESH_HTTP, "custom-bad-multiple-providers-in.yaml"),
}


def _mesh_configmap(*providers: dict) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio", "namespace": "istio-system"},
            "data": {"mesh": yaml.safe_dump({"extensionProviders": list(providers)})}}


def _custom_push(path: Path, provider: dict) -> tuple[PushContext, list]:
    objs = [o for o in yaml.safe_load_all(path.read_text()) if o]
    for i, o in enumerate(objs):
        o["metadata"]["creationTimestamp"] = f"2020-01-01T00:00:{i:02d}Z"
    ext_svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "my-custom-ext-authz", "namespace": "foo"},
               "spec": {"ports": [{"name": "grpc", "port": 9000}]}}
    push = PushContext.from_resources([*objs, ext_svc, _mesh_configmap(provider)])
    return push, security.select(push.security.authorization, "istio-system", "foo", HTTPBIN)


@pytest.mark.parametrize("name", sorted(CUSTOM_HTTP_CASES))
def test_custom_http_filters_match_istiod(name: str):
    provider, inp = CUSTOM_HTTP_CASES[name]
    push, pols = _custom_push(DATA / "http" / inp, provider)
    got = [json_format.MessageToDict(f) for f in extauthz.http_filters(push, pols)]
    want = [_golden(DATA / "http" / f"{name}-out{i}.yaml", hcm_pb.HttpFilter) for i in (1, 2)]
    assert got == want
    assert bool(push.errors) == (name == "custom-bad-multiple-providers")
    if push.errors:
        assert all("requires PILOT_ENABLE_MULTIPLE_CUSTOM_AUTHZ_PROVIDERS, found ['" in e for e in push.errors)


def test_custom_bad_provider_denies_and_is_reported():
    push, pols = _custom_push(DATA / "http" / "custom-simple-http-in.yaml", MESH_BAD)
    got = [json_format.MessageToDict(f) for f in extauthz.http_filters(push, pols)]
    assert got == [_golden(DATA / "http" / "custom-bad-out.yaml", hcm_pb.HttpFilter)]
    assert any("could not find service foo/my-custom-ext-authz" in e and "httpbin-1" in e for e in push.errors)
    push, pols = _custom_push(DATA / "http" / "custom-simple-http-in.yaml", {**MESH_HTTP, "name": "other"})
    assert [json_format.MessageToDict(f) for f in extauthz.http_filters(push, pols)] == got
    assert any("available providers are ['other'] but found 'default'" in e for e in push.errors)


def test_custom_tcp_filters_match_istiod():
    push, pols = _custom_push(DATA / "tcp" / "custom-both-http-tcp-in.yaml", MESH_GRPC)
    got = [json_format.MessageToDict(f) for f in extauthz.tcp_filters(push, pols)]
    assert got == [_golden(DATA / "tcp" / f"custom-both-http-tcp-out{i}.yaml", lc.Filter) for i in (1, 2)]
    push, pols = _custom_push(DATA / "tcp" / "custom-only-http-in.yaml", MESH_HTTP)
    assert extauthz.tcp_filters(push, pols) == []  # HTTP providers do not apply to TCP chains
    assert push.errors == []


def test_custom_filters_come_first_and_mesh_defaults_without_configmap():
    push, pols = _custom_push(DATA / "http" / "deny-and-allow-in.yaml", MESH_HTTP)
    assert extauthz.http_filters(push, pols) == []  # no CUSTOM policy, no ext_authz
    push, pols = _custom_push(DATA / "http" / "custom-simple-http-in.yaml", MESH_HTTP)
    assert push.mesh.extension_providers["default"]["type"] == "http"
    assert PushContext.from_resources([]).mesh.extension_providers == {}
