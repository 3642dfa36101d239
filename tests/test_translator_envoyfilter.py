"""EnvoyFilter patches on translated snapshots (pure): each applyTo × operation, context, selectors, priority.
Traffic through a real Envoy is in tests/test_envoyfilter_e2e.py."""

from __future__ import annotations

import copy

import pytest
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb

from mizzen.services.mesh.validation import check_documents
from mizzen.services.mesh.yamlio import Document
from mizzen.services.translator.proxy import Proxy
from mizzen.services.translator.snapshot import build_snapshot
from tests.translator_helpers import CLUSTER, LISTENER, ROUTE, SEED_MESH, SEED_PROXY, load, push_of

V2 = "sidecar~10.200.0.148~webserverv2-7d8b4c5f9d-m6lqt.default~default.svc.cluster.local"
GATEWAY = "router~10.200.0.140~istio-ingressgateway-5b9d8f8b9f-abcde.istio-system~istio-system.svc.cluster.local"
LUA = {"name": "envoy.lua", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
    "inline_code": "function envoy_on_response(h) h:headers():add('x-lua', 'yes') end"}}
ROUTER_MATCH = {"filterChain": {"filter": {"name": "envoy.filters.network.http_connection_manager",
                                           "subFilter": {"name": "envoy.filters.http.router"}}}}
SEED = load(SEED_MESH)


def envoy_filter(name: str, patches: list[dict], namespace: str = "default", **spec) -> dict:
    return {"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
            "metadata": {"name": name, "namespace": namespace,
                         "creationTimestamp": f"2026-01-01T00:00:{len(name):02d}Z"},
            "spec": {"configPatches": patches, **spec}}


def snap(filters: list[dict], node: str = SEED_PROXY) -> dict:
    push = push_of(SEED + filters)
    assert not push.errors, push.errors
    return build_snapshot(push, Proxy.from_node_id(node, push)).merged()


def http_filters(listener, chain: int | None = None) -> list[list[str]]:
    out = []
    for i, fc in enumerate(listener.filter_chains):
        if chain is not None and i != chain:
            continue
        for f in fc.filters:
            if f.name.endswith("http_connection_manager"):
                h = hcm_pb.HttpConnectionManager()
                f.typed_config.Unpack(h)
                out.append([hf.name for hf in h.http_filters])
    return out


def test_no_filters_no_change_and_shared_layers():
    push = push_of(SEED)
    assert len(build_snapshot(push, Proxy.from_node_id(SEED_PROXY, push)).layers) == 3


def test_http_filter_insert_before_router_only_in_the_context_it_names():
    ef = envoy_filter("lua", [{"applyTo": "HTTP_FILTER",
                               "match": {"context": "SIDECAR_INBOUND", "listener": ROUTER_MATCH},
                               "patch": {"operation": "INSERT_BEFORE", "value": LUA}}])
    s = snap([ef])
    inbound = http_filters(s[LISTENER]["virtualInbound"])
    assert inbound and all(f[-2:] == ["envoy.lua", "envoy.filters.http.router"] for f in inbound)
    assert all("envoy.lua" not in f for f in http_filters(s[LISTENER]["0.0.0.0_80"]))  # outbound untouched
    before = snap([])
    assert http_filters(before[LISTENER]["virtualInbound"])[0][-1] == "envoy.filters.http.router"


@pytest.mark.parametrize("op, expect", [
    ("ADD", ["envoy.filters.http.cors", "envoy.filters.http.fault", "envoy.filters.http.router", "envoy.lua"]),
    ("INSERT_FIRST", ["envoy.lua", "envoy.filters.http.cors", "envoy.filters.http.fault", "envoy.filters.http.router"]),
    ("INSERT_AFTER", ["envoy.filters.http.cors", "envoy.lua", "envoy.filters.http.fault", "envoy.filters.http.router"]),
    ("REPLACE", ["envoy.lua", "envoy.filters.http.fault", "envoy.filters.http.router"]),
    ("REMOVE", ["envoy.filters.http.fault", "envoy.filters.http.router"]),
])
def test_http_filter_operations(op, expect):
    match = {"context": "SIDECAR_OUTBOUND", "listener": {"portNumber": 80, "filterChain": {"filter": {
        "name": "envoy.http_connection_manager", "subFilter": {"name": "envoy.filters.http.cors"}}}}}
    patch = {"operation": op, **({"value": LUA} if op != "REMOVE" else {})}
    s = snap([envoy_filter("op", [{"applyTo": "HTTP_FILTER", "match": match, "patch": patch}])])
    assert http_filters(s[LISTENER]["0.0.0.0_80"]) == [expect]
    # another port's listener is not touched
    assert "envoy.lua" not in http_filters(s[LISTENER]["0.0.0.0_443"] if "0.0.0.0_443" in s[LISTENER] else
                                           s[LISTENER]["virtualOutbound"])


