"""LDS: outbound per-port listeners (1.7 shapes and conflict rules), virtualOutbound, virtualInbound, gateways."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from mizzen.services.translator.pb import JSON_LOG_FORMAT
from tests.translator_helpers import (
    FEATURES,
    LISTENER,
    SEED_MESH,
    SEED_PROXY,
    load,
    push_of,
    snapshot_of,
    unpack,
)

HTTP_ALPN = ["http/1.0", "http/1.1", "h2c"]
FRONTEND = "sidecar~10.1.0.10~frontend-1.shop~shop.svc.cluster.local"
RATINGS = "sidecar~10.1.0.30~ratings-0.shop~shop.svc.cluster.local"
REVIEWS = "sidecar~10.1.0.20~reviews-v1.shop~shop.svc.cluster.local"
TOOLBOX = "sidecar~10.2.0.10~toolbox-1.tools~tools.svc.cluster.local"
INGRESS = "router~10.3.0.10~ingress-1.edge~edge.svc.cluster.local"


@pytest.fixture(scope="module")
def seed():
    return snapshot_of(push_of(load(SEED_MESH)), SEED_PROXY)[LISTENER]


@pytest.fixture(scope="module")
def features_push():
    return push_of(load(FEATURES))


@pytest.fixture(scope="module")
def shop(features_push):
    return snapshot_of(features_push, FRONTEND)[LISTENER]


def hcm(fc) -> hcm_pb.HttpConnectionManager:
    [f] = [f for f in fc.filters if f.name == "envoy.http_connection_manager"]
    return unpack(f.typed_config, hcm_pb.HttpConnectionManager)


def tcp(fc) -> tcp_proxy_pb2.TcpProxy:
    [f] = [f for f in fc.filters if f.name == "envoy.tcp_proxy"]
    return unpack(f.typed_config, tcp_proxy_pb2.TcpProxy)


def destination(fc) -> str:
    """What istioctl 1.7 prints in DESTINATION for a chain."""
    names = [f.name for f in fc.filters]
    if "envoy.http_connection_manager" in names:
        h = hcm(fc)
        return f"Route: {h.rds.route_config_name}" if h.HasField("rds") else f"Inline: {h.route_config.name}"
    c = tcp(fc).cluster
    return c if "Cluster" in c else f"Cluster: {c}"


def match_text(fc) -> str:
    m = fc.filter_chain_match
    parts = []
    if m.server_names:
        parts.append("SNI: " + ",".join(m.server_names))
    if m.transport_protocol:
        parts.append("Trans: " + m.transport_protocol)
    if list(m.application_protocols) == HTTP_ALPN:
        parts.append("App: HTTP")
    elif m.application_protocols:
        parts.append("App: " + ",".join(m.application_protocols))
    if m.prefix_ranges:
        parts.append("Addr: " + ",".join(f"{r.address_prefix}/{r.prefix_len.value}" for r in m.prefix_ranges))
    return "; ".join(parts) or "ALL"


def rows(listener) -> list[tuple[str, str]]:
    return [(match_text(fc), destination(fc)) for fc in listener.filter_chains]


def test_seed_port_80_rows(seed):
    # the seed's `istioctl proxy-config listener --port 80` table
    assert rows(seed["0.0.0.0_80"]) == [("App: HTTP", "Route: 80"), ("ALL", "PassthroughCluster")]
    assert rows(seed["10.200.1.132_80"]) == [("ALL", "Cluster: outbound|80||proxy.default.svc.cluster.local"),
                                             ("App: HTTP", "Route: proxy.default.svc.cluster.local:80")]
    assert sorted(n for n in seed if n.endswith("_80")) == ["0.0.0.0_80", "10.200.1.132_80"]


def test_seed_listener_set(seed):
    assert set(seed) == {
        "10.200.1.113_443", "10.200.1.113_15443", "10.200.1.101_443", "10.200.1.101_31400", "10.200.1.101_15443",
        "10.200.1.62_15012", "10.200.1.62_443", "10.200.1.10_53", "10.200.1.1_443", "0.0.0.0_443", "0.0.0.0_80",
        "10.200.1.101_15021", "0.0.0.0_15010", "0.0.0.0_15014", "10.200.1.62_853", "10.200.1.10_9153",
        "10.200.1.132_80", "virtualOutbound", "virtualInbound"}
    assert list(seed)[-2:] == ["virtualOutbound", "virtualInbound"]


def test_passthrough_filter_chain_shape(seed):
    fc = seed["0.0.0.0_80"].filter_chains[1]
    assert fc.name == "PassthroughFilterChain" and fc.HasField("filter_chain_match")
    assert fc.filter_chain_match.ByteSize() == 0 and tcp(fc).stat_prefix == "PassthroughCluster"


def test_outbound_listener_common_fields(seed):
    sniffed = seed["0.0.0.0_80"]
    assert (sniffed.bind_to_port.value, sniffed.HasField("bind_to_port")) == (False, True)
    assert sniffed.traffic_direction == base_pb2.OUTBOUND
    assert [f.name for f in sniffed.listener_filters] == ["envoy.filters.listener.tls_inspector",
                                                          "envoy.filters.listener.http_inspector"]
    assert sniffed.listener_filters_timeout.nanos == 100_000_000 and sniffed.continue_on_listener_filters_timeout
    plain_tcp = seed["10.200.1.1_443"]
    assert not plain_tcp.listener_filters and not plain_tcp.HasField("listener_filters_timeout")
    assert rows(plain_tcp) == [("ALL", "Cluster: outbound|443||kubernetes.default.svc.cluster.local")]


def test_outbound_http_connection_manager(seed):
    h = hcm(seed["0.0.0.0_80"].filter_chains[0])
    assert h.stat_prefix == "outbound_0.0.0.0_80" and h.codec_type == h.AUTO
    assert h.rds.route_config_name == "80" and h.rds.config_source.HasField("ads")
    assert [f.name for f in h.http_filters] == ["envoy.filters.http.cors", "envoy.filters.http.fault",
                                                "envoy.filters.http.router"]
    assert (h.normalize_path.value, h.use_remote_address.value, h.stream_idle_timeout.seconds) == (True, False, 0)
    assert [u.upgrade_type for u in h.upgrade_configs] == ["websocket"]
    [log] = h.access_log
    from envoy.extensions.access_loggers.file.v3 import file_pb2

    cfg = unpack(log.typed_config, file_pb2.FileAccessLog)
    assert cfg.path == "/dev/stdout"
    assert set(cfg.log_format.json_format.fields) == set(JSON_LOG_FORMAT)  # the seed's access-log fields
    assert h.tracing.random_sampling.value == 1.0


def test_route_names_per_protocol(seed):
    rds = {hcm(fc).rds.route_config_name for lst in seed.values() for fc in lst.filter_chains
           if any(f.name == "envoy.http_connection_manager" for f in fc.filters) and hcm(fc).HasField("rds")}
    assert rds == {"80", "15010", "15014", "proxy.default.svc.cluster.local:80",
                   "istio-ingressgateway.istio-system.svc.cluster.local:15021",
                   "kube-dns.kube-system.svc.cluster.local:9153", "istiod.istio-system.svc.cluster.local:853"}


def test_tls_port_without_vip_matches_sni(seed, shop):
    assert rows(seed["0.0.0.0_443"]) == [("SNI: raw.githubusercontent.com",
                                          "Cluster: outbound|443||raw.githubusercontent.com"),
                                         ("ALL", "PassthroughCluster")]
    assert [f.name for f in seed["0.0.0.0_443"].listener_filters] == ["envoy.filters.listener.tls_inspector"]
    # a VirtualService tls route supplies the SNI match and its metadata
    [vs_chain, _] = shop["0.0.0.0_8443"].filter_chains
    assert match_text(vs_chain) == "SNI: partner.example.org"
    assert vs_chain.metadata.filter_metadata["istio"]["config"].endswith("/virtual-service/partner-tls")


def test_cidr_service_entry_and_tcp_virtual_service(shop):
    assert rows(shop["0.0.0.0_3306"]) == [("Addr: 172.16.0.0/16", "Cluster: outbound|3306||corp.internal"),
                                          ("ALL", "PassthroughCluster")]
    subnet, default = shop["10.96.0.10_5432"].filter_chains
    assert match_text(subnet) == "Addr: 10.96.0.0/16" and match_text(default) == "ALL"
    t = tcp(subnet)
    assert t.stat_prefix == "frontend-tcp.shop"
    assert [(c.name, c.weight) for c in t.weighted_clusters.clusters] == [
        ("outbound|5432|v1|frontend.shop.svc.cluster.local", 70),
        ("outbound|5432|all|frontend.shop.svc.cluster.local", 30)]
    assert tcp(default).cluster == "outbound|5432||frontend.shop.svc.cluster.local"


def test_sniffed_port_on_vip(shop):
    assert rows(shop["10.96.0.10_7070"]) == [("ALL", "Cluster: outbound|7070||frontend.shop.svc.cluster.local"),
                                             ("App: HTTP", "Route: frontend.shop.svc.cluster.local:7070")]


def test_headless_tcp_ports_get_one_listener_per_endpoint(shop, features_push):
    assert {"10.1.0.30_6000", "10.1.0.31_6000"} <= set(shop)
    assert rows(shop["0.0.0.0_6080"])[0] == ("App: HTTP", "Route: 6080")  # HTTP stays on the wildcard
    own = snapshot_of(features_push, RATINGS)[LISTENER]
    assert "10.1.0.30_6000" not in own and "10.1.0.31_6000" in own  # never a listener to the proxy itself


CONFLICTS = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.0.0.1, ports: [{name: http, port: 8080}]}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: raw-tcp, namespace: default}
spec: {hosts: [raw.example.com], resolution: DNS, ports: [{number: 8080, name: tcp, protocol: TCP}]}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: tls-a, namespace: default}
spec: {hosts: [a.example.com], resolution: DNS, ports: [{number: 9443, name: tls, protocol: TLS}]}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: tls-b, namespace: default}
spec: {hosts: [b.example.com], resolution: DNS, ports: [{number: 9443, name: tls, protocol: TLS}]}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: tcp-1, namespace: default}
spec: {hosts: [one.example.com], resolution: DNS, ports: [{number: 7000, name: tcp, protocol: TCP}]}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: tcp-2, namespace: default, creationTimestamp: "2030-01-01T00:00:00Z"}
spec: {hosts: [two.example.com], resolution: DNS, ports: [{number: 7000, name: tcp, protocol: TCP}]}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: auto, namespace: default}
spec: {hosts: [auto.example.com], resolution: DNS, ports: [{number: 6000, name: foo, protocol: FOO}]}
"""


