"""CDS: cluster names, types, DestinationRule policies and TLS, against istiod 1.7 behaviour."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo

from mizzen.services.translator.clusters import HTTP_PROTOCOL_OPTIONS
from tests.translator_helpers import (
    CLUSTER,
    FEATURES,
    SEED_MESH,
    SEED_PROXY,
    load,
    push_of,
    snapshot_of,
    unpack,
)

C = cluster_pb2.Cluster
MAX = 4294967295
FRONTEND = "sidecar~10.1.0.10~frontend-1.shop~shop.svc.cluster.local"
TOOLBOX = "sidecar~10.2.0.10~toolbox-1.tools~tools.svc.cluster.local"
INGRESS = "router~10.3.0.10~ingress-1.edge~edge.svc.cluster.local"


@pytest.fixture(scope="module")
def seed():
    return snapshot_of(push_of(load(SEED_MESH)), SEED_PROXY)[CLUSTER]


@pytest.fixture(scope="module")
def features_push():
    return push_of(load(FEATURES))


@pytest.fixture(scope="module")
def shop(features_push):
    return snapshot_of(features_push, FRONTEND)[CLUSTER]


def istio_config(c) -> str:
    md = c.metadata.filter_metadata.get("istio")
    return md.fields["config"].string_value if md is not None and "config" in md.fields else ""


def tls_ctx(socket) -> tls_pb2.UpstreamTlsContext:
    return unpack(socket.typed_config, tls_pb2.UpstreamTlsContext)


def http_options(c) -> hpo.HttpProtocolOptions | None:
    if HTTP_PROTOCOL_OPTIONS not in c.typed_extension_protocol_options:
        return None
    return unpack(c.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS], hpo.HttpProtocolOptions)


# The seed's `istioctl proxy-config cluster` rows that come from CDS (static bootstrap clusters excluded):
# (name, type, destination rule config path suffix)
SEED_ROWS = [
    ("BlackHoleCluster", "STATIC", ""), ("InboundPassthroughClusterIpv4", "ORIGINAL_DST", ""),
    ("PassthroughCluster", "ORIGINAL_DST", ""),
    *[(f"outbound|{p}||istio-egressgateway.istio-system.svc.cluster.local", "EDS", "") for p in (80, 443, 15443)],
    *[(f"outbound|{p}||istio-ingressgateway.istio-system.svc.cluster.local", "EDS", "")
      for p in (80, 443, 15021, 15443, 31400)],
    *[(f"outbound|{p}||istiod.istio-system.svc.cluster.local", "EDS", "") for p in (443, 853, 15010, 15012, 15014)],
    ("outbound|53||kube-dns.kube-system.svc.cluster.local", "EDS", ""),
    ("outbound|9153||kube-dns.kube-system.svc.cluster.local", "EDS", ""),
    ("outbound|443||kubernetes.default.svc.cluster.local", "EDS", ""),
    ("outbound|80||proxy.default.svc.cluster.local", "EDS", ""),
    ("outbound|443||raw.githubusercontent.com", "STRICT_DNS", "github"),
    ("outbound|80||webserver.default.svc.cluster.local", "EDS", "webserver"),
    ("inbound|80|http-web|webserver.default.svc.cluster.local", "STATIC", ""),
    ("outbound|80|v1|webserver.default.svc.cluster.local", "EDS", "webserver"),
    ("outbound|80|v2|webserver.default.svc.cluster.local", "EDS", "webserver"),
    ("outbound|80||webserverv1.default.svc.cluster.local", "EDS", ""),
    ("inbound|80|http-web|webserverv1.default.svc.cluster.local", "STATIC", ""),
    ("outbound|80||webserverv2.default.svc.cluster.local", "EDS", ""),
]


def test_seed_cluster_rows(seed):
    got = sorted((name, C.DiscoveryType.Name(c.type), istio_config(c).rpartition("/")[2]) for name, c in seed.items())
    assert got == sorted(SEED_ROWS)
    dr = istio_config(seed["outbound|443||raw.githubusercontent.com"])
    assert dr == "/apis/networking.istio.io/v1alpha3/namespaces/default/destination-rule/github"


def test_seed_cluster_order_is_istiods(seed):
    names = list(seed)
    assert names[-5:] == ["BlackHoleCluster", "PassthroughCluster",
                          "inbound|80|http-web|webserver.default.svc.cluster.local",
                          "inbound|80|http-web|webserverv1.default.svc.cluster.local", "InboundPassthroughClusterIpv4"]
    assert all(n.startswith("outbound|") for n in names[:-5])


def test_eds_cluster_defaults(seed):
    c = seed["outbound|80||proxy.default.svc.cluster.local"]
    assert c.type == C.EDS and c.eds_cluster_config.service_name == c.name
    src = c.eds_cluster_config.eds_config
    assert src.HasField("ads") and src.initial_fetch_timeout.seconds == 0 and src.resource_api_version == 2
    assert (c.connect_timeout.seconds, c.lb_policy) == (10, C.ROUND_ROBIN)
    [th] = c.circuit_breakers.thresholds
    assert (th.max_connections.value, th.max_pending_requests.value, th.max_requests.value,
            th.max_retries.value) == (MAX, MAX, MAX, MAX)
    # `web` is a sniffed port: the upstream speaks whatever the client spoke
    opts = http_options(c)
    assert opts.use_downstream_protocol_config.HasField("http_protocol_options")
    assert opts.use_downstream_protocol_config.http2_protocol_options.max_concurrent_streams.value == 1073741824
    # plain HTTP ports get no protocol options
    assert http_options(seed["outbound|80||webserverv1.default.svc.cluster.local"]) is None
    assert http_options(seed["outbound|15010||istiod.istio-system.svc.cluster.local"]).explicit_http_config \
        .HasField("http2_protocol_options")  # grpc-xds is HTTP/2


def test_auto_mtls_transport_socket_matches(seed):
    c = seed["outbound|80|v1|webserver.default.svc.cluster.local"]
    assert not c.HasField("transport_socket")
    istio, plain = c.transport_socket_matches
    assert (istio.name, dict(istio.match), plain.name, dict(plain.match)) == \
        ("tlsMode-istio", {"tlsMode": "istio"}, "tlsMode-disabled", {})
    assert plain.transport_socket.name == "envoy.transport_sockets.raw_buffer"
    ctx = tls_ctx(istio.transport_socket)
    assert ctx.sni == "outbound_.80_.v1_.webserver.default.svc.cluster.local"
    common = ctx.common_tls_context
    assert list(common.alpn_protocols) == ["istio-peer-exchange", "istio"]
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == ["default"]
    cvc = common.combined_validation_context
    assert cvc.validation_context_sds_secret_config.name == "ROOTCA"
    sds = cvc.validation_context_sds_secret_config.sds_config.api_config_source
    assert sds.grpc_services[0].envoy_grpc.cluster_name == "sds-grpc"
    assert [m.matcher.exact for m in cvc.default_validation_context.match_typed_subject_alt_names] == \
        ["spiffe://cluster.local/ns/default/sa/default"]
    assert c.metadata.filter_metadata["istio"]["subset"] == "v1"


def test_mesh_external_and_passthrough_clusters_get_no_auto_mtls(seed, shop):
    gh = seed["outbound|443||raw.githubusercontent.com"]
    assert not gh.transport_socket_matches and not gh.HasField("transport_socket")
    ratings = shop["outbound|6000||ratings.shop.svc.cluster.local"]
    assert (ratings.type, ratings.lb_policy, len(ratings.transport_socket_matches)) == \
        (C.ORIGINAL_DST, C.CLUSTER_PROVIDED, 0)


def test_dns_cluster_from_service_entry(seed):
    c = seed["outbound|443||raw.githubusercontent.com"]
    assert (c.type, c.dns_lookup_family) == (C.STRICT_DNS, C.V4_ONLY)
    [lle] = c.load_assignment.endpoints
    [ep] = lle.lb_endpoints
    sa = ep.endpoint.address.socket_address
    assert (c.load_assignment.cluster_name, sa.address, sa.port_value) == (c.name, "raw.githubusercontent.com", 443)
    # the github DR's connection pool
    assert c.circuit_breakers.thresholds[0].max_connections.value == 100
    assert c.connect_timeout.seconds == 5


def test_connection_pool_outlier_and_lb(shop):
    c = shop["outbound|9080||reviews.shop.svc.cluster.local"]
    th = c.circuit_breakers.thresholds[0]
    assert (th.max_connections.value, th.max_pending_requests.value, th.max_requests.value,
            th.max_retries.value) == (100, 10, 1000, 3)
    assert (c.connect_timeout.seconds, c.connect_timeout.nanos) == (0, 300_000_000)
    ka = c.upstream_connection_options.tcp_keepalive
    assert (ka.keepalive_probes.value, ka.keepalive_time.value, ka.keepalive_interval.value) == (3, 7200, 75)
    opts = http_options(c)
    assert opts.explicit_http_config.HasField("http2_protocol_options")  # h2UpgradePolicy: UPGRADE
    assert opts.common_http_protocol_options.idle_timeout.seconds == 3600
    assert opts.common_http_protocol_options.max_requests_per_connection.value == 5
    od = c.outlier_detection
    assert (od.consecutive_5xx.value, od.enforcing_consecutive_5xx.value, od.consecutive_gateway_failure.value,
            od.enforcing_consecutive_gateway_failure.value, od.interval.seconds, od.base_ejection_time.seconds,
            od.max_ejection_percent.value, od.enforcing_success_rate.value) == (7, 100, 3, 100, 300, 900, 50, 0)
    assert c.common_lb_config.HasField("healthy_panic_threshold")
    assert c.common_lb_config.healthy_panic_threshold.value == 0
    assert (c.lb_policy, c.ring_hash_lb_config.minimum_ring_size.value) == (C.RING_HASH, 1024)
    assert not c.common_lb_config.HasField("locality_weighted_lb_config")  # not with ring hash


def test_port_level_settings_replace_the_whole_policy(shop):
    c = shop["outbound|9081||reviews.shop.svc.cluster.local"]
    assert c.lb_policy == C.RANDOM
    assert c.circuit_breakers.thresholds[0].max_connections.value == MAX  # no pool from the top level
    assert not c.HasField("outlier_detection")


def test_subset_policy_overrides_block_by_block(shop):
    v2 = shop["outbound|9080|v2|reviews.shop.svc.cluster.local"]
    assert v2.lb_policy == C.LEAST_REQUEST
    assert v2.circuit_breakers.thresholds[0].max_connections.value == 100   # inherited connection pool
    assert v2.outlier_detection.consecutive_5xx.value == 7                  # inherited outlier detection
    assert v2.common_lb_config.HasField("locality_weighted_lb_config")      # outlier + locality LB on
    assert not v2.transport_socket_matches                                  # explicit ISTIO_MUTUAL
    ctx = tls_ctx(v2.transport_socket)
    assert ctx.sni == "outbound_.9080_.v2_.reviews.shop.svc.cluster.local"
    assert list(ctx.common_tls_context.alpn_protocols) == ["istio-peer-exchange", "istio", "h2"]
    v1 = shop["outbound|9080|v1|reviews.shop.svc.cluster.local"]
    assert v1.lb_policy == C.RING_HASH and len(v1.transport_socket_matches) == 2


def test_simple_and_mutual_tls(shop):
    pay = shop["outbound|443||api.payments.example.com"]
    ctx = tls_ctx(pay.transport_socket)
    assert ctx.sni == "api.payments.example.com" and ctx.common_tls_context.HasField("validation_context")
    plain = shop["outbound|80||api.payments.example.com"]  # port-level tls DISABLE, ring hash 2048
    assert not plain.HasField("transport_socket")
    assert (plain.lb_policy, plain.ring_hash_lb_config.minimum_ring_size.value) == (C.RING_HASH, 2048)
    billing = tls_ctx(shop["outbound|8080||billing.shop.internal"].transport_socket)
    c = billing.common_tls_context
    assert [s.name for s in c.tls_certificate_sds_secret_configs] == ["file-cert:/etc/certs/client.pem~/etc/certs/key.pem"]
    assert c.combined_validation_context.validation_context_sds_secret_config.name == "file-root:/etc/certs/ca.pem"
    assert [m.matcher.exact for m in c.combined_validation_context.default_validation_context
            .match_typed_subject_alt_names] == ["billing.shop.internal"]


def test_maglev_and_passthrough_subset(shop):
    fe = shop["outbound|80||frontend.shop.svc.cluster.local"]
    assert (fe.lb_policy, fe.maglev_lb_config.table_size.value) == (C.MAGLEV, 65537)
    allsub = shop["outbound|80|all|frontend.shop.svc.cluster.local"]
    assert (allsub.type, allsub.lb_policy, allsub.HasField("eds_cluster_config")) == \
        (C.ORIGINAL_DST, C.CLUSTER_PROVIDED, False)


def test_service_entry_resolutions(shop):
    assert shop["outbound|3306||corp.internal"].type == C.ORIGINAL_DST           # NONE
    assert shop["outbound|8080||billing.shop.internal"].type == C.EDS            # STATIC → EDS
    assert shop["outbound|443|eu|api.payments.example.com"].type == C.STRICT_DNS
    eu = shop["outbound|443|eu|api.payments.example.com"].load_assignment
    assert [e.endpoint.address.socket_address.address for lle in eu.endpoints for e in lle.lb_endpoints] == \
        ["eu.payments.example.com"]
    legacy = shop["outbound|80||legacy.shop.svc.cluster.local"]  # 1.7: ExternalName → DNS to the external name
    assert legacy.type == C.STRICT_DNS and not legacy.transport_socket_matches
    sa = legacy.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sa.address, sa.port_value) == ("legacy.example.com", 80)


def test_dns_subset_without_endpoints_is_not_emitted():
    text = """
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: ext, namespace: default}
spec: {hosts: [ext.example.com], resolution: DNS, ports: [{number: 80, name: http, protocol: HTTP}],
       endpoints: [{address: a.example.com, labels: {v: a}}]}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: ext, namespace: default}