def test_network_filter_and_filter_chain_and_listener_patches():
    s = snap([envoy_filter("net", [
        {"applyTo": "NETWORK_FILTER", "match": {"context": "SIDECAR_OUTBOUND", "listener": {
            "name": "10.200.1.10_53", "filterChain": {"filter": {"name": "envoy.filters.network.tcp_proxy"}}}},
         "patch": {"operation": "INSERT_BEFORE", "value": {"name": "envoy.filters.network.connection_limit",
                   "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.connection_limit"
                                    ".v3.ConnectionLimit", "stat_prefix": "cl", "max_connections": 1}}}},
        {"applyTo": "LISTENER", "match": {"context": "SIDECAR_OUTBOUND", "listener": {"portNumber": 9153}},
         "patch": {"operation": "REMOVE"}},
        {"applyTo": "LISTENER", "match": {"context": "SIDECAR_OUTBOUND", "listener": {"portNumber": 15014}},
         "patch": {"operation": "MERGE", "value": {"per_connection_buffer_limit_bytes": 4096}}},
        {"applyTo": "LISTENER", "match": {"context": "SIDECAR_OUTBOUND"},
         "patch": {"operation": "ADD", "value": {"name": "extra", "address": {"socket_address": {
             "address": "127.0.0.1", "port_value": 9999}}}}},
        {"applyTo": "FILTER_CHAIN", "match": {"context": "SIDECAR_INBOUND", "listener": {"portNumber": 3030}},
         "patch": {"operation": "REMOVE"}},
    ])])
    dns = s[LISTENER]["10.200.1.10_53"].filter_chains[0]
    assert [f.name for f in dns.filters] == ["envoy.filters.network.connection_limit", "envoy.tcp_proxy"]
    assert "10.200.1.10_9153" not in s[LISTENER]
    assert s[LISTENER]["0.0.0.0_15014"].per_connection_buffer_limit_bytes.value == 4096
    assert s[LISTENER]["extra"].address.socket_address.port_value == 9999
    ports = {fc.filter_chain_match.destination_port.value for fc in s[LISTENER]["virtualInbound"].filter_chains}
    before = {fc.filter_chain_match.destination_port.value for fc in snap([])[LISTENER]["virtualInbound"].filter_chains}
    assert before == {0, 3030} and ports == {0}  # the seed's webserver listens on 3030


def test_route_configuration_virtual_host_and_http_route_patches():
    s = snap([envoy_filter("rt", [
        {"applyTo": "ROUTE_CONFIGURATION", "match": {"context": "SIDECAR_OUTBOUND",
                                                     "routeConfiguration": {"portNumber": 80}},
         "patch": {"operation": "MERGE", "value": {"request_headers_to_add": [
             {"header": {"key": "x-from-ef", "value": "1"}}]}}},
        {"applyTo": "VIRTUAL_HOST", "match": {"context": "SIDECAR_OUTBOUND", "routeConfiguration": {
            "vhost": {"name": "proxy.default.svc.cluster.local:80"}}}, "patch": {"operation": "REMOVE"}},
        {"applyTo": "VIRTUAL_HOST", "match": {"context": "SIDECAR_OUTBOUND", "routeConfiguration": {"name": "80"}},
         "patch": {"operation": "ADD", "value": {"name": "added", "domains": ["added.example"], "routes": [
             {"match": {"prefix": "/"}, "direct_response": {"status": 204}}]}}},
        {"applyTo": "HTTP_ROUTE", "match": {"context": "SIDECAR_OUTBOUND", "routeConfiguration": {"vhost": {
            "name": "webserverv1.default.svc.cluster.local:80", "route": {"name": "default"}}}},
         "patch": {"operation": "INSERT_BEFORE", "value": {"name": "first", "match": {"prefix": "/ef"},
                                                          "direct_response": {"status": 418}}}},
        {"applyTo": "HTTP_ROUTE", "match": {"context": "SIDECAR_OUTBOUND", "routeConfiguration": {"vhost": {
            "name": "istio-egressgateway.istio-system.svc.cluster.local:80", "route": {"action": "ROUTE"}}}},
         "patch": {"operation": "MERGE", "value": {"route": {"timeout": "7s"}}}},
    ])])
    rc = s[ROUTE]["80"]
    assert rc.request_headers_to_add[-1].header.key == "x-from-ef"
    names = [v.name for v in rc.virtual_hosts]
    assert "proxy.default.svc.cluster.local:80" not in names and names[-1] == "added"
    v1 = next(v for v in rc.virtual_hosts if v.name == "webserverv1.default.svc.cluster.local:80")
    assert [r.name for r in v1.routes] == ["first", "default"]
    eg = next(v for v in rc.virtual_hosts if v.name.startswith("istio-egressgateway"))
    assert eg.routes[0].route.timeout.seconds == 7
    # other route configurations are untouched
    assert not any(h.header.key == "x-from-ef" for h in s[ROUTE]["15010"].request_headers_to_add)


