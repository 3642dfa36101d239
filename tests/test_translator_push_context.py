"""The push context: services, endpoints and Istio configs as istiod's model sees them."""

from __future__ import annotations

import copy

import pytest

from mizzen.services.translator import protocol as P
from mizzen.services.translator.model import CLIENT_SIDE_LB, DNS_LB, PASSTHROUGH, host_matches
from mizzen.services.translator.proxy import NodeIdError, Proxy
from tests.translator_helpers import FEATURES, SEED_MESH, SEED_PROXY, load, push_of, yaml_objects


@pytest.fixture(scope="module")
def seed():
    return push_of(load(SEED_MESH))


@pytest.fixture(scope="module")
def features():
    return push_of(load(FEATURES))


def svc(push, host, ns=None):
    by_ns = push.services_by_host[host]
    return by_ns[ns] if ns else next(iter(by_ns.values()))


# ------------------------------------------------------------------------------------------ protocol
@pytest.mark.parametrize("name,port,transport,app,want", [
    ("http-web", 80, "TCP", None, P.HTTP),
    ("HTTP2", 80, "TCP", None, P.HTTP2),
    ("grpc-xds", 15010, "TCP", None, P.GRPC),
    ("grpc-web-ui", 8080, "TCP", None, P.GRPC_WEB),
    ("https-dns", 15012, "TCP", None, P.HTTPS),
    ("tcp", 31400, "TCP", None, P.TCP),
    ("mongo-db", 27018, "TCP", None, P.MONGO),
    ("web", 80, "TCP", None, P.UNSUPPORTED),          # the seed's proxy service: sniffed
    ("status-port", 15021, "TCP", None, P.UNSUPPORTED),
    ("dns-tls", 853, "TCP", None, P.UNSUPPORTED),
    ("dns-tcp", 53, "TCP", None, P.TCP),               # unknown prefix on a well-known port → TCP
    ("", 3306, "TCP", None, P.TCP),
    ("", 8080, "TCP", None, P.UNSUPPORTED),
    ("dns", 53, "UDP", None, P.UDP),
    ("web", 80, "TCP", "http", P.HTTP),                # appProtocol replaces the port name
    ("http-web", 80, "TCP", "kubernetes.io/h2c", P.HTTP2),
])
def test_kube_port_protocol(name, port, transport, app, want):
    assert P.from_kube_port(port, name, transport, app) == want


def test_listener_classes():
    assert [P.listener_class(p) for p in (P.GRPC, P.HTTP_PROXY, P.TLS, P.REDIS, P.UNSUPPORTED, P.UDP)] == \
        ["HTTP", "HTTP", "TCP", "TCP", "AUTO", None]


def test_host_matching_rules():
    assert host_matches("*", "anything.example.com")
    assert host_matches("*.example.com", "a.example.com")
    assert not host_matches("*.example.com", "example.org")
    assert host_matches("*.b.example.com", "*.example.com")  # wildcard vs wildcard: the broader covers
    assert not host_matches("a.example.com", "b.example.com")


# ------------------------------------------------------------------------------------------ services
def test_seed_services_fqdn_resolution_and_order(seed):
    hosts = [s.hostname for s in seed.services]
    assert "webserver.default.svc.cluster.local" in hosts
    assert "raw.githubusercontent.com" in hosts
    web = svc(seed, "webserver.default.svc.cluster.local")
    assert (web.resolution, web.address, [(p.name, p.port, p.protocol) for p in web.ports]) == \
        (CLIENT_SIDE_LB, "10.200.1.189", [("http-web", 80, P.HTTP)])
    # equal creation times: ordered by hostname (Istio sorts services by creation time)
    assert hosts == sorted(hosts, key=lambda h: (svc(seed, h).created[0], h))