def test_listener_conflict_rules():
    lds = snapshot_of(push_of(CONFLICTS), "sidecar~10.0.0.9~x.default~default.svc.cluster.local")[LISTENER]
    # HTTP and TCP on the wildcard 8080: merged, the HTTP chain sniffed by ALPN; the TCP chain is the fallback
    assert sorted(rows(lds["0.0.0.0_8080"])) == sorted([("ALL", "Cluster: outbound|8080||raw.example.com"),
                                                        ("App: HTTP", "Route: 8080")])
    # two TLS services on one port: distinct SNI chains, then the passthrough fallback
    assert rows(lds["0.0.0.0_9443"]) == [("SNI: a.example.com", "Cluster: outbound|9443||a.example.com"),
                                         ("SNI: b.example.com", "Cluster: outbound|9443||b.example.com"),
                                         ("ALL", "PassthroughCluster")]
    # two plain TCP services without VIPs: identical matches, the older one wins
    assert rows(lds["0.0.0.0_7000"]) == [("ALL", "Cluster: outbound|7000||one.example.com")]
    # a sniffed port with no VIP lands on the wildcard with route "<port>"
    assert rows(lds["0.0.0.0_6000"]) == [("ALL", "Cluster: outbound|6000||auto.example.com"),
                                         ("App: HTTP", "Route: 6000")]