spec: {host: ext.example.com, subsets: [{name: a, labels: {v: a}}, {name: nope, labels: {v: zzz}}]}
"""
    cds = snapshot_of(push_of(text), "sidecar~10.0.0.1~x.default~default.svc.cluster.local")[CLUSTER]
    assert "outbound|80|a|ext.example.com" in cds and "outbound|80|nope|ext.example.com" not in cds


def test_peer_authentication_disable_turns_auto_mtls_off(shop):
    assert not shop["outbound|8080||toolbox.tools.svc.cluster.local"].transport_socket_matches  # tools: DISABLE
    assert shop["outbound|8000||internal-only.shop.svc.cluster.local"].transport_socket_matches  # shop: STRICT


def test_inbound_and_passthrough_clusters(seed, shop):
    c = seed["inbound|80|http-web|webserver.default.svc.cluster.local"]
    assert c.type == C.STATIC and c.load_assignment.cluster_name == c.name
    sa = c.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sa.address, sa.port_value) == ("127.0.0.1", 3030)
    assert not c.HasField("metadata")  # 1.7: only a DR with a trafficPolicy adds metadata inbound
    ipt = seed["InboundPassthroughClusterIpv4"]
    assert (ipt.type, ipt.lb_policy, ipt.upstream_bind_config.source_address.address) == \
        (C.ORIGINAL_DST, C.CLUSTER_PROVIDED, "127.0.0.6")
    pt = seed["PassthroughCluster"]
    assert http_options(pt).HasField("use_downstream_protocol_config")
    bh = seed["BlackHoleCluster"]
    assert (bh.type, bh.lb_policy, bh.HasField("load_assignment")) == (C.STATIC, C.ROUND_ROBIN, False)
    # inbound cluster of a sniffed port uses the downstream protocol; a DR connection pool applies inbound
    assert http_options(shop["inbound|7070||frontend.shop.svc.cluster.local"]).HasField(
        "use_downstream_protocol_config")
    fe_in = shop["inbound|80|http|frontend.shop.svc.cluster.local"]
    assert fe_in.metadata.filter_metadata["istio"]["config"].endswith("/destination-rule/frontend")


def test_gateway_clusters(features_push):
    cds = snapshot_of(features_push, INGRESS)[CLUSTER]
    assert cds["outbound|6000||ratings.shop.svc.cluster.local"].type == C.EDS  # gateways: EDS for headless too
    assert "PassthroughCluster" not in cds and "BlackHoleCluster" in cds
    assert not any(n.startswith("inbound|") for n in cds)
    assert http_options(cds["outbound|7070||frontend.shop.svc.cluster.local"]) is None  # no sniffing upstream
    # AUTO_PASSTHROUGH servers add SNI-DNAT clusters (no TLS: the client's mTLS passes through)
    dnat = cds["outbound_.9080_._.reviews.shop.svc.cluster.local"]
    assert dnat.type == C.EDS and not dnat.transport_socket_matches and not dnat.HasField("transport_socket")
    assert "outbound_.9080_.v1_.reviews.shop.svc.cluster.local" in cds
    assert not any(n.startswith("outbound_.") and "payments" in n for n in cds)  # mesh-external: none


def test_sidecar_scope_limits_clusters(features_push):
    cds = snapshot_of(features_push, TOOLBOX)[CLUSTER]
    outbound = sorted(n for n in cds if n.startswith("outbound|"))
    assert outbound == sorted(["outbound|6000||ratings.shop.svc.cluster.local",
                        "outbound|6080||ratings.shop.svc.cluster.local",
                        "outbound|8080||toolbox.tools.svc.cluster.local",
                        "outbound|9080||reviews.shop.svc.cluster.local",
                        "outbound|9080|v1|reviews.shop.svc.cluster.local",
                        "outbound|9080|v2|reviews.shop.svc.cluster.local"])


def test_sidecar_ingress_clusters(features_push):
    cds = snapshot_of(features_push, "sidecar~10.4.0.10~app-1.legacy~legacy.svc.cluster.local")[CLUSTER]
    inbound = {n: c for n, c in cds.items() if n.startswith("inbound|")}
    assert set(inbound) == {"inbound|9080|http-in|app.legacy.svc.cluster.local",
                            "inbound|9443|tcp-sock|app-ingress.legacy"}  # no service on 9443: the Sidecar's name
    sa = inbound["inbound|9080|http-in|app.legacy.svc.cluster.local"].load_assignment.endpoints[0] \
        .lb_endpoints[0].endpoint.address.socket_address
    assert (sa.address, sa.port_value) == ("127.0.0.1", 8080)  # the defaultEndpoint
    pipe = inbound["inbound|9443|tcp-sock|app-ingress.legacy"].load_assignment.endpoints[0] \
        .lb_endpoints[0].endpoint.address.pipe
    assert pipe.path == "/var/run/app.sock"
