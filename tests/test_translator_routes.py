"""RDS: route names, 1.7 virtual-host domains, VirtualService translation, default and inbound routes."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.type.v3 import percent_pb2

from mizzen.services.translator import routes
from mizzen.services.translator.model import CLIENT_SIDE_LB, Service
from mizzen.services.translator.proxy import Proxy
from tests.translator_helpers import (
    FEATURES,
    ROUTE,
    SEED_MESH,
    SEED_PROXY,
    load,
    push_of,
    snapshot_of,
    unpack,
)

FRONTEND_V1 = "sidecar~10.1.0.10~frontend-1.shop~shop.svc.cluster.local"
FRONTEND_V2 = "sidecar~10.1.0.11~frontend-2.shop~shop.svc.cluster.local"
TOOLBOX = "sidecar~10.2.0.10~toolbox-1.tools~tools.svc.cluster.local"
INGRESS = "router~10.3.0.10~ingress-1.edge~edge.svc.cluster.local"
MILLION = percent_pb2.FractionalPercent.MILLION


@pytest.fixture(scope="module")
def seed():
    return snapshot_of(push_of(load(SEED_MESH)), SEED_PROXY)[ROUTE]


@pytest.fixture(scope="module")
def features_push():
    return push_of(load(FEATURES))


@pytest.fixture(scope="module")
def shop(features_push):
    return snapshot_of(features_push, FRONTEND_V1)[ROUTE]


def vhost(rcfg, name):
    [vh] = [v for v in rcfg.virtual_hosts if v.name == name]
    return vh


def shortest_domain(domains) -> str:
    """istioctl 1.7's DOMAINS column: the shortest domain not starting with a digit 1-9."""
    cand = domains[0]
    for d in domains:
        if d and not ("1" <= d[0] <= "9") and len(d) < len(cand):
            cand = d
    return cand


# ------------------------------------------------------------------------------------------ domains
@pytest.mark.parametrize("proxy_domain,want", [
    # Istio 1.7 httproute_test.go TestGenerateVirtualHostDomains
    ("local.campus.net", ["foo", "foo.local", "foo.local.campus", "foo.local.campus.net",
                          "foo:80", "foo.local:80", "foo.local.campus:80", "foo.local.campus.net:80"]),
    ("remote.campus.net", ["foo.local", "foo.local.campus", "foo.local.campus.net",
                           "foo.local:80", "foo.local.campus:80", "foo.local.campus.net:80"]),
    ("example.com", ["foo.local.campus.net", "foo.local.campus.net:80"]),
])
def test_virtual_host_domains_istio_cases(proxy_domain, want):
    svc = Service("foo.local.campus.net", "x", "foo", "ServiceEntry", "External", [], [], CLIENT_SIDE_LB)
    assert sorted(routes.vhost_domains(svc, 80, proxy_domain)) == sorted(want)


def test_seed_route_80(seed):
    r80 = seed["80"]
    assert r80.validate_clusters.value is False and r80.HasField("validate_clusters")
    assert [(v.name.rsplit(".svc", 1)[0], shortest_domain(list(v.domains))) for v in r80.virtual_hosts] == [
        ("istio-egressgateway.istio-system", "istio-egressgateway.istio-system"),
        ("istio-ingressgateway.istio-system", "istio-ingressgateway.istio-system"),
        ("proxy.default", "proxy"), ("webserver.default", "webserver"), ("webserverv1.default", "webserverv1"),
        ("webserverv2.default", "webserverv2"), ("allow_any", "*")]
    # 1.7 order: fqdn, then the unique part and each shorter shared suffix, each with and without the port
    assert list(vhost(r80, "proxy.default.svc.cluster.local:80").domains) == [
        "proxy.default.svc.cluster.local", "proxy.default.svc.cluster.local:80", "proxy", "proxy:80",
        "proxy.default.svc.cluster", "proxy.default.svc.cluster:80", "proxy.default.svc", "proxy.default.svc:80",
        "proxy.default", "proxy.default:80", "10.200.1.132", "10.200.1.132:80"]
    # another namespace never gets the bare short name
    assert list(vhost(r80, "istio-egressgateway.istio-system.svc.cluster.local:80").domains)[2:4] == [
        "istio-egressgateway.istio-system", "istio-egressgateway.istio-system:80"]
    allow = r80.virtual_hosts[-1]
    [r] = allow.routes
    assert (r.name, r.route.cluster, r.route.timeout.seconds) == ("allow_any", "PassthroughCluster", 0)