def test_reserved_proxy_ports_are_skipped():
    text = """
apiVersion: v1
kind: Service
metadata: {name: sneaky, namespace: default}
spec: {ports: [{name: http, port: 15021}, {name: http-prom, port: 15090}, {name: http-ok, port: 8081}]}
"""
    lds = snapshot_of(push_of(text), "sidecar~10.0.0.9~x.default~default.svc.cluster.local")[LISTENER]
    assert "0.0.0.0_15021" not in lds and "0.0.0.0_15090" not in lds and "0.0.0.0_8081" in lds


def test_virtual_outbound(seed, features_push):
    vo = seed["virtualOutbound"]
    sa = vo.address.socket_address
    assert (sa.address, sa.port_value, vo.use_original_dst.value, vo.traffic_direction) == \
        ("0.0.0.0", 15001, True, base_pb2.OUTBOUND)
    assert [(fc.name, destination(fc)) for fc in vo.filter_chains] == [
        ("virtualOutbound-blackhole", "BlackHoleCluster"), ("virtualOutbound-catchall-tcp", "PassthroughCluster")]
    assert vo.filter_chains[0].filter_chain_match.destination_port.value == 15001
    tools = snapshot_of(features_push, TOOLBOX)[LISTENER]  # REGISTRY_ONLY
    assert destination(tools["virtualOutbound"].filter_chains[1]) == "BlackHoleCluster"
    assert rows(tools["0.0.0.0_8080"])[-1] == ("ALL", "BlackHoleCluster")