def test_endpoint_labels_come_from_target_pods(seed):
    web = svc(seed, "webserver.default.svc.cluster.local")
    eps = {e.address: e for e in web.endpoints[80]}
    assert eps["10.200.0.135"].labels["version"] == "v1"
    assert eps["10.200.0.148"].labels["version"] == "v2"
    assert (eps["10.200.0.135"].port, eps["10.200.0.135"].service_account) == (3030, "default")
    kube = svc(seed, "kubernetes.default.svc.cluster.local")
    [api] = kube.endpoints[443]
    assert (api.address, api.port, api.labels) == ("9.134.236.162", 6443, {})  # no targetRef: no labels


def test_endpoint_slices_and_udp_ports(seed):
    dns = svc(seed, "kube-dns.kube-system.svc.cluster.local")
    assert [(e.address, e.port) for e in dns.endpoints[53]] == [("10.200.0.139", 53)]  # the UDP port adds none
    assert [(e.address, e.port) for e in dns.endpoints[9153]] == [("10.200.0.139", 9153)]
    assert dns.endpoints[9153][0].labels["k8s-app"] == "kube-dns"


def test_not_ready_slice_endpoints_are_dropped(features):
    reviews = svc(features, "reviews.shop.svc.cluster.local")
    assert sorted(e.address for e in reviews.endpoints[9080]) == ["10.1.0.20", "10.1.0.21"]


def test_headless_and_external_name(features):
    assert svc(features, "ratings.shop.svc.cluster.local").resolution == PASSTHROUGH
    legacy = svc(features, "legacy.shop.svc.cluster.local")
    # 1.7: a DNS service (mesh external) whose endpoint is the external name
    assert (legacy.resolution, legacy.mesh_external, legacy.external_name) == (DNS_LB, True, "legacy.example.com")
    assert [(e.address, e.port) for e in legacy.endpoints[80]] == [("legacy.example.com", 80)]
    assert "10.1.0.30" in features.headless_ips


def test_service_entry_dns_endpoints_and_ports(features):
    pay = svc(features, "api.payments.example.com")
    assert (pay.resolution, pay.mesh_external, pay.addresses) == (DNS_LB, True, [])
    assert [(e.address, e.port, e.labels) for e in pay.endpoints[443]] == [
        ("eu.payments.example.com", 443, {"region": "eu"}), ("us.payments.example.com", 8443, {"region": "us"})]
    seed = push_of(load(SEED_MESH))
    gh = svc(seed, "raw.githubusercontent.com")
    assert [(e.address, e.port) for e in gh.endpoints[443]] == [("raw.githubusercontent.com", 443)]


def test_service_entry_workload_selector_uses_workload_entries(features):
    billing = svc(features, "billing.shop.internal")
    assert (billing.resolution, billing.mesh_external, billing.address) == (CLIENT_SIDE_LB, False, "10.97.0.5")
    [ep] = billing.endpoints[8080]
    assert (ep.address, ep.port, ep.labels["version"], ep.service_account) == ("192.168.10.5", 18080, "v1", "billing")
    assert billing.service_accounts == ["spiffe://cluster.local/ns/shop/sa/billing"]


def test_service_accounts_from_pods(features):
    assert svc(features, "frontend.shop.svc.cluster.local").service_accounts == \
        ["spiffe://cluster.local/ns/shop/sa/frontend"]


def test_export_to_annotation_limits_visibility(features):
    shop = {s.hostname for s in features.visible_services("shop")}
    tools = {s.hostname for s in features.visible_services("tools")}
    assert "internal-only.shop.svc.cluster.local" in shop
    assert "internal-only.shop.svc.cluster.local" not in tools
    assert "frontend.shop.svc.cluster.local" in tools


# ------------------------------------------------------------------------------------------ DestinationRules
DR_MESH = """
apiVersion: v1
kind: Service
metadata: {name: api, namespace: backend}
spec: {clusterIP: 10.0.0.1, ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: from-root, namespace: istio-system}
spec: {host: "*.svc.cluster.local", trafficPolicy: {loadBalancer: {simple: RANDOM}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: owner, namespace: backend}
spec: {host: api, exportTo: ["."], subsets: [{name: a, labels: {v: a}}]}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: client-side, namespace: client}
spec: {host: api.backend.svc.cluster.local, subsets: [{name: c, labels: {v: c}}]}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: owner-extra, namespace: backend, creationTimestamp: "2030-01-01T00:00:00Z"}
spec: {host: api.backend.svc.cluster.local, trafficPolicy: {tls: {mode: DISABLE}},
       subsets: [{name: a, labels: {v: x}}, {name: b, labels: {v: b}}]}
"""