def test_seed_route_names_and_sniffed_routes(seed):
    assert set(seed) == {"80", "15010", "15014", "proxy.default.svc.cluster.local:80",
                         "istio-ingressgateway.istio-system.svc.cluster.local:15021",
                         "kube-dns.kube-system.svc.cluster.local:9153", "istiod.istio-system.svc.cluster.local:853"}
    sniffed = seed["proxy.default.svc.cluster.local:80"]
    assert [v.name for v in sniffed.virtual_hosts] == ["proxy.default.svc.cluster.local:80"]  # no catch-all
    assert [shortest_domain(list(v.domains)) for v in seed["15010"].virtual_hosts] == ["istiod.istio-system", "*"]


def test_seed_webserver_virtual_service_route(seed):
    [r] = vhost(seed["80"], "webserver.default.svc.cluster.local:80").routes
    m = r.match
    assert (m.safe_regex.regex, m.safe_regex.google_re2.max_program_size.value, m.case_sensitive.value) == \
        (".*", 1024, True)
    assert r.metadata.filter_metadata["istio"]["config"] == \
        "/apis/networking.istio.io/v1alpha3/namespaces/default/virtual-service/webserver"
    assert [(c.name, c.weight.value) for c in r.route.weighted_clusters.clusters] == [
        ("outbound|80|v1|webserver.default.svc.cluster.local", 50),
        ("outbound|80|v2|webserver.default.svc.cluster.local", 50)]
    assert r.decorator.operation == "webserver:80.*"
    assert r.route.retry_policy.num_retries.value == 2


def test_default_route(seed):
    [r] = vhost(seed["80"], "webserverv1.default.svc.cluster.local:80").routes
    assert (r.name, r.match.prefix, r.match.HasField("case_sensitive")) == ("default", "/", False)
    a = r.route
    assert (a.cluster, a.timeout.seconds, a.max_stream_duration.grpc_timeout_header_max.seconds) == \
        ("outbound|80||webserverv1.default.svc.cluster.local", 0, 0)
    assert a.HasField("timeout") and a.max_stream_duration.HasField("grpc_timeout_header_max")
    rp = a.retry_policy
    assert (rp.num_retries.value, rp.retry_on, list(rp.retriable_status_codes), rp.host_selection_retry_max_attempts) \
        == (2, "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes", [503], 5)
    assert [p.name for p in rp.retry_host_predicate] == ["envoy.retry_host_predicates.previous_hosts"]
    assert r.decorator.operation == "webserverv1.default.svc.cluster.local:80/*"
    assert vhost(seed["80"], "webserverv1.default.svc.cluster.local:80").include_request_attempt_count


# ------------------------------------------------------------------------------------------ retries (Istio retry_test facts)
def test_retry_policy_conversion():
    assert routes.retry_policy({"attempts": 0}) is None
    p = routes.retry_policy({"attempts": 3, "retryOn": "5xx,connect-failure"})
    assert (p.num_retries.value, p.retry_on, list(p.retriable_status_codes)) == (3, "5xx,connect-failure", [])
    p = routes.retry_policy({"attempts": 2, "retryOn": "gateway-error,503,429", "perTryTimeout": "2s"})
    assert (p.retry_on, list(p.retriable_status_codes), p.per_try_timeout.seconds) == ("gateway-error", [503, 429], 2)
    p = routes.retry_policy({"attempts": 1, "retryRemoteLocalities": True})
    assert p.retry_priority.name == "envoy.retry_priorities.previous_priorities"
    assert routes.retry_policy(None).num_retries.value == 2


# ------------------------------------------------------------------------------------------ VirtualService features
def test_match_translation(shop):
    rs = vhost(shop["9080"], "reviews.shop.svc.cluster.local:9080").routes
    r = rs[0]
    assert r.name == "canary.jason"
    m = r.match
    assert (m.prefix, m.case_sensitive.value) == ("/api/v1", False)
    hdrs = [(h.name, h.WhichOneof("header_match_specifier"), h.invert_match) for h in m.headers]
    # user headers sorted by name, then :method and :authority
    assert hdrs == [("end-user", "string_match", False), ("x-skip", "string_match", True),
                    ("x-trace", "present_match", False), (":method", "string_match", False),
                    (":authority", "string_match", False)]
    assert m.headers[0].string_match.exact == "jason" and m.headers[4].string_match.prefix == "reviews"
    [q] = m.query_parameters
    assert (q.name, q.string_match.exact) == ("debug", "1")