def test_sidecar_egress_port_listener(features_push):
    tools = snapshot_of(features_push, TOOLBOX)[LISTENER]
    assert set(tools) == {"0.0.0.0_9080", "0.0.0.0_8080", "virtualOutbound", "virtualInbound"}


def inbound_rows(listener):
    return [(fc.name, fc.filter_chain_match.destination_port.value, fc.filter_chain_match.transport_protocol,
             list(fc.filter_chain_match.application_protocols), fc.HasField("transport_socket"), destination(fc))
            for fc in listener.filter_chains]


def test_virtual_inbound_permissive_seed(seed):
    vi = seed["virtualInbound"]
    sa = vi.address.socket_address
    assert (sa.port_value, vi.traffic_direction, vi.use_original_dst.value) == (15006, base_pb2.INBOUND, True)
    assert [f.name for f in vi.listener_filters] == ["envoy.filters.listener.original_dst",
                                                      "envoy.filters.listener.tls_inspector",
                                                      "envoy.filters.listener.http_inspector"]
    assert vi.listener_filters_timeout.seconds == 1 and vi.continue_on_listener_filters_timeout
    cluster = "inbound|80|http-web|webserver.default.svc.cluster.local"
    assert inbound_rows(vi) == [
        ("virtualInbound", 0, "tls", ["istio-peer-exchange", "istio"], True, "InboundPassthroughClusterIpv4"),
        ("virtualInbound", 0, "", [], False, "InboundPassthroughClusterIpv4"),
        ("virtualInbound-catchall-http", 0, "tls", HTTP_ALPN + ["istio-http/1.0", "istio-http/1.1", "istio-h2"],
         True, "Inline: InboundPassthroughClusterIpv4"),
        ("virtualInbound-catchall-http", 0, "", HTTP_ALPN, False, "Inline: InboundPassthroughClusterIpv4"),
        # one set of chains per target port; the first service on 3030 (webserver) wins over webserverv1
        ("0.0.0.0_3030", 3030, "", ["istio", "istio-http/1.0", "istio-http/1.1", "istio-h2"], True,
         f"Inline: {cluster}"),
        ("0.0.0.0_3030", 3030, "", [], False, f"Inline: {cluster}"),
    ]


