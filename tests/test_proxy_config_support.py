"""Shared helpers of the proxy-config tests (no tests here): the seed's tables, a table reader, the DNS
resolution a live Envoy does, and an Istio-1.7-shaped config dump of the seed's pod built by hand."""

from __future__ import annotations

import copy
import random
from pathlib import Path

SEED_MESH = Path(__file__).parent / "fixtures" / "seed-mesh"
SEED_TABLES = SEED_MESH / "tables"
POD = "webserverv1-84596579c6-xxvhd"

# The sidecar's own bootstrap clusters: not in a translated snapshot (they come with the bootstrap).
STATIC_CLUSTERS = ("agent", "prometheus_stats", "sds-grpc", "xds-grpc", "zipkin")

# What the seed's Envoy resolved its DNS names to (its xds-grpc host is istiod's ClusterIP).
SEED_DNS = {"raw.githubusercontent.com": "151.101.228.133", "istiod.istio-system.svc": "10.200.1.62"}


def seed_table(name: str) -> str:
    return (SEED_TABLES / f"{name}.txt").read_text()


def cells(table: str) -> list[list[str]]:
    """A printed table back into cells, by the header's column starts (tabwriter aligns every cell there)."""
    lines = table.rstrip("\n").split("\n")
    header = lines[0]
    starts = [0]
    i = 0
    while True:
        gap = header.find("  ", i)
        if gap < 0:
            break
        nxt = len(header) - len(header[gap:].lstrip(" "))
        starts.append(nxt)
        i = nxt
    out = []
    for line in lines:
        row = []
        for k, s in enumerate(starts):
            end = starts[k + 1] if k + 1 < len(starts) else None
            row.append(line[s:end].strip())
        out.append(row)
    return out


def resolve_dns(document: dict, names: dict[str, str]) -> dict:
    """The endpoint section as a live Envoy reports it: STRICT_DNS hosts replaced by the address they resolved
    to, or dropped when they did not resolve."""
    doc = copy.deepcopy(document)
    for section in doc["configs"]:
        if not section["@type"].endswith("EndpointsConfigDump"):
            continue
        for key in ("static_endpoint_configs", "dynamic_endpoint_configs"):
            for entry in section.get(key, []):
                for locality in entry["endpoint_config"].get("endpoints", []):
                    kept = []
                    for lb in locality.get("lb_endpoints", []):
                        sock = lb.get("endpoint", {}).get("address", {}).get("socket_address")
                        if sock is None or _is_ip(sock["address"]):
                            kept.append(lb)
                        elif sock["address"] in names:
                            lb["endpoint"]["hostname"] = sock["address"]
                            sock["address"] = names[sock["address"]]
                            kept.append(lb)
                    locality["lb_endpoints"] = kept
    return doc


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------------------
# An Istio 1.7 sidecar's config for the seed's pod, written out by hand in the shapes istiod 1.7 sent
# (legacy filter names, 1.7 vhost domain lists, PassthroughFilterChain, google_re2 regexes) — the input of
# the printer tests, independent of Mizzen's translator.

V1A3 = "/apis/networking.istio.io/v1alpha3/namespaces"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"

# (service fqdn, port, clusterIP, endpoint ip, target port, DR name)
_SERVICES = [
    ("istio-egressgateway.istio-system.svc.cluster.local", 80, "10.200.1.113", "10.200.0.141", 8080, None),
    ("istio-egressgateway.istio-system.svc.cluster.local", 443, "10.200.1.113", "10.200.0.141", 8443, None),
    ("istio-egressgateway.istio-system.svc.cluster.local", 15443, "10.200.1.113", "10.200.0.141", 15443, None),
    ("istio-ingressgateway.istio-system.svc.cluster.local", 80, "10.200.1.101", "10.200.0.146", 8080, None),
    ("istio-ingressgateway.istio-system.svc.cluster.local", 443, "10.200.1.101", "10.200.0.146", 8443, None),
    ("istio-ingressgateway.istio-system.svc.cluster.local", 15021, "10.200.1.101", "10.200.0.146", 15021, None),
    ("istio-ingressgateway.istio-system.svc.cluster.local", 15443, "10.200.1.101", "10.200.0.146", 15443, None),
    ("istio-ingressgateway.istio-system.svc.cluster.local", 31400, "10.200.1.101", "10.200.0.146", 31400, None),
    ("istiod.istio-system.svc.cluster.local", 443, "10.200.1.62", "10.200.0.137", 15017, None),
    ("istiod.istio-system.svc.cluster.local", 853, "10.200.1.62", "10.200.0.137", 15053, None),
    ("istiod.istio-system.svc.cluster.local", 15010, "10.200.1.62", "10.200.0.137", 15010, None),
    ("istiod.istio-system.svc.cluster.local", 15012, "10.200.1.62", "10.200.0.137", 15012, None),
    ("istiod.istio-system.svc.cluster.local", 15014, "10.200.1.62", "10.200.0.137", 15014, None),
    ("kube-dns.kube-system.svc.cluster.local", 53, "10.200.1.10", "10.200.0.139", 53, None),
    ("kube-dns.kube-system.svc.cluster.local", 9153, "10.200.1.10", "10.200.0.139", 9153, None),
    ("kubernetes.default.svc.cluster.local", 443, "10.200.1.1", "9.134.236.162", 6443, None),
    ("proxy.default.svc.cluster.local", 80, "10.200.1.132", "10.200.0.158", 3030, None),
    ("webserverv1.default.svc.cluster.local", 80, "10.200.1.246", "10.200.0.135", 3030, None),
    ("webserverv2.default.svc.cluster.local", 80, "10.200.1.211", "10.200.0.148", 3030, None),
]