def test_destination_rule_lookup_order():
    push = push_of(DR_MESH)
    api = svc(push, "api.backend.svc.cluster.local")
    assert push.destination_rule("client", api).name == "client-side"   # 1. the proxy's own namespace
    assert push.destination_rule("backend", api).name == "owner"        # 2. the service's namespace
    assert push.destination_rule("elsewhere", api).name == "from-root"  # owner's is private (exportTo .) → root
    assert push.destination_rule("istio-system", api).name == "from-root"  # root ns skips step 1


def test_destination_rules_for_one_host_are_merged():
    push = push_of(DR_MESH)
    dr = push.destination_rule("backend", svc(push, "api.backend.svc.cluster.local"))
    # subsets appended by name (the older `a` kept), the first rule's (absent) policy replaced by the later one
    assert [(s["name"], s["labels"]) for s in dr.spec["subsets"]] == [("a", {"v": "a"}), ("b", {"v": "b"})]
    assert dr.spec["trafficPolicy"] == {"tls": {"mode": "DISABLE"}}
    assert dr.meta_path == "/apis/networking.istio.io/v1alpha3/namespaces/backend/destination-rule/owner"


# ------------------------------------------------------------------------------------------ VirtualServices
def test_virtual_service_names_resolved(features):
    vs = next(v for v in features.virtual_services if v.name == "reviews")
    assert vs.hosts == ["reviews.shop.svc.cluster.local"] and vs.gateways == ["mesh"]
    assert vs.spec["http"][0]["route"][0]["destination"]["host"] == "reviews.shop.svc.cluster.local"
    gw_vs = next(v for v in features.virtual_services if v.name == "shop-public")
    assert gw_vs.gateways == ["edge/public"]


def test_virtual_service_resolution_leaves_input_objects_alone():
    text = """
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: r, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{gateways: [public], uri: {prefix: /a}}]
    route: [{destination: {host: reviews, subset: v1}, headers: {request: {set: {x: "1"}}}}]
    mirror: {host: ratings}
    mirrors: [{destination: {host: ratings}}]
  tcp:
  - route: [{destination: {host: db}}]
"""
    objs = yaml_objects(text)
    before = copy.deepcopy(objs)
    vs = push_of(objs).virtual_services[0]
    assert objs == before  # resolved on copies: a later push reads the same objects again
    http = vs.spec["http"][0]
    assert http["route"][0]["destination"] == {"host": "reviews.shop.svc.cluster.local", "subset": "v1"}
    assert http["mirror"]["host"] == "ratings.shop.svc.cluster.local"
    assert http["mirrors"][0]["destination"]["host"] == "ratings.shop.svc.cluster.local"
    assert http["match"][0]["gateways"] == ["shop/public"]
    assert vs.spec["tcp"][0]["route"][0]["destination"]["host"] == "db.shop.svc.cluster.local"


def test_delegate_virtual_service_is_merged_into_its_root(features):
    assert ("shop", "api-routes") in features.delegate_virtual_services
    root = next(v for v in features.virtual_services if v.name == "api-root")
    names = [r.get("name") for r in root.spec["http"]]
    # /other is not inside the root's /api prefix: that delegate rule is dropped
    assert names == ["api-orders", None]
    merged = root.spec["http"][0]
    assert merged["match"] == [{"uri": {"prefix": "/api/orders"}}]
    assert merged["timeout"] == "3s"  # inherited from the root rule
    assert "delegate" not in merged


def test_creation_time_orders_virtual_services():
    text = """
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: b-newer, namespace: x, creationTimestamp: "2024-02-01T00:00:00Z"}
spec: {hosts: [a.example.com], http: [{route: [{destination: {host: a.example.com}}]}]}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: z-older, namespace: x, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {hosts: [b.example.com], http: [{route: [{destination: {host: b.example.com}}]}]}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: a-older, namespace: x, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {hosts: [c.example.com], http: [{route: [{destination: {host: c.example.com}}]}]}
"""
    assert [v.name for v in push_of(text).virtual_services] == ["a-older", "z-older", "b-newer"]