def test_inbound_http_chain_contents(seed):
    mtls_chain = seed["virtualInbound"].filter_chains[4]
    h = hcm(mtls_chain)
    assert h.stat_prefix == "inbound_0.0.0.0_3030" and h.server_name == "istio-envoy"
    assert h.forward_client_cert_details == h.APPEND_FORWARD
    assert (h.set_current_client_cert_details.subject.value, h.set_current_client_cert_details.uri,
            h.set_current_client_cert_details.dns) == (True, True, True)
    rc = h.route_config
    [vh] = rc.virtual_hosts
    [r] = vh.routes
    assert (rc.name, vh.name, list(vh.domains)) == \
        ("inbound|80|http-web|webserver.default.svc.cluster.local", "inbound|http|80", ["*"])
    assert (r.name, r.match.prefix, r.route.cluster, r.route.timeout.seconds, r.decorator.operation) == \
        ("default", "/", rc.name, 0, "webserver.default.svc.cluster.local:80/*")
    assert not r.route.HasField("retry_policy")
    ctx = unpack(mtls_chain.transport_socket.typed_config, tls_pb2.DownstreamTlsContext)
    assert ctx.require_client_certificate.value
    assert list(ctx.common_tls_context.alpn_protocols) == ["h2", "http/1.1"]
    assert [s.name for s in ctx.common_tls_context.tls_certificate_sds_secret_configs] == ["default"]
    cvc = ctx.common_tls_context.combined_validation_context
    assert cvc.validation_context_sds_secret_config.name == "ROOTCA"
    assert [m.matcher.prefix for m in cvc.default_validation_context.match_typed_subject_alt_names] == \
        ["spiffe://cluster.local/"]


def test_virtual_inbound_modes(features_push, shop):
    strict = snapshot_of(features_push, REVIEWS)[LISTENER]["virtualInbound"]  # namespace STRICT
    assert [r for r in inbound_rows(strict) if r[1] == 9080] == [
        ("0.0.0.0_9080", 9080, "", [], True, "Inline: inbound|9080|http-web|reviews.shop.svc.cluster.local")]
    assert [r[:5] for r in inbound_rows(strict) if r[1] == 0] == [
        ("virtualInbound", 0, "tls", [], True),
        ("virtualInbound-catchall-http", 0, "tls", HTTP_ALPN + ["istio-http/1.0", "istio-http/1.1", "istio-h2"], True)]
    disabled = snapshot_of(features_push, TOOLBOX)[LISTENER]["virtualInbound"]
    assert not any(r[4] for r in inbound_rows(disabled))
    assert "envoy.filters.listener.tls_inspector" not in [f.name for f in disabled.listener_filters]
    # frontend: PERMISSIVE workload policy, 5432 DISABLE at port level, a sniffed port gets five chains
    vi = inbound_rows(shop["virtualInbound"])
    assert [r[2:5] for r in vi if r[1] == 5432] == [("", [], False)]
    assert [r[2:5] for r in vi if r[1] == 7070] == [
        ("tls", ["istio-http/1.0", "istio-http/1.1", "istio-h2"], True), ("", HTTP_ALPN, False),
        ("tls", ["istio-peer-exchange", "istio"], True), ("", [], False), ("tls", [], False)]
    # port-level STRICT on an undeclared port: its own passthrough chains
    assert [r[:5] for r in vi if r[1] == 9999] == [
        ("virtualInbound", 9999, "tls", [], True),
        ("virtualInbound-catchall-http", 9999, "tls", HTTP_ALPN + ["istio-http/1.0", "istio-http/1.1", "istio-h2"],
         True)]
    # service chains sorted by name, after the passthrough chains
    names = [r[0] for r in vi if r[0].startswith("0.0.0.0_")]
    assert names == sorted(names)