def _meta(config: str | None = None, **extra) -> dict:
    istio = dict(extra)
    if config:
        istio["config"] = config
    return {"filter_metadata": {"istio": istio}} if istio else {}


def _sock(address: str, port: int) -> dict:
    return {"socket_address": {"address": address, "port_value": port}}


def _cla(name: str, hosts: list[tuple[str, int]]) -> dict:
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": _sock(a, p)}, "health_status": "HEALTHY"} for a, p in hosts]}]}


def _eds(name: str, dr: str | None = None, subset: str | None = None) -> dict:
    c = {"name": name, "type": "EDS", "connect_timeout": "10s",
         "eds_cluster_config": {"service_name": name, "eds_config": {"ads": {}, "resource_api_version": "V3"}}}
    meta = _meta(f"{V1A3}/default/destination-rule/{dr}" if dr else None, **({"subset": subset} if subset else {}))
    if meta:
        c["metadata"] = meta
    return c


def _static(name: str, hosts: list, ctype: str = "STATIC", meta: dict | None = None) -> dict:
    c = {"name": name, "type": ctype, "connect_timeout": "10s"}
    if ctype == "ORIGINAL_DST":
        c["lb_policy"] = "CLUSTER_PROVIDED"
    if hosts:
        c["load_assignment"] = {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": h}} for h in hosts]}]}
    if meta:
        c["metadata"] = meta
    return c


def _hcm(route: dict, prefix: str, legacy: bool = True) -> dict:
    cfg = {"@type": HCM, "stat_prefix": prefix, **route,
           "http_filters": [{"name": "envoy.router", "typed_config": {"@type": ROUTER}}]}
    return {"name": "envoy.http_connection_manager" if legacy else "envoy.filters.network.http_connection_manager",
            "typed_config": cfg}


def _rds(name: str) -> dict:
    return {"rds": {"route_config_name": name, "config_source": {"ads": {}, "resource_api_version": "V3"}}}


def _tcp(cluster: str) -> dict:
    return {"name": "envoy.tcp_proxy", "typed_config": {"@type": TCP, "stat_prefix": cluster, "cluster": cluster}}


_HTTP_ALPN = {"application_protocols": ["http/1.0", "http/1.1", "h2c"]}


def _http_listener(port: int) -> dict:
    """istiod 1.7's wildcard listener of an HTTP port: ALPN-matched HTTP chain, PassthroughFilterChain."""
    return {"name": f"0.0.0.0_{port}", "address": _sock("0.0.0.0", port), "filter_chains": [
        {"filter_chain_match": _HTTP_ALPN, "filters": [_hcm(_rds(str(port)), f"outbound_0.0.0.0_{port}")]},
        {"name": "PassthroughFilterChain", "filters": [_tcp("PassthroughCluster")]}]}


def _sniffed_listener(fqdn: str, port: int, vip: str) -> dict:
    """istiod 1.7's listener of an auto-detected port on a VIP: HTTP chain to `<fqdn>:<port>`, TCP chain."""
    return {"name": f"{vip}_{port}", "address": _sock(vip, port), "filter_chains": [
        {"filter_chain_match": _HTTP_ALPN, "filters": [_hcm(_rds(f"{fqdn}:{port}"), f"outbound_{vip}_{port}")]},
        {"filters": [_tcp(f"outbound|{port}||{fqdn}")]}]}


def _domains(fqdn: str, port: int, vip: str) -> list[str]:
    """istiod 1.7's generateVirtualHostDomains for a proxy in namespace default."""
    svc, ns = fqdn.split(".")[:2]
    forms = [fqdn]
    forms += [svc] if ns == "default" else []
    forms += [f"{svc}.{ns}.svc.cluster", f"{svc}.{ns}.svc", f"{svc}.{ns}", vip]
    out = []
    for f in forms:
        out += [f, f"{f}:{port}"]
    return out


def _default_route(cluster: str) -> dict:
    return {"name": "default", "match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}


def _vhost(fqdn: str, port: int, vip: str, routes: list | None = None) -> dict:
    return {"name": f"{fqdn}:{port}", "domains": _domains(fqdn, port, vip),
            "routes": routes or [_default_route(f"outbound|{port}||{fqdn}")]}


_ALLOW_ANY = {"name": "allow_any", "domains": ["*"],
              "routes": [{"name": "allow_any", "match": {"prefix": "/"}, "route": {"cluster": "PassthroughCluster"}}]}


def _inline(name: str, cluster: str, prefix: str = "/") -> dict:
    return {"route_config": {"name": name, "virtual_hosts": [{"name": "inbound|http|80", "domains": ["*"], "routes": [
        {"match": {"prefix": prefix}, "route": {"cluster": cluster}}]}]}}


def istio17_resources() -> tuple[dict, dict]:
    """(snapshot resources as JSON dicts by type URL, bootstrap JSON) of the seed's pod, Istio 1.7 shapes."""
    vip = {fqdn: ip for fqdn, _p, ip, *_ in _SERVICES}
    clusters = [_eds(f"outbound|{port}||{fqdn}") for fqdn, port, *_ in _SERVICES]
    clusters += [
        _eds("outbound|80||webserver.default.svc.cluster.local", "webserver"),
        _eds("outbound|80|v1|webserver.default.svc.cluster.local", "webserver", "v1"),
        _eds("outbound|80|v2|webserver.default.svc.cluster.local", "webserver", "v2"),
        _static("outbound|443||raw.githubusercontent.com", [_sock("raw.githubusercontent.com", 443)], "STRICT_DNS",
                _meta(f"{V1A3}/default/destination-rule/github")),
        _static("BlackHoleCluster", []),
        _static("PassthroughCluster", [], "ORIGINAL_DST"),
        _static("inbound|80|http-web|webserver.default.svc.cluster.local", [_sock("127.0.0.1", 3030)]),
        _static("inbound|80|http-web|webserverv1.default.svc.cluster.local", [_sock("127.0.0.1", 3030)]),
        _static("InboundPassthroughClusterIpv4", [], "ORIGINAL_DST"),
    ]
    endpoints = [_cla(f"outbound|{port}||{fqdn}", [(ip, target)]) for fqdn, port, _vip, ip, target, _dr in _SERVICES]
    endpoints += [
        _cla("outbound|80||webserver.default.svc.cluster.local", [("10.200.0.135", 3030), ("10.200.0.148", 3030)]),
        _cla("outbound|80|v1|webserver.default.svc.cluster.local", [("10.200.0.135", 3030)]),
        _cla("outbound|80|v2|webserver.default.svc.cluster.local", [("10.200.0.148", 3030)]),
    ]
    listeners = [
        _http_listener(80),
        _sniffed_listener("proxy.default.svc.cluster.local", 80, "10.200.1.132"),
        {"name": "10.200.1.62_443", "address": _sock("10.200.1.62", 443), "filter_chains": [
            {"filters": [_tcp("outbound|443||istiod.istio-system.svc.cluster.local")]}]},
        *(_http_listener(port) for port in (15010, 15014)),
        *(_sniffed_listener(fqdn, port, vip[fqdn]) for fqdn, port in (
            ("istio-ingressgateway.istio-system.svc.cluster.local", 15021),
            ("kube-dns.kube-system.svc.cluster.local", 9153),
            ("istiod.istio-system.svc.cluster.local", 853))),
        {"name": "virtualOutbound", "address": _sock("0.0.0.0", 15001), "filter_chains": [
            {"filter_chain_match": {"destination_port": 15001}, "filters": [_tcp("BlackHoleCluster")]},
            {"filters": [_tcp("PassthroughCluster")]}]},
        {"name": "virtualInbound", "address": _sock("0.0.0.0", 15006), "filter_chains": [
            {"filter_chain_match": {"destination_port": 15006}, "filters": [_tcp("BlackHoleCluster")]},
            {"filter_chain_match": {"application_protocols": ["istio-http/1.0", "istio-http/1.1", "istio-h2"],
                                    "transport_protocol": "tls"},
             "filters": [_hcm(_inline("InboundPassthroughClusterIpv4", "InboundPassthroughClusterIpv4"), "in")]},
            {"filter_chain_match": {"application_protocols": ["http/1.0", "http/1.1", "h2c"]},
             "filters": [_hcm(_inline("InboundPassthroughClusterIpv4", "InboundPassthroughClusterIpv4"), "in")]},
            {"filter_chain_match": {"destination_port": 3030, "transport_protocol": "tls",
                                    "application_protocols": ["istio-peer-exchange", "istio"]},
             "filters": [_hcm(_inline("inbound|80|http-web|webserver.default.svc.cluster.local",
                                      "inbound|80|http-web|webserver.default.svc.cluster.local"), "in")]},
            {"filter_chain_match": {"destination_port": 3030},
             "filters": [_hcm(_inline("inbound|80|http-web|webserver.default.svc.cluster.local",
                                      "inbound|80|http-web|webserver.default.svc.cluster.local"), "in")]}]},
    ]

    def cfg(name: str, vhosts: list) -> dict:
        return {"name": name, "virtual_hosts": vhosts}

    ws_route = {"match": {"safe_regex": {"google_re2": {"max_program_size": 1024}, "regex": ".*"}},
                "route": {"weighted_clusters": {"clusters": [
                    {"name": "outbound|80|v1|webserver.default.svc.cluster.local", "weight": 50},
                    {"name": "outbound|80|v2|webserver.default.svc.cluster.local", "weight": 50}]}},
                "metadata": _meta(f"{V1A3}/default/virtual-service/webserver")}
    port80 = [_vhost(f, 80, vip[f]) for f in ("istio-egressgateway.istio-system.svc.cluster.local",
                                            "istio-ingressgateway.istio-system.svc.cluster.local",
                                            "proxy.default.svc.cluster.local")]
    port80.append(_vhost("webserver.default.svc.cluster.local", 80, "10.200.1.189", [ws_route]))
    port80 += [_vhost(f, 80, vip[f]) for f in ("webserverv1.default.svc.cluster.local",
                                             "webserverv2.default.svc.cluster.local")]
    istiod = "istiod.istio-system.svc.cluster.local"
    routes = [
        cfg("80", [*port80, _ALLOW_ANY]),
        cfg("15010", [_vhost(istiod, 15010, vip[istiod]), _ALLOW_ANY]),
        cfg("15014", [_vhost(istiod, 15014, vip[istiod]), _ALLOW_ANY]),
        cfg("istio-ingressgateway.istio-system.svc.cluster.local:15021",
            [_vhost("istio-ingressgateway.istio-system.svc.cluster.local", 15021, "10.200.1.101")]),
        cfg("kube-dns.kube-system.svc.cluster.local:9153",
            [_vhost("kube-dns.kube-system.svc.cluster.local", 9153, "10.200.1.10")]),
        cfg("proxy.default.svc.cluster.local:80", [_vhost("proxy.default.svc.cluster.local", 80, "10.200.1.132")]),
        cfg(f"{istiod}:853", [_vhost(istiod, 853, vip[istiod])]),
    ]
    # Shuffled: the printers, not the input order, decide the rows' order.
    rng = random.Random(17)
    for group in (clusters, endpoints, listeners, routes):
        rng.shuffle(group)
    resources = {
        "type.googleapis.com/envoy.config.cluster.v3.Cluster": clusters,
        "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": endpoints,
        "type.googleapis.com/envoy.config.listener.v3.Listener": listeners,
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": routes,
    }
    return resources, istio17_bootstrap()


def istio17_bootstrap() -> dict:
    def health(name: str, port: int, path: str, cluster: str) -> dict:
        return {"name": name, "address": _sock("0.0.0.0", port), "filter_chains": [{"filters": [_hcm(
            {"route_config": {"virtual_hosts": [{"name": "backend", "domains": ["*"], "routes": [
                {"match": {"prefix": path}, "route": {"cluster": cluster}}]}]}}, name, legacy=False)]}]}

    return {
        "node": {"id": f"sidecar~10.200.0.135~{POD}.default~default.svc.cluster.local", "cluster": "webserver.default"},
        "static_resources": {
            "clusters": [
                _static("prometheus_stats", [_sock("127.0.0.1", 15000)]),
                _static("agent", [_sock("127.0.0.1", 15020)]),
                _static("sds-grpc", [{"pipe": {"path": "./etc/istio/proxy/SDS"}}]),
                _static("xds-grpc", [_sock("istiod.istio-system.svc", 15012)], "STRICT_DNS"),
                _static("zipkin", [_sock("zipkin.istio-system", 9411)], "STRICT_DNS"),
            ],
            "listeners": [health("prometheus", 15090, "/stats/prometheus", "prometheus_stats"),
                          health("health", 15021, "/healthz/ready", "agent")],
        },
    }


def parse_resources(resources: dict) -> dict:
    """JSON resources → type URL → name → proto message (what SnapshotStore.load_messages returns)."""
    from google.protobuf import json_format

    from mizzen.services.mesh import xds_types
    from mizzen.services.mesh.configdump import prepare

    out: dict = {}
    for type_url, items in resources.items():
        cls = xds_types.message_class(type_url)
        name_field = "cluster_name" if type_url == xds_types.ENDPOINT else "name"
        out[type_url] = {}
        for item in items:
            msg = json_format.ParseDict(prepare(item), cls())
            out[type_url][getattr(msg, name_field)] = msg
    return out
