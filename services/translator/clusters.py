"""CDS: Envoy Clusters for a proxy, as istiod 1.7's cluster.go / cluster_builder.go build them.

Outbound clusters (one per visible service port, plus one per DestinationRule subset), BlackHoleCluster,
PassthroughCluster, and for sidecars the 1.7-style inbound clusters `inbound|<svcPort>|<portName>|<fqdn>`
(STATIC to 127.0.0.1:<targetPort>) and InboundPassthroughClusterIpv4. Per-service clusters are memoised on
the push context, so every scope that sees the same service through the same DestinationRule shares them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import address_pb2, protocol_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo
from google.protobuf import any_pb2, struct_pb2

from . import incremental, pb, protocol, tls
from .assignment import build_assignment
from .model import (
    ALIAS,
    DNS_LB,
    DNS_ROUND_ROBIN_LB,
    PASSTHROUGH,
    Config,
    Port,
    Service,
    labels_key,
    service_id,
)
from .push_context import MALFORMED, PushContext, SidecarScope, duration

Cluster = cluster_pb2.Cluster
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
H2_MAX_CONCURRENT_STREAMS = 1073741824
INBOUND_PASSTHROUGH_BIND_IPV4 = "127.0.0.6"
LOCALHOST = "127.0.0.1"
ENVOY_DNS_REFRESH = 5.0


def subset_key(direction: str, subset: str, hostname: str, port: int) -> str:
    """`outbound|80|v1|reviews.default.svc.cluster.local` (Istio's BuildSubsetKey)."""
    return f"{direction}|{port}|{subset}|{hostname}"


def dns_srv_subset_key(subset: str, hostname: str, port: int) -> str:
    """`outbound_.80_.v1_.reviews.default.svc.cluster.local`: the ISTIO_MUTUAL SNI form."""
    return f"outbound_.{port}_.{subset}_.{hostname}"


def parse_subset_key(name: str) -> tuple[str, str, str, int] | None:
    parts = name.split("|")
    if len(parts) != 4:
        return None
    try:
        return parts[0], parts[2], parts[3], int(parts[1])
    except ValueError:
        return None


@dataclass(eq=False, slots=True)
class EdsNeed:
    """A ClusterLoadAssignment an EDS cluster needs: which endpoints (service port, subset labels)."""

    cluster_name: str
    service: Service
    port: int
    labels: dict | None
    # The localityLbSetting the assignment follows, relative to each proxy's locality (endpoints.py); None when
    # locality LB does nothing for this cluster (disabled, or failover only and no outlier detection).
    locality_lb: dict | None = None
    # (cluster, service_id, subset labels key): what its assignment is memoised and layers are keyed by, once
    key: tuple = field(init=False)

    def __post_init__(self) -> None:
        self.key = (self.cluster_name, service_id(self.service), labels_key(self.labels))


# ---------------------------------------------------------------------------------------------- policy
def select_port_policy(policy: dict | None, port: int) -> tuple[dict, bool]:
    """The four policy blocks for a port: a matching portLevelSettings entry replaces the top level wholesale."""
    if not policy:
        return {}, False
    for pls in policy.get("portLevelSettings") or []:
        if int((pls.get("port") or {}).get("number") or 0) == port:
            return {k: pls.get(k) for k in ("connectionPool", "outlierDetection", "loadBalancer", "tls")}, True
    return {k: policy.get(k) for k in ("connectionPool", "outlierDetection", "loadBalancer", "tls")}, False


def effective_policy(dr: Config | None, port: int, subset: dict | None = None) -> dict:
    """DR top-level (port-level applied), overlaid block by block by a subset's own policy."""
    top, _ = select_port_policy((dr.spec.get("trafficPolicy") if dr else None), port)
    if subset is None or not subset.get("trafficPolicy"):
        return top
    sub, port_level = select_port_policy(subset["trafficPolicy"], port)
    if port_level:
        return sub
    out = dict(top)
    for k, v in sub.items():
        if v:
            out[k] = v
    return out


def _find_subset(dr: Config | None, name: str) -> dict | None:
    if dr is None:
        return None
    for s in dr.spec.get("subsets") or []:
        if s.get("name") == name:
            return s
    return None


class _Http:
    """Upstream HTTP settings collected while building, written once as HttpProtocolOptions."""

    __slots__ = ("h2", "downstream", "idle", "max_requests", "h2_keepalive", "max_streams")

    def __init__(self):
        self.h2 = False
        self.downstream = False
        self.idle = None
        self.max_requests = 0
        self.h2_keepalive = None
        self.max_streams = 0

    def apply(self, c: Cluster) -> None:
        if not (self.h2 or self.downstream or self.idle is not None or self.max_requests):
            return
        key = (self.h2, self.downstream, self.idle, self.max_requests, self.h2_keepalive, self.max_streams)
        packed = _HTTP_OPTIONS.get(key)
        if packed is None:
            if len(_HTTP_OPTIONS) > 10_000:
                _HTTP_OPTIONS.clear()
            packed = _HTTP_OPTIONS[key] = self._packed()
        c.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(packed)

    def _packed(self) -> any_pb2.Any:
        opts = hpo.HttpProtocolOptions()
        h2 = protocol_pb2.Http2ProtocolOptions()
        h2.max_concurrent_streams.value = self.max_streams or H2_MAX_CONCURRENT_STREAMS
        if self.h2_keepalive:
            ka = h2.connection_keepalive
            pb.set_duration(ka.interval, self.h2_keepalive[0])
            pb.set_duration(ka.timeout, self.h2_keepalive[1])
        if self.downstream:
            opts.use_downstream_protocol_config.http_protocol_options.SetInParent()
            opts.use_downstream_protocol_config.http2_protocol_options.CopyFrom(h2)
        elif self.h2:
            opts.explicit_http_config.http2_protocol_options.CopyFrom(h2)
        else:
            opts.explicit_http_config.http_protocol_options.SetInParent()
        if self.idle is not None:
            pb.set_duration(opts.common_http_protocol_options.idle_timeout, self.idle)
        if self.max_requests:
            opts.common_http_protocol_options.max_requests_per_connection.value = self.max_requests
        return pb.pack(opts)


# Few distinct settings across a mesh: each packed once per process.
_HTTP_OPTIONS: dict[tuple, any_pb2.Any] = {}  # keyed by few values; cleared if config makes it grow


def _default_thresholds(c: Cluster) -> circuit_breaker_pb2.CircuitBreakers.Thresholds:
    del c.circuit_breakers.thresholds[:]
    th = c.circuit_breakers.thresholds.add()
    th.max_connections.value = pb.MAX_UINT32
    th.max_pending_requests.value = pb.MAX_UINT32
    th.max_requests.value = pb.MAX_UINT32
    th.max_retries.value = pb.MAX_UINT32
    return th


def _apply_connection_pool(push: PushContext, c: Cluster, http: _Http, pool: dict | None) -> None:
    if not pool:
        return
    th = _default_thresholds(c)
    hs = pool.get("http") or {}
    if int(hs.get("http2MaxRequests") or 0) > 0:
        th.max_requests.value = int(hs["http2MaxRequests"])
    if int(hs.get("http1MaxPendingRequests") or 0) > 0:
        th.max_pending_requests.value = int(hs["http1MaxPendingRequests"])
    if int(hs.get("maxRetries") or 0) > 0:
        th.max_retries.value = int(hs["maxRetries"])
    if int(hs.get("maxRequestsPerConnection") or 0) > 0:
        http.max_requests = int(hs["maxRequestsPerConnection"])
    if int(hs.get("maxConcurrentStreams") or 0) > 0:
        http.max_streams = int(hs["maxConcurrentStreams"])
    idle = duration(hs.get("idleTimeout"))
    ts = pool.get("tcp") or {}
    if idle is None:
        idle = duration(ts.get("idleTimeout"))
    if idle is not None:
        http.idle = idle
    ka = hs.get("http2KeepAlive")  # not in 1.7's API; harmless when absent
    if ka:
        http.h2_keepalive = (duration(ka.get("interval"), 0) or 0, duration(ka.get("timeout"), 0) or 0)
    if ts:
        ct = duration(ts.get("connectTimeout"))
        if ct is not None:
            pb.set_duration(c.connect_timeout, ct)
        if int(ts.get("maxConnections") or 0) > 0:
            th.max_connections.value = int(ts["maxConnections"])
    mesh_ka = push.mesh.tcp_keepalive
    dr_ka = ts.get("tcpKeepalive") if ts else None
    if mesh_ka is not None or dr_ka is not None:
        keep = c.upstream_connection_options.tcp_keepalive
        keep.SetInParent()
        for src in (mesh_ka, dr_ka):
            if not src:
                continue
            if int(src.get("probes") or 0) > 0:
                keep.keepalive_probes.value = int(src["probes"])
            t = duration(src.get("time"))
            if t is not None:
                keep.keepalive_time.value = int(t)
            i = duration(src.get("interval"))
            if i is not None:
                keep.keepalive_interval.value = int(i)


def _apply_outlier(c: Cluster, od: dict | None) -> None:
    if not od:
        return
    out = c.outlier_detection
    out.enforcing_success_rate.value = 0
    old = int(od.get("consecutiveErrors") or 0)
    if old > 0:
        # The deprecated field counts gateway errors only (502/503/504; istio/api#617), not every 5xx.
        out.consecutive_gateway_failure.value = old
        out.enforcing_consecutive_gateway_failure.value = 100
        out.enforcing_consecutive_5xx.value = 0
    c5 = od.get("consecutive5xxErrors")
    if c5 is not None:
        v = int(c5.get("value", 0) if isinstance(c5, dict) else c5)
        out.consecutive_5xx.value = v
        out.enforcing_consecutive_5xx.value = 100 if v > 0 else 0
    gw = od.get("consecutiveGatewayErrors")
    if gw is not None:
        v = int(gw.get("value", 0) if isinstance(gw, dict) else gw)
        out.consecutive_gateway_failure.value = v
        out.enforcing_consecutive_gateway_failure.value = 100 if v > 0 else 0
    iv = duration(od.get("interval"))
    if iv is not None:
        pb.set_duration(out.interval, iv)
    be = duration(od.get("baseEjectionTime"))
    if be is not None:
        pb.set_duration(out.base_ejection_time, be)
    if int(od.get("maxEjectionPercent") or 0) > 0:
        out.max_ejection_percent.value = int(od["maxEjectionPercent"])
    if od.get("splitExternalLocalOriginErrors"):
        out.split_external_local_origin_errors = True
        if od.get("consecutiveLocalOriginFailures") is not None:
            lof = od["consecutiveLocalOriginFailures"]
            out.consecutive_local_origin_failure.value = int(lof.get("value", 0) if isinstance(lof, dict) else lof)
        out.enforcing_consecutive_local_origin_failure.value = 100
        out.enforcing_local_origin_success_rate.value = 0
    # Panic threshold off by default (few pods per service): written even when 0.
    c.common_lb_config.healthy_panic_threshold.value = float(od.get("minHealthPercent") or 0)


def _apply_load_balancer(c: Cluster, lb: dict | None) -> None:
    if c.type == Cluster.ORIGINAL_DST:
        c.lb_policy = Cluster.CLUSTER_PROVIDED
        return
    if not lb:
        return
    simple = lb.get("simple")
    if simple in ("LEAST_CONN", "LEAST_REQUEST"):
        c.lb_policy = Cluster.LEAST_REQUEST
    elif simple == "RANDOM":
        c.lb_policy = Cluster.RANDOM
    elif simple == "ROUND_ROBIN":
        c.lb_policy = Cluster.ROUND_ROBIN
    elif simple == "PASSTHROUGH":
        c.lb_policy = Cluster.CLUSTER_PROVIDED
        c.type = Cluster.ORIGINAL_DST
        c.ClearField("load_assignment")
    ch = lb.get("consistentHash")
    if ch is not None:
        if ch.get("maglev") is not None:
            c.lb_policy = Cluster.MAGLEV
            size = int((ch.get("maglev") or {}).get("tableSize") or 0)
            if size:
                c.maglev_lb_config.table_size.value = size
        else:
            c.lb_policy = Cluster.RING_HASH
            ring = ch.get("ringHash") or {}
            size = int(ring.get("minimumRingSize") or ch.get("minimumRingSize") or 1024)
            c.ring_hash_lb_config.minimum_ring_size.value = size


def locality_setting(push: PushContext, lb: dict | None) -> dict | None:
    """Istio's GetLocalityLbSetting: the DR's localityLbSetting, else the mesh's; None when disabled."""
    dr_setting = (lb or {}).get("localityLbSetting")
    setting = dr_setting if dr_setting is not None else push.mesh.locality_lb_setting
    if setting is None:
        setting = {"enabled": True}  # the mesh default
    enabled = setting.get("enabled", True)
    if isinstance(enabled, dict):
        enabled = enabled.get("value", True)
    return setting if enabled is not False else None


def _apply_locality(c: Cluster, setting: dict | None) -> dict | None:
    """The setting the cluster's assignments follow (None: none). Failover (default or explicit) only works
    with outlier detection, else Envoy never sees the local endpoints unhealthy (Istio applies it only then);
    `distribute` works alone and needs Envoy's locality-weighted LB to honour the locality weights."""
    if setting is None:
        return None
    if setting.get("distribute"):
        if c.lb_policy not in (Cluster.RING_HASH, Cluster.MAGLEV):
            c.common_lb_config.locality_weighted_lb_config.SetInParent()
        return setting
    if c.HasField("outlier_detection"):
        if c.lb_policy not in (Cluster.RING_HASH, Cluster.MAGLEV):
            c.common_lb_config.locality_weighted_lb_config.SetInParent()
        return setting
    return None


_MATCH_ISTIO = struct_pb2.Struct()
_MATCH_ISTIO.update({"tlsMode": "istio"})


@dataclass(frozen=True, slots=True)
class _MutualTls:
    """An ISTIO_MUTUAL socket still to be written per cluster (its SNI names the cluster's subset)."""

    on_match: bool  # auto mTLS: the socket of transport_socket_matches[0]; else the cluster's transport_socket
    sni: str  # the DR's own SNI; "" for the cluster's
    sans: list[str] | None  # the DR's own SANs; None for the service's accounts
    h2: bool

    def socket(self, c: Cluster) -> pb.base_pb2.TransportSocket:
        return c.transport_socket_matches[0].transport_socket if self.on_match else c.transport_socket

    def apply(self, c: Cluster, cluster_sni: str, service_sans: list[str]) -> None:
        """On a copy of the skeleton, whose socket has the shared parts (tls.preset_istio_mutual_socket)."""
        self.socket(c).typed_config.value = tls.istio_mutual_socket_value(self.sni or cluster_sni,
                                                                         self.sans or service_sans, self.h2)


def _apply_tls(push: PushContext, c: Cluster, http: _Http, tls_cfg: dict | None, *, auto_ok: bool,
               is_sidecar: bool) -> _MutualTls | None:
    """DR tls, or auto mTLS (transport_socket_matches on the endpoint's tlsMode) when the DR has none. An
    ISTIO_MUTUAL socket is left to the returned _MutualTls (the rest is the same for every subset)."""
    if tls_cfg:
        mode = tls_cfg.get("mode") or "DISABLE"
        if mode == "DISABLE":
            return None
        if mode == "ISTIO_MUTUAL":
            return _MutualTls(False, tls_cfg.get("sni") or "", tls_cfg.get("subjectAltNames") or None, http.h2)
        ctx = tls.user_upstream(tls_cfg, http.h2, is_sidecar)
        if ctx is not None:
            c.transport_socket.CopyFrom(tls.tls_socket(ctx))
        return None
    if not auto_ok or c.type == Cluster.ORIGINAL_DST:
        return None
    c.transport_socket_matches.add(name="tlsMode-istio", match=_MATCH_ISTIO)
    c.transport_socket_matches.append(_MATCH_DISABLED)
    return _MutualTls(True, "", None, http.h2)


# The plaintext fallback of auto mTLS: the same on every cluster, built once.
_MATCH_DISABLED = Cluster.TransportSocketMatch(name="tlsMode-disabled", match=struct_pb2.Struct(),
                                               transport_socket=pb.raw_buffer_socket())


_ADS = pb.ads_config_source()


# ---------------------------------------------------------------------------------------------- outbound
def discovery_type(service: Service, is_sidecar: bool) -> int:
    r = service.resolution
    if r == DNS_LB:
        return Cluster.STRICT_DNS
    if r == DNS_ROUND_ROBIN_LB:
        return Cluster.LOGICAL_DNS
    if r == PASSTHROUGH and is_sidecar:
        return Cluster.ORIGINAL_DST
    return Cluster.EDS


# The unnamed start of every cluster per (type, connect timeout): copying it is cheaper than setting each field.
_NEW_CLUSTER: dict[tuple[int, float], Cluster] = {}


def _new_cluster(push: PushContext, name: str, ctype: int) -> Cluster:
    key = (ctype, push.mesh.connect_timeout)
    base = _NEW_CLUSTER.get(key)
    if base is None:
        base = Cluster(type=ctype)
        pb.set_duration(base.connect_timeout, push.mesh.connect_timeout)
        _default_thresholds(base)
        if ctype == Cluster.ORIGINAL_DST:
            base.lb_policy = Cluster.CLUSTER_PROVIDED
        if len(_NEW_CLUSTER) > 1_000:
            _NEW_CLUSTER.clear()
        _NEW_CLUSTER[key] = base
    c = Cluster()
    c.CopyFrom(base)
    c.name = name
    return c


def dns_load_assignment(name: str, service: Service, port: int, labels: dict | None):
    """Inline endpoints of a DNS cluster (hostname endpoints Envoy resolves); None when there are none."""
    cla = build_assignment(name, service.endpoints.get(port, ()), labels, tls_metadata=False)
    return cla if cla.endpoints else None


def _set_upstream_protocol(http: _Http, port: Port, is_sidecar: bool) -> None:
    """HTTP/2 ports speak h2 upstream; a sniffed port on a sidecar uses whatever the client spoke."""
    if protocol.is_http2(port.protocol):
        http.h2 = True
    if is_sidecar and protocol.is_auto(port.protocol):
        http.h2 = True
        http.downstream = True


def _h2_upgrade(push: PushContext, http: _Http, port: Port, pool: dict | None) -> None:
    if not protocol.is_http(port.protocol):
        return
    hs = (pool or {}).get("http") or {}
    override = hs.get("h2UpgradePolicy") or "DEFAULT"
    if hs.get("useClientProtocol") or override == "DO_NOT_UPGRADE":
        return
    if override == "UPGRADE" or (override == "DEFAULT" and push.mesh.h2_upgrade_policy == "UPGRADE"):
        http.h2 = True


@dataclass(eq=False, slots=True)
class _Skeleton:
    """A cluster without what depends on its name or subset name (SNI, EDS service name, metadata): the
    default cluster and every subset with the same policy are copies of one skeleton."""

    cluster: Cluster
    loc_lb: dict | None
    mutual: _MutualTls | None
    type: int  # cluster.type, kept here: reading it back from the proto for every copy costs more


def _skeleton(push: PushContext, service: Service, port: Port, policy: dict, subset: dict | None,
              ctype: int, is_sidecar: bool, sni_dnat: bool, auto_ok: bool, dns_name: str) -> _Skeleton | None:
    """None for a DNS cluster without endpoints (its inline assignment, named `dns_name`, is part of it).
    `policy` is effective_policy(dr, port.port, subset)."""
    c = _new_cluster(push, "", ctype)
    if ctype in (Cluster.STRICT_DNS, Cluster.LOGICAL_DNS):
        cla = dns_load_assignment(dns_name, service, port.port, subset.get("labels") if subset else None)
        if cla is None:
            return None
        c.dns_lookup_family = Cluster.V4_ONLY
        # Envoy 1.40 deprecates dns_refresh_rate/respect_dns_ttl on Cluster (1.7 set both); its default
        # refresh (5s) is 1.7's mesh default, so the field is written only for another mesh value.
        if push.mesh.dns_refresh_rate != ENVOY_DNS_REFRESH:
            pb.set_duration(c.dns_refresh_rate, push.mesh.dns_refresh_rate)
        c.load_assignment.CopyFrom(cla)
    http = _Http()
    _set_upstream_protocol(http, port, is_sidecar and not sni_dnat)
    pool = policy.get("connectionPool")
    _h2_upgrade(push, http, port, pool)
    _apply_connection_pool(push, c, http, pool)
    _apply_outlier(c, policy.get("outlierDetection"))
    _apply_load_balancer(c, policy.get("loadBalancer"))
    loc_lb = _apply_locality(c, locality_setting(push, policy.get("loadBalancer")))
    http.apply(c)
    mutual = None
    if not sni_dnat:
        mutual = _apply_tls(push, c, http, policy.get("tls"), auto_ok=auto_ok, is_sidecar=is_sidecar)
        if mutual is not None:
            tls.preset_istio_mutual_socket(mutual.socket(c))
    ctype = c.type  # a PASSTHROUGH load balancer makes it ORIGINAL_DST
    if ctype == Cluster.EDS:
        c.eds_cluster_config.eds_config.CopyFrom(_ADS)
    return _Skeleton(c, loc_lb, mutual, ctype)


def _cluster_skeleton(push: PushContext, service: Service, port: Port, dr: Config | None, subset: dict | None,
                      ctype: int, is_sidecar: bool, sni_dnat: bool, auto_ok: bool, dns_name: str) -> _Skeleton | None:
    """_skeleton, shared within the push by every EDS cluster with the same policy content: an EDS skeleton
    depends on the service only through the port's protocol (a mesh's rules mostly say the same thing)."""
    policy = effective_policy(dr, port.port, subset)
    if ctype != Cluster.EDS:
        return _skeleton(push, service, port, policy, subset, ctype, is_sidecar, sni_dnat, auto_ok, dns_name)
    # repr keeps dict order: equal text means equal content (a reordered rule just misses)
    key = ("cds-skeleton", port.protocol, is_sidecar, sni_dnat, auto_ok, repr(policy) if policy else "")
    sk = push.cache.get(key)
    if sk is None:
        sk = push.cache[key] = _skeleton(push, service, port, policy, subset, ctype, is_sidecar, sni_dnat, auto_ok,
                                         dns_name)
    return sk


def _service_clusters(push: PushContext, service: Service, port: Port, dr: Config | None, is_sidecar: bool,
                      sni_dnat: bool = False) -> tuple[dict[str, Cluster], list[EdsNeed]]:
    """The clusters by name (the first of a repeated subset name), and their EDS needs."""
    ctype = discovery_type(service, is_sidecar)
    clusters: dict[str, Cluster] = {}
    needs: list[EdsNeed] = []
    auto_ok = (push.mesh.enable_auto_mtls and not service.mesh_external and not sni_dnat
               and push.service_mtls_mode(service) not in ("DISABLE", "UNKNOWN"))
    meta_path = dr.meta_path if dr else None

    def cluster_name(subset_name: str) -> str:
        return (dns_srv_subset_key(subset_name, service.hostname, port.port) if sni_dnat
                else subset_key("outbound", subset_name, service.hostname, port.port))

    def named(sk: _Skeleton, name: str, subset: dict | None) -> Cluster:
        c = Cluster()
        c.CopyFrom(sk.cluster)
        c.name = name
        if sk.mutual is not None:
            sk.mutual.apply(c, dns_srv_subset_key(subset.get("name", "") if subset else "", service.hostname,
                                                  port.port), service.service_accounts)
        if sk.type == Cluster.EDS:
            c.eds_cluster_config.service_name = name
            needs.append(EdsNeed(name, service, port.port, subset.get("labels") if subset else None, sk.loc_lb))
        if meta_path:
            md = {"config": meta_path}
            if subset is not None:
                md["subset"] = subset.get("name", "")
            c.metadata.CopyFrom(pb.istio_metadata(md))
        return c

    name = cluster_name("")
    default = _cluster_skeleton(push, service, port, dr, None, ctype, is_sidecar, sni_dnat, auto_ok, name)
    if default is None:
        return clusters, needs
    clusters[name] = named(default, name, None)
    for subset in (dr.spec.get("subsets") or []) if dr is not None else ():
        sub_name = cluster_name(subset.get("name") or "")
        sk: _Skeleton | None = default
        if default.type != Cluster.EDS or subset.get("trafficPolicy"):
            sk = _cluster_skeleton(push, service, port, dr, subset, default.type, is_sidecar, sni_dnat,
                                   auto_ok, sub_name)
        if sk is not None:
            clusters.setdefault(sub_name, named(sk, sub_name, subset))
    return clusters, needs


def service_port_clusters(push: PushContext, service: Service, port: Port, dr: Config | None,
                          is_sidecar: bool, sni_dnat: bool = False) -> tuple[dict[str, Cluster], list[EdsNeed]]:
    """Memoised: the clusters of one service port under one DR (shared by every scope that sees them)."""
    # Keyed by content (a Sidecar-trimmed copy of a service keeps its identity but not all its ports), so a
    # routing build can take the clusters of services whose rule did not change from the previous push.
    key = ("cds", service_id(service), tuple((p.name, p.port, p.protocol) for p in service.ports), port.port,
           incremental.dr_key(push, dr), is_sidecar, sni_dnat)

    def make() -> tuple[dict[str, Cluster], list[EdsNeed]]:
        try:
            return _service_clusters(push, service, port, dr, is_sidecar, sni_dnat)
        except MALFORMED as e:
            if dr is None:
                raise
            # A DestinationRule we cannot read must not take the service down: build it without the rule.
            push.report(f"DestinationRule {dr.namespace}/{dr.name} for {service.hostname}:{port.port}", e)
            return _service_clusters(push, service, port, None, is_sidecar, sni_dnat)

    return incremental.unit(push, key, make)


def blackhole_cluster(push: PushContext) -> Cluster:
    c = Cluster(name=pb.BLACKHOLE_CLUSTER, type=Cluster.STATIC, lb_policy=Cluster.ROUND_ROBIN)
    pb.set_duration(c.connect_timeout, push.mesh.connect_timeout)
    return c


def passthrough_cluster(push: PushContext, name: str = pb.PASSTHROUGH_CLUSTER) -> Cluster:
    c = _new_cluster(push, name, Cluster.ORIGINAL_DST)
    http = _Http()
    http.downstream = True
    http.apply(c)
    return c


def inbound_passthrough_cluster(push: PushContext) -> Cluster:
    c = passthrough_cluster(push, pb.INBOUND_PASSTHROUGH_CLUSTER_IPV4)
    c.upstream_bind_config.source_address.CopyFrom(
        address_pb2.SocketAddress(address=INBOUND_PASSTHROUGH_BIND_IPV4, port_value=0))
    return c


def outbound_clusters(push: PushContext, scope: SidecarScope, is_sidecar: bool,
                      gateway_sni_dnat: bool = False) -> tuple[dict[str, Cluster], list[EdsNeed]]:
    """Every outbound cluster of a scope by name (then BlackHole, and Passthrough for sidecars), the first of
    a repeated name kept; names come from the builders, not read back from the protos."""
    out: dict[str, Cluster] = {}
    needs: list[EdsNeed] = []

    def add(cs: dict[str, Cluster], ns: list[EdsNeed]) -> None:
        for name, c in cs.items():
            out.setdefault(name, c)
        needs.extend(n for n in ns if n.cluster_name in out)

    for svc in scope.services:
        if svc.resolution == ALIAS:
            continue
        dr = push.destination_rule(scope.namespace, svc)
        for port in svc.ports:
            if port.protocol == protocol.UDP:
                continue
            add(*service_port_clusters(push, svc, port, dr, is_sidecar))
    if gateway_sni_dnat:
        for svc in scope.services:
            if svc.mesh_external or svc.resolution == ALIAS:
                continue
            dr = push.destination_rule(scope.namespace, svc)
            for port in svc.ports:
                if port.protocol != protocol.UDP:
                    add(*service_port_clusters(push, svc, port, dr, is_sidecar, sni_dnat=True))
    out.setdefault(pb.BLACKHOLE_CLUSTER, blackhole_cluster(push))
    if is_sidecar:
        out.setdefault(pb.PASSTHROUGH_CLUSTER, passthrough_cluster(push))
    return out, needs


# ---------------------------------------------------------------------------------------------- inbound
def inbound_cluster_name(instance) -> str:
    return subset_key("inbound", instance.port.name, instance.service.hostname, instance.port.port)


def inbound_clusters(push: PushContext, proxy, instances) -> list[Cluster]:
    """1.7: one STATIC cluster per (service, port) the workload serves, to 127.0.0.1:<targetPort>."""
    out: list[Cluster] = []
    seen: set[str] = set()
    for inst in instances:
        name = inbound_cluster_name(inst)
        if name in seen:
            continue
        seen.add(name)
        c = _new_cluster(push, name, Cluster.STATIC)
        cla = c.load_assignment
        cla.cluster_name = name
        lb = cla.endpoints.add().lb_endpoints.add()
        if inst.endpoint_address.startswith("unix://"):
            lb.endpoint.address.pipe.path = inst.endpoint_address[len("unix://"):]
        else:
            sa = lb.endpoint.address.socket_address
            sa.address = inst.endpoint_address or LOCALHOST
            sa.port_value = inst.endpoint_port
        http = _Http()
        _set_upstream_protocol(http, inst.port, True)
        dr = push.destination_rule(proxy.namespace, inst.service)
        if dr is not None and dr.spec.get("trafficPolicy"):
            policy, _ = select_port_policy(dr.spec["trafficPolicy"], inst.port.port)
            _apply_connection_pool(push, c, http, policy.get("connectionPool"))
            c.metadata.CopyFrom(pb.istio_metadata({"config": dr.meta_path}))
        http.apply(c)
        out.append(c)
    return out