def test_gateway_listeners(features_push):
    lds = snapshot_of(features_push, INGRESS)[LISTENER]
    assert set(lds) == {"0.0.0.0_8080", "0.0.0.0_8443", "0.0.0.0_31400", "0.0.0.0_15443", "0.0.0.0_9443",
                        "0.0.0.0_15444"}  # 80→8080, 443→8443 (the gateway Service's targetPorts)
    http = lds["0.0.0.0_8080"]
    assert not http.HasField("bind_to_port")  # gateways really bind
    h = hcm(http.filter_chains[0])
    assert (h.rds.route_config_name, h.use_remote_address.value) == ("http.80", True)
    https = lds["0.0.0.0_8443"]
    assert rows(https) == [("SNI: shop.example.com", "Route: https.443.https.public.edge"),
                           ("SNI: partners.example.com", "Route: https.443.https-mtls.public.edge")]
    simple, mutual = (unpack(fc.transport_socket.typed_config, tls_pb2.DownstreamTlsContext)
                      for fc in https.filter_chains)
    assert [s.name for s in simple.common_tls_context.tls_certificate_sds_secret_configs] == ["kubernetes://shop-cert"]
    assert not simple.require_client_certificate.value and mutual.require_client_certificate.value
    assert mutual.common_tls_context.combined_validation_context.validation_context_sds_secret_config.name == \
        "kubernetes://partner-cert-cacert"
    assert rows(lds["0.0.0.0_15443"]) == [("SNI: a.passthrough.example.com",
                                           "Cluster: outbound|9090||frontend.shop.svc.cluster.local")]
    assert rows(lds["0.0.0.0_31400"]) == [("ALL", "Cluster: outbound|5432||frontend.shop.svc.cluster.local")]
    # TLS terminated at the gateway, then TCP routes; AUTO_PASSTHROUGH routes by SNI to SNI-DNAT clusters
    [term] = lds["0.0.0.0_9443"].filter_chains
    assert match_text(term) == "SNI: db.example.com" and term.HasField("transport_socket")
    assert tcp(term).cluster == "outbound|5432||frontend.shop.svc.cluster.local"
    [auto] = lds["0.0.0.0_15444"].filter_chains
    assert [f.name for f in auto.filters] == ["envoy.filters.network.sni_cluster", "envoy.tcp_proxy"]
    assert match_text(auto) == "SNI: *.local"


def test_sidecar_ingress_listeners(features_push):
    lds = snapshot_of(features_push, "sidecar~10.4.0.10~app-1.legacy~legacy.svc.cluster.local")[LISTENER]
    vi = inbound_rows(lds["virtualInbound"])
    # the ingress port replaces the service's target port; the cluster is named after the ingress port
    assert [r for r in vi if r[1]] == [
        ("0.0.0.0_9080", 9080, "", ["istio", "istio-http/1.0", "istio-http/1.1", "istio-h2"], True,
         "Inline: inbound|9080|http-in|app.legacy.svc.cluster.local"),
        ("0.0.0.0_9080", 9080, "", [], False, "Inline: inbound|9080|http-in|app.legacy.svc.cluster.local")]
    # captureMode NONE: a real listener on the workload's address instead of a virtualInbound chain
    bound = lds["10.4.0.10_9443"]
    assert not bound.HasField("bind_to_port") and bound.traffic_direction == base_pb2.INBOUND
    assert rows(bound) == [("App: istio-peer-exchange,istio", "Cluster: inbound|9443|tcp-sock|app-ingress.legacy"),
                           ("ALL", "Cluster: inbound|9443|tcp-sock|app-ingress.legacy")]


def test_sidecar_egress_capture_none_binds_for_real(features_push):
    res = snapshot_of(features_push, "sidecar~10.4.0.10~app-1.legacy~legacy.svc.cluster.local")
    lst = res[LISTENER]["127.0.0.1_9000"]
    assert not lst.HasField("bind_to_port")  # a real bound port: the app talks to 127.0.0.1:9000 directly
    assert rows(lst) == [("ALL", "Route: 9000")]  # not on the wildcard: no sniffing, no passthrough chain
    assert "9000" in res["type.googleapis.com/envoy.config.route.v3.RouteConfiguration"]
    assert res[LISTENER]["0.0.0.0_80"].bind_to_port.value is False