def test_single_destination_action(shop):
    r = vhost(shop["9080"], "reviews.shop.svc.cluster.local:9080").routes[0]
    a = r.route
    assert a.cluster == "outbound|9080|v2|reviews.shop.svc.cluster.local"
    assert (a.timeout.seconds, a.timeout.nanos, a.max_stream_duration.grpc_timeout_header_max.nanos) == \
        (2, 500_000_000, 500_000_000)
    rp = a.retry_policy
    assert (rp.num_retries.value, rp.retry_on, list(rp.retriable_status_codes), rp.per_try_timeout.nanos) == \
        (4, "5xx,gateway-error", [503], 500_000_000)
    assert rp.retry_priority.name == "envoy.retry_priorities.previous_priorities"
    # the destination's headers move onto the route
    [h] = r.request_headers_to_add
    assert (h.header.key, h.header.value, h.append_action) == \
        ("x-route", "canary", base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
    # consistent hash from the reviews DestinationRule (the v2 subset has none of its own)
    [hp] = a.hash_policy
    assert hp.header.header_name == "x-user"
    fault = unpack(r.typed_per_filter_config["envoy.filters.http.fault"], fault_pb2.HTTPFault)
    assert (fault.delay.fixed_delay.seconds, fault.delay.percentage.numerator, fault.delay.percentage.denominator) == \
        (1, 100000, MILLION)
    assert (fault.abort.http_status, fault.abort.percentage.numerator) == (418, 5000)


def test_redirect_rewrite_mirror_cors_headers(shop):
    rs = vhost(shop["9080"], "reviews.shop.svc.cluster.local:9080").routes
    redirect = rs[1].redirect
    assert (redirect.path_redirect, redirect.host_redirect, redirect.response_code) == \
        ("/new", "reviews.shop.svc.cluster.local", rc.RedirectAction.FOUND)
    r = rs[2]
    a = r.route
    assert r.match.safe_regex.regex == "/rewrite/[0-9]+"
    assert (a.prefix_rewrite, a.host_rewrite_literal) == ("/v2/", "reviews-v2")
    assert [(c.name, c.weight.value) for c in a.weighted_clusters.clusters] == [
        ("outbound|9080|v1|reviews.shop.svc.cluster.local", 80), ("outbound|9080|v2|reviews.shop.svc.cluster.local", 20)]
    [mp] = a.request_mirror_policies
    assert (mp.cluster, mp.runtime_fraction.default_value.numerator, mp.runtime_fraction.default_value.denominator,
            mp.trace_sampled.value) == ("outbound|6080||ratings.shop.svc.cluster.local", 255000, MILLION, False)
    cors = unpack(r.typed_per_filter_config["envoy.filters.http.cors"], cors_pb2.CorsPolicy)
    assert [m.WhichOneof("match_pattern") for m in cors.allow_origin_string_match] == ["exact", "safe_regex"]
    assert (cors.allow_methods, cors.allow_headers, cors.expose_headers, cors.max_age, cors.allow_credentials.value) \
        == ("GET,POST", "x-user", "x-trace", "86400", True)
    assert (cors.filter_enabled.default_value.numerator, cors.filter_enabled.default_value.denominator) == \
        (100, percent_pb2.FractionalPercent.HUNDRED)
    [add] = r.request_headers_to_add
    assert (add.header.key, add.append_action) == ("x-added", base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD)
    assert list(r.request_headers_to_remove) == ["x-remove"]
    assert [h.header.key for h in r.response_headers_to_add] == ["x-served-by"]
    assert r.decorator.operation == "reviews:9080/rewrite/[0-9]+"


def test_source_labels_and_catch_all(features_push, shop):
    v1 = [r.name for r in vhost(shop["9080"], "reviews.shop.svc.cluster.local:9080").routes]
    v2_routes = vhost(snapshot_of(features_push, FRONTEND_V2)[ROUTE]["9080"], "reviews.shop.svc.cluster.local:9080")
    v2 = [r.match.prefix for r in v2_routes.routes]
    assert len(v2) == len(v1) + 1 and "/from-v2" in v2  # only frontend v2 matches the sourceLabels rule
    last = vhost(shop["9080"], "reviews.shop.svc.cluster.local:9080").routes[-1]
    assert last.route.cluster == "outbound|9080|v1|reviews.shop.svc.cluster.local"
    assert not last.route.HasField("retry_policy")  # attempts: 0


def test_direct_response_and_non_registry_hosts(shop):
    vh = vhost(shop["80"], "www.example.net:80")
    assert list(vh.domains) == ["www.example.net", "www.example.net:80"]
    [r] = vh.routes
    assert (r.direct_response.status, r.direct_response.body.inline_string) == (503, "maintenance")
    # 1.7: a VirtualService whose hosts have no service on this port becomes a plain-host vhost on port 80
    assert list(vhost(shop["80"], "reviews.shop.svc.cluster.local:80").domains) == \
        ["reviews.shop.svc.cluster.local", "reviews.shop.svc.cluster.local:80"]


def test_delegate_routes(shop):
    rs = vhost(shop["80"], "frontend.shop.svc.cluster.local:80").routes
    assert [(r.name, r.match.prefix, r.route.cluster) for r in rs] == [
        ("api-orders", "/api/orders", "outbound|80|v1|frontend.shop.svc.cluster.local"),
        ("", "/", "outbound|80||frontend.shop.svc.cluster.local")]
    assert rs[0].route.timeout.seconds == 3


def test_headless_service_wildcard_domains(shop):
    domains = list(vhost(shop["6080"], "ratings.shop.svc.cluster.local:6080").domains)
    assert domains[:2] == ["ratings.shop.svc.cluster.local", "ratings.shop.svc.cluster.local:6080"]
    assert "*.ratings" in domains and "*.ratings.shop.svc.cluster.local:6080" in domains


def test_registry_only_catch_all(features_push):
    rds = snapshot_of(features_push, TOOLBOX)[ROUTE]
    block = rds["8080"].virtual_hosts[-1]
    assert (block.name, list(block.domains), block.routes[0].direct_response.status) == ("block_all", ["*"], 502)


def test_gateway_routes(features_push):
    rds = snapshot_of(features_push, INGRESS)[ROUTE]
    assert set(rds) == {"http.80", "https.443.https.public.edge", "https.443.https-mtls.public.edge"}
    [vh] = rds["http.80"].virtual_hosts
    assert (vh.name, list(vh.domains), vh.require_tls) == \
        ("shop.example.com:80", ["shop.example.com", "shop.example.com:80"], rc.VirtualHost.ALL)
    assert [r.route.cluster for r in vh.routes] == ["outbound|9080||reviews.shop.svc.cluster.local",
                                                    "outbound|80||frontend.shop.svc.cluster.local"]
    [mtls] = rds["https.443.https-mtls.public.edge"].virtual_hosts
    assert mtls.name == "partners.example.com:443"


def test_unknown_route_name_is_empty():
    push = push_of(load(SEED_MESH))
    view = push.view(Proxy.from_node_id(SEED_PROXY, push))
    rcfg = routes.sidecar_route_config(push, view, "not-a-port")
    assert (rcfg.name, len(rcfg.virtual_hosts)) == ("not-a-port", 0)


CONFLICTS = """
apiVersion: v1
kind: Pod
metadata: {name: ingress-1, namespace: edge, labels: {istio: ingress}}
status: {podIP: 10.3.0.10}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.5.1, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.5.2, ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: public, namespace: edge}
spec:
  selector: {istio: ingress}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*/shop.example.com"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: z-older, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  hosts: [shop.example.com, web]
  gateways: [edge/public, mesh]
  http:
  - match: [{uri: {prefix: /old}}]
    route: [{destination: {host: web}}]
  - route: [{destination: {host: web}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a-newer, namespace: shop, creationTimestamp: "2026-01-01T00:00:01Z"}
spec:
  hosts: [shop.example.com, web]
  gateways: [edge/public, mesh]
  http:
  - match: [{uri: {prefix: /new}}]
    route: [{destination: {host: api}}]
  - route: [{destination: {host: api}}]
"""


def test_virtual_services_sharing_a_host_on_a_gateway_are_merged_catch_alls_last():
    push = push_of(CONFLICTS)
    [vh] = snapshot_of(push, INGRESS)[ROUTE]["http.80"].virtual_hosts
    web, api = "outbound|80||web.shop.svc.cluster.local", "outbound|80||api.shop.svc.cluster.local"
    # the older one's routes first, the newer one's specific route next, the catch-alls (older first) last
    assert [(r.match.prefix, r.route.cluster) for r in vh.routes] == [
        ("/old", web), ("/new", api), ("/", web), ("/", api)]


def test_virtual_services_sharing_a_host_on_the_mesh_gateway_the_oldest_takes_it():
    push = push_of(CONFLICTS)
    vh = vhost(snapshot_of(push, FRONTEND_V1)[ROUTE]["80"], "web.shop.svc.cluster.local:80")
    # by creation time, not name: z-older's routes only
    assert [(r.match.prefix, r.route.cluster) for r in vh.routes] == [
        ("/old", "outbound|80||web.shop.svc.cluster.local"), ("/", "outbound|80||web.shop.svc.cluster.local")]