def test_cluster_merge_add_remove_by_service_port_and_subset():
    s = snap([envoy_filter("cl", [
        {"applyTo": "CLUSTER", "match": {"context": "SIDECAR_OUTBOUND", "cluster": {
            "service": "webserver.default.svc.cluster.local", "portNumber": 80}},
         "patch": {"operation": "MERGE", "value": {"connect_timeout": "3s", "per_connection_buffer_limit_bytes": 1024}}},
        {"applyTo": "CLUSTER", "match": {"cluster": {"name": "outbound|15014||istiod.istio-system.svc.cluster.local"}},
         "patch": {"operation": "REMOVE"}},
        {"applyTo": "CLUSTER", "match": {"context": "SIDECAR_OUTBOUND"},
         "patch": {"operation": "ADD", "value": {"name": "ef-static", "type": "STATIC", "connect_timeout": "1s"}}},
    ])])
    c = s[CLUSTER]["outbound|80||webserver.default.svc.cluster.local"]
    assert c.connect_timeout.seconds == 3 and c.per_connection_buffer_limit_bytes.value == 1024
    assert s[CLUSTER]["outbound|80||proxy.default.svc.cluster.local"].connect_timeout.seconds != 3
    assert "outbound|15014||istiod.istio-system.svc.cluster.local" not in s[CLUSTER]
    assert s[CLUSTER]["ef-static"].connect_timeout.seconds == 1
    # the input snapshot objects were not changed (layers are shared between proxies)
    again = snap([])
    assert again[CLUSTER]["outbound|80||webserver.default.svc.cluster.local"].connect_timeout.seconds != 3


def test_workload_selector_root_namespace_and_priority_order():
    v2_only = envoy_filter("v2-only", [{"applyTo": "CLUSTER", "match": {"cluster": {"name": "outbound|80||webserver.default.svc.cluster.local"}},
                                        "patch": {"operation": "MERGE", "value": {"connect_timeout": "5s"}}}],
                           workloadSelector={"labels": {"version": "v2"}})
    assert snap([v2_only], V2)[CLUSTER]["outbound|80||webserver.default.svc.cluster.local"].connect_timeout.seconds == 5
    assert snap([v2_only])[CLUSTER]["outbound|80||webserver.default.svc.cluster.local"].connect_timeout.seconds != 5
    # a root-namespace filter applies everywhere; a later priority wins a MERGE of the same field
    mesh_wide = envoy_filter("mesh-wide", copy.deepcopy(v2_only["spec"]["configPatches"]), namespace="istio-system",
                             priority=10)
    mesh_wide["spec"]["configPatches"][0]["patch"]["value"]["connect_timeout"] = "9s"
    local = envoy_filter("local", copy.deepcopy(v2_only["spec"]["configPatches"]), priority=-1)
    got = snap([mesh_wide, local])[CLUSTER]["outbound|80||webserver.default.svc.cluster.local"]
    assert got.connect_timeout.seconds == 9  # priority -1 first, then 10
    mesh_wide["spec"]["priority"] = -5
    got = snap([mesh_wide, local])[CLUSTER]["outbound|80||webserver.default.svc.cluster.local"]
    assert got.connect_timeout.seconds == 5