# ------------------------------------------------------------------------------------------ proxies
def test_proxy_from_node_id_fills_labels(seed):
    p = Proxy.from_node_id(SEED_PROXY, seed)
    assert (p.type, p.ip, p.pod, p.namespace) == ("sidecar", "10.200.0.135", "webserverv1-84596579c6-xxvhd", "default")
    assert p.labels["version"] == "v1" and p.dns_domain == "default.svc.cluster.local"
    unknown = Proxy.from_node_id("router~10.9.9.9~gw-1.edge~edge.svc.cluster.local", seed)
    assert (unknown.type, unknown.labels) == ("router", {})


@pytest.mark.parametrize("bad", ["sidecar~1.2.3.4~pod.ns", "ingress~1.2.3.4~p.ns~ns.svc.cluster.local",
                                 "sidecar~~p.ns~ns.svc.cluster.local"])
def test_bad_node_ids_are_rejected(bad):
    with pytest.raises(NodeIdError):
        Proxy.parse_node_id(bad)


def test_proxy_instances(seed, features):
    inst = seed.proxy_instances(Proxy.from_node_id(SEED_PROXY, seed))
    assert [(i.service.hostname, i.port.port, i.port.name, i.endpoint_port) for i in inst] == [
        ("webserver.default.svc.cluster.local", 80, "http-web", 3030),
        ("webserverv1.default.svc.cluster.local", 80, "http-web", 3030)]
    fe = features.proxy_instances(Proxy.from_node_id("sidecar~10.1.0.10~frontend-1.shop~shop.svc.cluster.local",
                                                     features))
    # targetPort "grpc" resolves through the Pod's named container port
    assert [(i.port.port, i.endpoint_port) for i in fe] == [(80, 8080), (9090, 9191), (5432, 5432), (7070, 7070)]


def test_peer_authentication_modes(features):
    assert features.mtls_mode("shop", {"app": "reviews"}) == "STRICT"
    assert features.mtls_mode("shop", {"app": "frontend"}) == "PERMISSIVE"
    assert features.mtls_mode("shop", {"app": "frontend"}, 5432) == "DISABLE"
    assert features.mtls_mode("tools", {"app": "toolbox"}) == "DISABLE"
    assert features.mtls_mode("edge", {}) == "PERMISSIVE"


def test_sidecar_scope_narrows_services(features):
    p = Proxy.from_node_id("sidecar~10.2.0.10~toolbox-1.tools~tools.svc.cluster.local", features)
    view = features.view(p)
    scope = view.scope
    assert scope.outbound_policy == "REGISTRY_ONLY"
    first, catch_all = scope.egress
    assert first.port.port == 9080 and [s.hostname for s in first.services] == ["reviews.shop.svc.cluster.local"]
    assert [p.port for p in first.services[0].ports] == [9080]  # trimmed to the listener port
    assert {s.hostname for s in catch_all.services} == {"toolbox.tools.svc.cluster.local"}
    # ratings is reached only through the reviews VirtualService's mirror: the scope adds it (1.7 inference)
    assert "ratings.shop.svc.cluster.local" in scope.services_by_host


def test_views_are_shared_by_equal_proxies(features):
    a = features.view(Proxy.from_node_id("sidecar~10.1.0.10~frontend-1.shop~shop.svc.cluster.local", features))
    b = features.view(Proxy.from_node_id("sidecar~10.1.0.20~reviews-v1.shop~shop.svc.cluster.local", features))
    c = features.view(Proxy.from_node_id("sidecar~10.1.0.11~frontend-2.shop~shop.svc.cluster.local", features))
    assert a is b            # same namespace, scope, and no sourceLabels rule tells them apart
    assert c is not a        # frontend v2 matches the reviews VS's `sourceLabels {app: frontend, version: v2}`