def test_gateway_context():
    ef = envoy_filter("gw", [{"applyTo": "HTTP_FILTER", "match": {"context": "GATEWAY", "listener": ROUTER_MATCH},
                              "patch": {"operation": "INSERT_BEFORE", "value": LUA}}], namespace="istio-system")
    gateway = {"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
               "metadata": {"name": "web", "namespace": "istio-system"},
               "spec": {"selector": {"istio": "ingressgateway"},
                        "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]}}
    push = push_of(SEED + [ef, gateway])
    gw = [p for p in push.pods.values() if (p["metadata"].get("labels") or {}).get("istio") == "ingressgateway"]
    if not gw:
        pytest.skip("the seed mesh has no ingress gateway pod")
    meta = gw[0]["metadata"]
    node = f"router~{gw[0]['status']['podIP']}~{meta['name']}.{meta['namespace']}~{meta['namespace']}.svc.cluster.local"
    s = build_snapshot(push, Proxy.from_node_id(node, push)).merged()
    chains = [f for lst in s[LISTENER].values() for f in http_filters(lst)]
    assert chains and all(f[-2:] == ["envoy.lua", "envoy.filters.http.router"] for f in chains)
    sidecar = snap([ef])
    assert not any("envoy.lua" in f for lst in sidecar[LISTENER].values() for f in http_filters(lst))


BAD = [
    ({"applyTo": "HTTP_FILTER", "patch": {"operation": "ADD"}}, "spec.configPatches[0].patch.value",
     "Envoy filter: missing patch value for non-remove operation"),
    ({"patch": {"operation": "REMOVE"}}, "spec.configPatches[0].applyTo", "Envoy filter: missing applyTo"),
    ({"applyTo": "CLUSTER"}, "spec.configPatches[0].patch", "Envoy filter: missing patch"),
    ({"applyTo": "CLUSTER", "patch": {"value": {"name": "x"}}}, "spec.configPatches[0].patch.operation",
     "Envoy filter: missing patch operation"),
    ({"applyTo": "CLUSTER", "match": {"listener": {"portNumber": 80}}, "patch": {"operation": "REMOVE"}},
     "spec.configPatches[0].match", "Envoy filter: applyTo for cluster class objects cannot have non cluster match"),
    ({"applyTo": "HTTP_FILTER", "match": {"cluster": {"name": "x"}}, "patch": {"operation": "REMOVE"}},
     "spec.configPatches[0].match", "Envoy filter: applyTo for listener class objects cannot have non listener match"),
    ({"applyTo": "NETWORK_FILTER", "match": {"listener": ROUTER_MATCH}, "patch": {"operation": "REMOVE"}},
     "spec.configPatches[0].match.listener.filterChain.filter.subFilter",
     "Envoy filter: subfilter match can be used with applyTo HTTP_FILTER only"),
    ({"applyTo": "CLUSTER", "patch": {"operation": "MERGE", "value": {"connect_timeout": "soon"}}},
     "spec.configPatches[0].patch.value", "Failed to parse connect_timeout field"),
    ({"applyTo": "HTTP_FILTER", "patch": {"operation": "ADD", "value": {"name": "x", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.nope.v3.Nope"}}}},
     "spec.configPatches[0].patch.value", "referenced type unknown"),
    ({"applyTo": "CLUSTER", "patch": {"operation": "MERGE", "value": {"bogus": 1}}},
     "spec.configPatches[0].patch.value", 'has no field named "bogus"'),
    ({"applyTo": "CLUSTR", "patch": {"operation": "REMOVE"}}, "spec.configPatches[0].applyTo", "Unsupported value"),
]


@pytest.mark.parametrize("patch, field, message", BAD)
def test_bad_envoy_filters_are_rejected_naming_the_field(patch, field, message):
    doc = envoy_filter("bad", [patch])
    objects, errors = check_documents([Document("ef.yaml", 0, doc)])
    assert objects == [] and len(errors) == 1
    got = {(e.path, e.message.split(" at ")[0]) for e in errors[0].errors}
    assert any(p == field and message in m for p, m in got), got
