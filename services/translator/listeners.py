"""LDS: Listeners, as istiod 1.7's listener.go / listener_builder.go / gateway.go build them.

Sidecar: per-port outbound listeners (`0.0.0.0_<port>` for HTTP ports, `<VIP>_<port>` for TCP and sniffed
ports, 1.7's conflict merging, the `PassthroughFilterChain` fallback), `virtualOutbound` (15001) and
`virtualInbound` (15006, inbound chains per PeerAuthentication mode). Gateways: `0.0.0.0_<port>` per
merged server port. Stock Envoy has no istio.* filters, so those are left out.
"""

from __future__ import annotations

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2 as grpc_stats_pb2
from envoy.extensions.filters.http.grpc_web.v3 import grpc_web_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import any_pb2

from mizzen.services.mesh.protowire import ld

from . import pb, protocol, routes, security, tls
from .clusters import inbound_cluster_name, subset_key
from .model import PASSTHROUGH, UNSPECIFIED_IP, Config, Port, Service, ServiceInstance, host_matches, is_ip
from .push_context import MALFORMED, MESH_GATEWAY, ProxyView, PushContext

Listener = listener_pb2.Listener
HCM = hcm_pb.HttpConnectionManager
WILDCARD = "0.0.0.0"
VIRTUAL_OUTBOUND = "virtualOutbound"
VIRTUAL_INBOUND = "virtualInbound"
VIRTUAL_OUTBOUND_CATCHALL = "virtualOutbound-catchall-tcp"
VIRTUAL_OUTBOUND_BLACKHOLE = "virtualOutbound-blackhole"
VIRTUAL_INBOUND_CATCHALL_HTTP = "virtualInbound-catchall-http"
ENVOY_SERVER_NAME = "istio-envoy"

PLAINTEXT_HTTP_ALPNS = ["http/1.0", "http/1.1", "h2c"]
MTLS_HTTP_ALPNS = ["istio-http/1.0", "istio-http/1.1", "istio-h2"]
MTLS_TCP_ALPNS_MXC = ["istio-peer-exchange", "istio"]
ALPN_IN_MESH = ["istio"]

# Ports the bootstrap's static listeners (and Envoy itself) own; no wildcard outbound listener may take them.
RESERVED_PORTS = frozenset({15000, 15001, 15006, 15020, 15021, 15090})


_TLS_INSPECTOR = lc.ListenerFilter(name=pb.TLS_INSPECTOR, typed_config=pb.pack(tls_inspector_pb2.TlsInspector()))
_HTTP_INSPECTOR = lc.ListenerFilter(name=pb.HTTP_INSPECTOR, typed_config=pb.pack(http_inspector_pb2.HttpInspector()))
_ORIGINAL_DST = lc.ListenerFilter(name=pb.ORIGINAL_DST, typed_config=pb.pack(original_dst_pb2.OriginalDst()))
_ROUTER = hcm_pb.HttpFilter(name=pb.HTTP_ROUTER, typed_config=pb.pack(router_pb2.Router()))
_FAULT = hcm_pb.HttpFilter(name=pb.HTTP_FAULT, typed_config=pb.pack(fault_pb2.HTTPFault()))
_CORS = hcm_pb.HttpFilter(name=pb.HTTP_CORS, typed_config=pb.pack(cors_pb2.Cors()))
_GRPC_WEB = hcm_pb.HttpFilter(name=pb.HTTP_GRPC_WEB, typed_config=pb.pack(grpc_web_pb2.GrpcWeb()))
_GRPC_STATS = hcm_pb.HttpFilter(name=pb.HTTP_GRPC_STATS,
                                typed_config=pb.pack(grpc_stats_pb2.FilterConfig(emit_filter_state=True)))
_WEBSOCKET = HCM.UpgradeConfig(upgrade_type="websocket")
_ZERO = pb.duration(0)


def _http_filters(port_protocol: str | None, grpc_web: bool = False) -> list[hcm_pb.HttpFilter]:
    out = []
    if grpc_web:
        out.append(_GRPC_WEB)
    if port_protocol and protocol.is_grpc(port_protocol):
        out.append(_GRPC_STATS)
    out += [_CORS, _FAULT, _ROUTER]
    return out


def build_hcm(push: PushContext, view: ProxyView, stat_prefix: str, *, rds: str = "",
              route_config=None, inbound: bool = False, port_protocol: str | None = None,
              use_remote_address: bool = False, security_filters: list[hcm_pb.HttpFilter] = ()) -> HCM:
    h = HCM(stat_prefix=stat_prefix, codec_type=HCM.AUTO)
    if rds:
        h.rds.config_source.CopyFrom(pb.ads_config_source())
        h.rds.route_config_name = rds
    else:
        h.route_config.CopyFrom(route_config)
    h.http_filters.extend(security_filters)  # jwt_authn, RBAC: before everything else, as istiod puts them
    h.http_filters.extend(_http_filters(port_protocol, grpc_web=inbound and port_protocol == protocol.GRPC_WEB))
    h.normalize_path.value = True
    h.use_remote_address.value = use_remote_address
    h.upgrade_configs.append(_WEBSOCKET)
    h.stream_idle_timeout.CopyFrom(_ZERO)
    h.access_log.extend(pb.access_logs(*view.access_log))
    if push.mesh.enable_tracing:
        t = h.tracing
        t.client_sampling.value = 100.0
        t.random_sampling.value = push.mesh.trace_sampling
        t.overall_sampling.value = 100.0
        h.generate_request_id.value = True
    if inbound:
        h.forward_client_cert_details = HCM.APPEND_FORWARD
        d = h.set_current_client_cert_details
        d.subject.value = True
        d.uri = True
        d.dns = True
        h.server_name = ENVOY_SERVER_NAME
        if port_protocol and protocol.is_http2(port_protocol):
            h.http2_protocol_options.SetInParent()
    return h


def hcm_filter(h: HCM) -> lc.Filter:
    return lc.Filter(name=pb.HTTP_CONNECTION_MANAGER, typed_config=pb.pack(h))


_TCP_PROXY_CACHE: dict[tuple, lc.Filter] = {}
_TCP_PROXY_URL = "type.googleapis.com/" + tcp_proxy_pb2.TcpProxy.DESCRIPTOR.full_name
_TCP_STAT_PREFIX = pb.tag(tcp_proxy_pb2.TcpProxy, "stat_prefix")
_TCP_CLUSTER = pb.tag(tcp_proxy_pb2.TcpProxy, "cluster")
# TcpProxy.access_log serialised, per (path, encoding): written once, not packed again for every cluster.
_TCP_ACCESS_LOGS: dict[tuple[str, str], bytes] = {}


def _tcp_access_logs(access_log: tuple[str, str]) -> bytes:
    wire = _TCP_ACCESS_LOGS.get(access_log)
    if wire is None:
        t = tcp_proxy_pb2.TcpProxy(access_log=pb.access_logs(*access_log))
        wire = _TCP_ACCESS_LOGS[access_log] = t.SerializeToString(deterministic=True)
    return wire


def tcp_proxy_filter(view: ProxyView, cluster: str, stat_prefix: str | None = None) -> lc.Filter:
    key = (cluster, stat_prefix, view.access_log)
    f = _TCP_PROXY_CACHE.get(key)
    if f is None:
        # TcpProxy{stat_prefix, cluster, access_log} serialised from its parts in field-number order (1, 2, 5), as
        # serialisation writes them: a distinct cluster per service, the access log's Struct encoded once.
        # `cluster` is in a oneof, so written even when empty; an empty stat_prefix is not written.
        prefix = (stat_prefix or cluster).encode()
        value = (ld(_TCP_STAT_PREFIX, prefix) if prefix else b"") + ld(_TCP_CLUSTER, cluster.encode()) \
            + _tcp_access_logs(view.access_log)
        f = lc.Filter(name=pb.TCP_PROXY, typed_config=any_pb2.Any(type_url=_TCP_PROXY_URL, value=value))
        if len(_TCP_PROXY_CACHE) > 200_000:
            _TCP_PROXY_CACHE.clear()
        _TCP_PROXY_CACHE[key] = f
    return f


def _route_filters(view: ProxyView, route_dests: list[dict], port: int, vs: Config) -> list[lc.Filter]:
    """tcp_proxy for a VirtualService tcp/tls route: one cluster, or weighted clusters."""
    if len(route_dests) == 1:
        dest = route_dests[0].get("destination") or {}
        svc = view.scope.services_by_host.get(dest.get("host", ""))
        cluster = routes.destination_cluster(dest, svc, port)
        return [tcp_proxy_filter(view, cluster)]
    t = tcp_proxy_pb2.TcpProxy(stat_prefix=f"{vs.name}.{vs.namespace}")
    for rd in route_dests:
        w = int(rd.get("weight") or 0)
        if w <= 0:
            continue
        dest = rd.get("destination") or {}
        svc = view.scope.services_by_host.get(dest.get("host", ""))
        t.weighted_clusters.clusters.add(name=routes.destination_cluster(dest, svc, port), weight=w)
    if not t.weighted_clusters.clusters:
        t.cluster = pb.BLACKHOLE_CLUSTER
    t.access_log.extend(pb.access_logs(*view.access_log))
    return [lc.Filter(name=pb.TCP_PROXY, typed_config=pb.pack(t))]


def _cidr(address: str) -> address_pb2.CidrRange | None:
    addr, _, plen = address.partition("/")
    if not is_ip(addr):
        return None
    if not plen:
        plen = "128" if ":" in addr else "32"
    return address_pb2.CidrRange(address_prefix=addr, prefix_len=pb.u32(int(plen)))


def _chain(filters: list[lc.Filter], *, sni: list[str] | None = None, cidrs: list[str] | None = None,
           alpn: list[str] | None = None, metadata: base_pb2.Metadata | None = None, name: str = "",
           force_match: bool = False) -> lc.FilterChain:
    fc = lc.FilterChain(filters=filters, name=name)
    names = sorted(sni) if sni and "*" not in sni else None
    ranges = []
    for c in sorted(cidrs or []):
        r = _cidr(c) if c else None
        if r is not None and r.address_prefix != UNSPECIFIED_IP:
            ranges.append(r)
    # The match is present when forced or when it matches on something (most chains: neither, so untouched).
    if names or ranges or alpn or force_match:
        m = fc.filter_chain_match
        if names:
            m.server_names.extend(names)
        if ranges:
            m.prefix_ranges.extend(ranges)
        if alpn:
            m.application_protocols.extend(alpn)
        m.SetInParent()
    if metadata is not None:
        fc.metadata.CopyFrom(metadata)
    return fc


def _match_key(fc: lc.FilterChain) -> bytes:
    return fc.filter_chain_match.SerializeToString(deterministic=True) if fc.HasField("filter_chain_match") else b""


def _is_match_all(fc: lc.FilterChain) -> bool:
    return _match_key(fc) == b""


def _vs_match_static(m: dict, view: ProxyView, port: int, gateways: set[str]) -> bool:
    if m.get("gateways") and not any(g in gateways for g in m["gateways"]):
        return False
    if any(view.labels.get(k) != v for k, v in (m.get("sourceLabels") or {}).items()):
        return False
    if m.get("port") and int(m["port"]) != port:
        return False
    return not m.get("sourceNamespace") or m["sourceNamespace"] == view.namespace


_VS_INDEX: dict[int, tuple[list, dict[str, list[Config]], list[Config]]] = {}


def vs_for_host(virtual_services: list[Config], hostname: str) -> list[Config]:
    """The VirtualServices (in order) with a host matching `hostname`, through a per-list index."""
    idx = _VS_INDEX.get(id(virtual_services))
    if idx is None or idx[0] is not virtual_services:
        exact: dict[str, list[Config]] = {}
        wild: list[Config] = []
        for vs in virtual_services:
            if any(h.startswith("*") for h in vs.hosts):
                wild.append(vs)
            for h in vs.hosts:
                if not h.startswith("*"):
                    exact.setdefault(h, []).append(vs)
        if len(_VS_INDEX) > 1000:
            _VS_INDEX.clear()
        idx = _VS_INDEX[id(virtual_services)] = (virtual_services, exact, wild)
    _, exact, wild = idx
    hits = exact.get(hostname, [])
    if not wild:
        return hits
    chosen = {id(v) for v in hits}
    chosen.update(id(v) for v in wild if any(host_matches(h, hostname) for h in v.hosts))
    return [v for v in virtual_services if id(v) in chosen]


def tcp_tls_chains(view: ProxyView, service: Service | None, listen_port: Port, cidr: str,
                   virtual_services: list[Config], gateways: set[str], on_wildcard: bool) -> list[lc.FilterChain]:
    """Istio's buildSidecarOutboundTCPTLSFilterChainOpts: VS tls/tcp routes, else the service's own cluster."""
    configs = virtual_services if service is None else vs_for_host(virtual_services, service.hostname)
    if configs:
        try:
            return _tcp_tls_chains(view, service, listen_port, cidr, configs, gateways, on_wildcard)
        except MALFORMED as e:
            view.errors.append(f"VirtualService tcp/tls routes for {service.hostname if service else '?'}: {e}")
            configs = []
    return _tcp_tls_chains(view, service, listen_port, cidr, configs, gateways, on_wildcard)


def _tcp_tls_chains(view: ProxyView, service: Service | None, listen_port: Port, cidr: str,
                    configs: list[Config], gateways: set[str], on_wildcard: bool) -> list[lc.FilterChain]:
    port = listen_port.port
    out: list[lc.FilterChain] = []

    def default_cluster() -> str:
        p = service.ports[0].port if service is not None and len(service.ports) == 1 else port
        return subset_key("outbound", "", service.hostname if service else "", p)

    if protocol.is_tls(listen_port.protocol):
        handled: set[str] = set()
        for vs in configs:
            for rule in vs.spec.get("tls") or []:
                for m in rule.get("match") or []:
                    if not _vs_match_static(m, view, port, gateways):
                        continue
                    h = ",".join(m.get("sniHosts") or []) + "|" + ",".join(m.get("destinationSubnets") or [])
                    if h in handled:
                        continue
                    handled.add(h)
                    cidrs = list(m.get("destinationSubnets") or []) or [cidr]
                    out.append(_chain(_route_filters(view, rule.get("route") or [], port, vs),
                                      sni=list(m.get("sniHosts") or []), cidrs=cidrs,
                                      metadata=pb.istio_metadata({"config": vs.meta_path})))
        if not out and service is not None:
            sni = [service.hostname] if (cidr or on_wildcard) else []
            out.append(_chain([tcp_proxy_filter(view, default_cluster())], sni=sni, cidrs=[cidr]))
        return out
    default_added = False
    for vs in configs:
        if default_added:
            break
        for rule in vs.spec.get("tcp") or []:
            matches = rule.get("match") or []
            md = pb.istio_metadata({"config": vs.meta_path})
            if not matches:
                out.append(_chain(_route_filters(view, rule.get("route") or [], port, vs), cidrs=[cidr], metadata=md))
                default_added = True
                break
            subnets: list[str] = []
            for m in matches:
                if not _vs_match_static(m, view, port, gateways):
                    continue
                if not m.get("destinationSubnets"):
                    out.append(_chain(_route_filters(view, rule.get("route") or [], port, vs), cidrs=[cidr],
                                      metadata=md))
                    default_added = True
                    break
                subnets.extend(m["destinationSubnets"])
            if default_added:
                break
            if subnets:
                out.append(_chain(_route_filters(view, rule.get("route") or [], port, vs), cidrs=subnets))
                if sorted(subnets) == sorted([cidr]):
                    default_added = True
    if not default_added and service is not None:
        out.append(_chain([tcp_proxy_filter(view, default_cluster())], cidrs=[cidr]))
    return out


class _Entry:
    __slots__ = ("bind", "port", "services", "service_port", "protocol", "chains", "http_inspector", "locked",
                 "bind_to_port")

    def __init__(self, bind: str, port: int, service: Service | None, service_port: Port, proto: str,
                 chains: list[lc.FilterChain], http_inspector: bool):
        self.bind = bind
        self.port = port
        self.services = [service] if service is not None else []
        self.service_port = service_port
        self.protocol = proto
        self.chains = chains
        self.http_inspector = http_inspector
        self.locked = False
        self.bind_to_port = False


def _merge_tcp(entry: _Entry, incoming: list[lc.FilterChain], service: Service | None) -> None:
    keys = {_match_key(fc) for fc in entry.chains}
    for fc in incoming:
        k = _match_key(fc)
        if k in keys:
            continue  # TCP over TCP with the same match: the older chain wins
        keys.add(k)
        entry.chains.append(fc)
        if service is not None:
            entry.services.append(service)


def _with_http_alpn(chains: list[lc.FilterChain]) -> list[lc.FilterChain]:
    out = []
    for fc in chains:
        have = list(fc.filter_chain_match.application_protocols)
        missing = [p for p in PLAINTEXT_HTTP_ALPNS if p not in have]
        if missing:
            fc = lc.FilterChain.FromString(fc.SerializeToString())
            fc.filter_chain_match.application_protocols.extend(missing)
        out.append(fc)
    return out


def _well_known_conflict(incoming: str, existing: str) -> bool:
    special = (protocol.MONGO, protocol.MYSQL)
    return (incoming in special or existing in special) and incoming != existing


class _OutboundBuilder:
    def __init__(self, push: PushContext, view: ProxyView):
        self.push = push
        self.view = view
        self.entries: dict[str, _Entry] = {}
        self.rds_names: dict[str, None] = {}
        self.bind_to_port = False  # set while adding a Sidecar egress listener with captureMode NONE
        self._rds_of: dict[int, str] = {}  # id(filter chain) → its RDS name, to list only names still in use

    def _new_entry(self, *args) -> _Entry:
        e = _Entry(*args)
        e.bind_to_port = self.bind_to_port
        return e

    def _http_chain(self, bind: str, port: int, rds: str, port_protocol: str, alpn: bool) -> lc.FilterChain:
        h = build_hcm(self.push, self.view, f"outbound_{bind}_{port}", rds=rds, port_protocol=port_protocol)
        fc = _chain([hcm_filter(h)], alpn=PLAINTEXT_HTTP_ALPNS if alpn else None)
        self._rds_of[id(fc)] = rds
        return fc

    def _with_http_alpn(self, chains: list[lc.FilterChain]) -> list[lc.FilterChain]:
        out = _with_http_alpn(chains)
        for old, new in zip(chains, out, strict=True):
            if id(old) in self._rds_of:
                self._rds_of[id(new)] = self._rds_of[id(old)]
        return out

    def add(self, service: Service | None, sport: Port, listen_port: Port, bind: str,
            virtual_services: list[Config]) -> None:
        cls = protocol.listener_class(listen_port.protocol)  # HTTP_PROXY is HTTP; Thrift is plain TCP here
        if cls is None:
            return  # UDP
        if cls == "HTTP":
            self._add_http(service, sport, listen_port, bind or WILDCARD)
        elif cls == "TCP":
            self._add_tcp(service, sport, listen_port, bind, virtual_services)
        else:
            self._add_auto(service, sport, listen_port, bind, virtual_services)

    def _tcp_bind(self, service: Service | None, bind: str) -> tuple[str, str]:
        if bind:
            return bind, ""
        addr = service.address if service is not None else UNSPECIFIED_IP
        if "/" in addr:
            return WILDCARD, addr
        return addr or WILDCARD, ""

    def _add_http(self, service, sport, listen_port, bind) -> None:
        port = listen_port.port
        key = f"{bind}:{port}"
        if bind == WILDCARD and port in RESERVED_PORTS:
            return
        cur = self.entries.get(key)
        if cur is not None:
            if cur.locked:
                return
            if cur.protocol in ("HTTP", "AUTO"):
                if service is not None:
                    cur.services.append(service)
                return
        on_wildcard = bind == WILDCARD
        chains = [self._http_chain(bind, port, str(port), listen_port.protocol, alpn=on_wildcard)]
        proto = "AUTO" if on_wildcard else "HTTP"
        if cur is None:
            self.entries[key] = self._new_entry(bind, port, service, sport, proto, chains, on_wildcard)
            return
        # HTTP over TCP: the TCP chains stay, the HTTP chain is sniffed by ALPN.
        if _well_known_conflict(listen_port.protocol, cur.service_port.protocol):
            return
        cur.chains = cur.chains + self._with_http_alpn(chains)
        cur.protocol = "AUTO"
        cur.http_inspector = True
        if service is not None:
            cur.services.append(service)

    def _tcp_slot(self, service, listen_port, bind, virtual_services):
        """Where a TCP or sniffed port lands: (key, current entry, bind, its TCP chains); None when the port
        is reserved on the wildcard or the listener there is locked by a Sidecar egress port."""
        port = listen_port.port
        bind, cidr = self._tcp_bind(service, bind)
        if bind == WILDCARD and port in RESERVED_PORTS:
            return None
        key = f"{bind}:{port}"
        cur = self.entries.get(key)
        if cur is not None and cur.locked:
            return None
        chains = tcp_tls_chains(self.view, service, listen_port, cidr, virtual_services, {MESH_GATEWAY},
                                on_wildcard=bind == WILDCARD)
        return key, cur, bind, chains

    def _add_tcp(self, service, sport, listen_port, bind, virtual_services) -> None:
        slot = self._tcp_slot(service, listen_port, bind, virtual_services)
        if slot is None:
            return
        key, cur, bind, chains = slot
        port = listen_port.port
        if not chains:
            return
        if cur is None:
            self.entries[key] = self._new_entry(bind, port, service, sport, "TCP", chains, False)
            return
        if _well_known_conflict(listen_port.protocol, cur.service_port.protocol):
            return
        if cur.protocol == "HTTP":
            cur.chains = chains + self._with_http_alpn(cur.chains)
            cur.protocol = "AUTO"
            cur.http_inspector = True
            if service is not None:
                cur.services.append(service)
        else:
            _merge_tcp(cur, chains, service)

    def _add_auto(self, service, sport, listen_port, bind, virtual_services) -> None:
        slot = self._tcp_slot(service, listen_port, bind, virtual_services)
        if slot is None:
            return
        key, cur, bind, chains = slot
        port = listen_port.port
        if bind != WILDCARD and service is not None:
            rds = f"{service.hostname}:{port}"
        else:
            rds = str(port)
        chains.append(self._http_chain(bind, port, rds, listen_port.protocol, alpn=True))
        if cur is None:
            self.entries[key] = self._new_entry(bind, port, service, sport, "AUTO", chains, True)
            return
        if cur.protocol == "HTTP":
            entry = self._new_entry(bind, port, service, sport, "AUTO", chains, True)
            entry.services = cur.services + entry.services
            self.entries[key] = entry
        elif cur.protocol == "TCP":
            _merge_tcp(cur, chains, service)
            cur.protocol = "AUTO"
            cur.http_inspector = True
        elif service is not None:
            cur.services.append(service)

    def listeners(self) -> list[Listener]:
        tcp_first = [e for e in self.entries.values() if protocol.is_tcp(e.service_port.protocol)]
        rest = [e for e in self.entries.values() if not protocol.is_tcp(e.service_port.protocol)]
        out = []
        for e in tcp_first + rest:
            out.append(self._listener(e))
        return out

    def _listener(self, e: _Entry) -> Listener:
        chains = list(e.chains)
        for fc in chains:
            if id(fc) in self._rds_of:
                self.rds_names[self._rds_of[id(fc)]] = None
        if not any(_is_match_all(fc) for fc in chains):
            cluster = pb.BLACKHOLE_CLUSTER if self.view.scope.outbound_policy == "REGISTRY_ONLY" \
                else pb.PASSTHROUGH_CLUSTER
            fc = lc.FilterChain(name=pb.PASSTHROUGH_FILTER_CHAIN, filters=[tcp_proxy_filter(self.view, cluster)])
            fc.filter_chain_match.SetInParent()
            chains.append(fc)
        needs_tls = e.http_inspector or any(fc.filter_chain_match.server_names for fc in chains)
        lst = Listener(name=f"{e.bind}_{e.port}", traffic_direction=base_pb2.OUTBOUND)
        pb.set_socket_address(lst.address, e.bind, e.port)
        if not e.bind_to_port:
            lst.bind_to_port.value = False  # reached through virtualOutbound's original-destination hand-off
        if needs_tls:
            lst.listener_filters.append(_TLS_INSPECTOR)
        if e.http_inspector:
            lst.listener_filters.append(_HTTP_INSPECTOR)
            pb.set_duration(lst.listener_filters_timeout, self.push.mesh.protocol_detection_timeout)
            lst.continue_on_listener_filters_timeout = True
        lst.filter_chains.extend(chains)
        return lst


def outbound_listeners(push: PushContext, view: ProxyView) -> tuple[list[Listener], list[str]]:
    """Per-port outbound listeners of a sidecar scope, and the RDS route names they use."""
    b = _OutboundBuilder(push, view)
    for egress in view.scope.egress:
        bind_to_port = egress.capture_mode == "NONE"
        b.bind_to_port = bind_to_port
        if egress.port is not None:
            bind = egress.bind or ("127.0.0.1" if bind_to_port else WILDCARD)
            for svc in egress.services:
                sport = svc.port_by_number(egress.port.port) or egress.port
                b.add(svc, sport, egress.port, bind, egress.virtual_services)
            if not egress.services:
                b.add(None, egress.port, egress.port, bind, egress.virtual_services)
            continue
        for e in b.entries.values():
            e.locked = True
        bind = egress.bind or ("127.0.0.1" if bind_to_port else "")
        for svc in egress.services:
            if svc.resolution == "Alias":
                continue
            for sport in svc.ports:
                if (not bind and svc.resolution == PASSTHROUGH and svc.address == UNSPECIFIED_IP
                        and protocol.is_tcp(sport.protocol)):
                    eps = svc.endpoints.get(sport.port, ())
                    if svc.registry != "Kubernetes" and not eps and not svc.selector:
                        b.add(svc, sport, sport, bind, egress.virtual_services)
                        continue
                    for ep in eps:
                        if not is_ip(ep.address) or ep.address == view.own_ip:
                            continue
                        b.add(svc, sport, sport, ep.address, egress.virtual_services)
                    continue
                b.add(svc, sport, sport, bind, egress.virtual_services)
    listeners = b.listeners()
    return listeners, list(b.rds_names)


def virtual_outbound_listener(push: PushContext, view: ProxyView) -> Listener:
    port = push.mesh.proxy_listen_port
    lst = Listener(name=VIRTUAL_OUTBOUND, traffic_direction=base_pb2.OUTBOUND)
    pb.set_socket_address(lst.address, WILDCARD, port)
    lst.use_original_dst.value = True
    # A connection addressed to 15001 itself would loop forever: black-hole it.
    bh = lst.filter_chains.add(name=VIRTUAL_OUTBOUND_BLACKHOLE)
    bh.filter_chain_match.destination_port.value = port
    bh.filters.append(tcp_proxy_filter(view, pb.BLACKHOLE_CLUSTER))
    cluster = pb.BLACKHOLE_CLUSTER if view.scope.outbound_policy == "REGISTRY_ONLY" else pb.PASSTHROUGH_CLUSTER
    if view.scope.egress_proxy and cluster == pb.PASSTHROUGH_CLUSTER:
        cluster = routes.destination_cluster(view.scope.egress_proxy, None, 0)
    lst.filter_chains.add(name=VIRTUAL_OUTBOUND_CATCHALL, filters=[tcp_proxy_filter(view, cluster)])
    return lst


# ---------------------------------------------------------------------------------------------- inbound
def _inbound_class(p: Port) -> str:
    cls = protocol.listener_class(p.protocol)
    return cls or "TCP"


def _inbound_chain(name: str, filters: list[lc.Filter], *, port: int | None = None,
                   prefix: address_pb2.CidrRange | None = None, alpn: list[str] | None = None, transport: str = "",
                   tls_ctx=None) -> lc.FilterChain:
    """An inbound filter chain: matched on destination port (and prefix), ALPN and transport; TLS when given."""
    fc = lc.FilterChain(name=name, filters=filters)
    m = fc.filter_chain_match
    if prefix is not None:
        m.prefix_ranges.append(prefix)
    if port is not None:
        m.destination_port.value = port
    if alpn:
        m.application_protocols.extend(alpn)
    if transport:
        m.transport_protocol = transport
    if tls_ctx is not None:
        fc.transport_socket.CopyFrom(tls.tls_socket(tls_ctx))
    return fc


def inbound_chains(push: PushContext, view: ProxyView, proxy, inst: ServiceInstance, mode: str) -> list[lc.FilterChain]:
    """The filter chains for one inbound target port, per mTLS mode (1.7 listener.go + authn plugin)."""
    cluster = inbound_cluster_name(inst)
    port = inst.inbound_port
    name = f"{WILDCARD}_{port}"
    cls = _inbound_class(inst.port)
    td = push.mesh.trust_domain
    sec_http, sec_tcp = security.inbound_filters(push, proxy)

    def http_filters() -> list[lc.Filter]:
        h = build_hcm(push, view, f"inbound_{WILDCARD}_{port}",
                      route_config=routes.inbound_route_config(cluster, inst.port.port, inst.service.hostname),
                      inbound=True, port_protocol=inst.port.protocol, security_filters=sec_http)
        return [hcm_filter(h)]

    def tcp_filters() -> list[lc.Filter]:
        return [*sec_tcp, tcp_proxy_filter(view, cluster)]

    def chain(filters, *, alpn=None, transport="", tls_ctx=None) -> lc.FilterChain:
        return _inbound_chain(name, filters, port=port, alpn=alpn, transport=transport, tls_ctx=tls_ctx)

    if cls == "HTTP":
        if mode == "STRICT":
            return [chain(http_filters(), tls_ctx=tls.inbound_mtls(True, td))]
        if mode == "PERMISSIVE":
            return [chain(http_filters(), alpn=ALPN_IN_MESH + MTLS_HTTP_ALPNS, tls_ctx=tls.inbound_mtls(True, td)),
                    chain(http_filters())]
        return [chain(http_filters())]
    if cls == "TCP":
        if mode == "STRICT":
            return [chain(tcp_filters(), tls_ctx=tls.inbound_mtls(False, td))]
        if mode == "PERMISSIVE":
            return [chain(tcp_filters(), alpn=MTLS_TCP_ALPNS_MXC, tls_ctx=tls.inbound_mtls(False, td)),
                    chain(tcp_filters())]
        return [chain(tcp_filters())]
    # Sniffed port.
    if mode == "PERMISSIVE":
        return [
            chain(http_filters(), alpn=MTLS_HTTP_ALPNS, transport="tls",
                  tls_ctx=tls.inbound_mtls(False, td, drop_mxc=True)),
            chain(http_filters(), alpn=PLAINTEXT_HTTP_ALPNS),
            chain(tcp_filters(), alpn=MTLS_TCP_ALPNS_MXC, transport="tls", tls_ctx=tls.inbound_mtls(False, td)),
            chain(tcp_filters()),
            chain(tcp_filters(), transport="tls"),
        ]
    if mode == "STRICT":
        return [chain(http_filters(), alpn=MTLS_HTTP_ALPNS, tls_ctx=tls.inbound_mtls(False, td, drop_mxc=True)),
                chain(tcp_filters(), tls_ctx=tls.inbound_mtls(False, td))]
    return [chain(http_filters(), alpn=PLAINTEXT_HTTP_ALPNS), chain(tcp_filters())]


def _passthrough_chains(push: PushContext, view: ProxyView, mode: str, port: int | None,
                        proxy=None) -> list[lc.FilterChain]:
    """Catch-all inbound chains to InboundPassthroughClusterIpv4: TCP ones, then HTTP ones (1.7 order)."""
    cluster = pb.INBOUND_PASSTHROUGH_CLUSTER_IPV4
    sec_http, sec_tcp = security.inbound_filters(push, proxy) if proxy is not None else ([], [])
    td = push.mesh.trust_domain
    cidr = address_pb2.CidrRange(address_prefix=WILDCARD, prefix_len=pb.u32(0))

    def base(name: str, filters, *, alpn=None, transport="", tls_ctx=None) -> lc.FilterChain:
        return _inbound_chain(name, filters, port=port, prefix=cidr, alpn=alpn, transport=transport, tls_ctx=tls_ctx)

    tcp = [*sec_tcp, tcp_proxy_filter(view, cluster)]
    out = []
    if mode == "PERMISSIVE":
        out.append(base(VIRTUAL_INBOUND, tcp, alpn=MTLS_TCP_ALPNS_MXC, transport="tls",
                        tls_ctx=tls.inbound_mtls(False, td)))
        out.append(base(VIRTUAL_INBOUND, tcp))
    elif mode == "STRICT":
        out.append(base(VIRTUAL_INBOUND, tcp, transport="tls", tls_ctx=tls.inbound_mtls(False, td)))
    else:
        out.append(base(VIRTUAL_INBOUND, tcp))

    def http() -> list[lc.Filter]:
        h = build_hcm(push, view, cluster, route_config=routes.inbound_route_config(cluster, 0, ""), inbound=True,
                      port_protocol=protocol.HTTP, security_filters=sec_http)
        return [hcm_filter(h)]

    if mode in ("PERMISSIVE", "STRICT"):
        out.append(base(VIRTUAL_INBOUND_CATCHALL_HTTP, http(), alpn=PLAINTEXT_HTTP_ALPNS + MTLS_HTTP_ALPNS,
                        transport="tls", tls_ctx=tls.inbound_mtls(True, td)))
    if mode in ("PERMISSIVE", "DISABLE"):
        out.append(base(VIRTUAL_INBOUND_CATCHALL_HTTP, http(), alpn=PLAINTEXT_HTTP_ALPNS))
    return out


def virtual_inbound_listener(push: PushContext, view: ProxyView, proxy, instances: list[ServiceInstance]) -> Listener:
    port = push.mesh.proxy_inbound_listen_port
    lst = Listener(name=VIRTUAL_INBOUND, traffic_direction=base_pb2.INBOUND)
    pb.set_socket_address(lst.address, WILDCARD, port)
    lst.use_original_dst.value = True
    workload_mode = push.mtls_mode(proxy.namespace, proxy.labels)
    chains = _passthrough_chains(push, view, workload_mode, None, proxy)
    declared = {i.inbound_port for i in instances}
    for p, pmode in sorted(push.port_level_mtls_ports(proxy.namespace, proxy.labels).items()):
        if p not in declared and pmode != "UNSET":
            chains += _passthrough_chains(push, view, pmode, p, proxy)
    service_chains: list[lc.FilterChain] = []
    seen_ports: set[int] = set()
    for inst in instances:
        if inst.inbound_port in seen_ports or inst.port.protocol == protocol.UDP or inst.capture_mode == "NONE":
            continue  # first service on a target port wins; capture NONE ports get a listener of their own
        seen_ports.add(inst.inbound_port)
        mode = push.mtls_mode(proxy.namespace, proxy.labels, inst.inbound_port)
        service_chains += inbound_chains(push, view, proxy, inst, mode)
    service_chains.sort(key=lambda fc: fc.name)
    chains += service_chains
    lst.filter_chains.extend(chains)
    lst.listener_filters.append(_ORIGINAL_DST)
    if any(fc.HasField("transport_socket") or fc.filter_chain_match.transport_protocol for fc in chains):
        lst.listener_filters.append(_TLS_INSPECTOR)
    lst.listener_filters.append(_HTTP_INSPECTOR)
    pb.set_duration(lst.listener_filters_timeout, push.mesh.inbound_protocol_detection_timeout)
    lst.continue_on_listener_filters_timeout = True
    return lst


def bound_inbound_listeners(push: PushContext, view: ProxyView, proxy,
                            instances: list[ServiceInstance]) -> list[Listener]:
    """Sidecar ingress ports with `captureMode: NONE`: real listeners on the workload's address."""
    out = []
    for inst in instances:
        if inst.capture_mode != "NONE":
            continue
        bind = inst.bind or proxy.ip
        mode = push.mtls_mode(proxy.namespace, proxy.labels, inst.inbound_port)
        lst = Listener(name=f"{bind}_{inst.inbound_port}", traffic_direction=base_pb2.INBOUND)
        pb.set_socket_address(lst.address, bind, inst.inbound_port)
        for fc in inbound_chains(push, view, proxy, inst, mode):
            fc.name = lst.name
            fc.filter_chain_match.ClearField("destination_port")
            if fc.filter_chain_match.ByteSize() == 0:
                fc.ClearField("filter_chain_match")
            lst.filter_chains.append(fc)
        if any(fc.filter_chain_match.transport_protocol or fc.filter_chain_match.application_protocols
               for fc in lst.filter_chains):
            lst.listener_filters.append(_TLS_INSPECTOR)
        if any(list(fc.filter_chain_match.application_protocols) == PLAINTEXT_HTTP_ALPNS for fc in lst.filter_chains):
            lst.listener_filters.append(_HTTP_INSPECTOR)
        out.append(lst)
    return out


# ---------------------------------------------------------------------------------------------- gateways
def gateway_servers(push: PushContext, view: ProxyView, instances: list[ServiceInstance]
                    ) -> dict[tuple[int, str], list[tuple[Config, dict, int]]]:
    """Servers of every Gateway selecting the proxy, merged by (listen port, bind): server port → targetPort,
    and a server with `bind` gets a listener of its own on that address (Istio ≥ 1.10's MergeGateways)."""
    target = {i.port.port: i.endpoint_port for i in instances}
    out: dict[tuple[int, str], list[tuple[Config, dict, int]]] = {}
    for gw in view.gateways:
        for server in gw.spec.get("servers") or []:
            sport = int((server.get("port") or {}).get("number") or 0)
            if not sport:
                continue
            listen = target.get(sport, sport)
            out.setdefault((listen, server.get("bind") or ""), []).append((gw, server, sport))
    return out


def _bind_suffix(server: dict) -> str:
    """Istio's gatewayRDSRouteName appends `.<bind>` for a server with `bind`."""
    return f".{server['bind']}" if server.get("bind") else ""


def https_route_name(server: dict, gw: Config, sport: int) -> str:
    return (f"https.{sport}.{(server.get('port') or {}).get('name', '')}.{gw.name}.{gw.namespace}"
            f"{_bind_suffix(server)}")


def gateway_listeners(push: PushContext, view: ProxyView, instances: list[ServiceInstance],
                      security_filters: tuple[list, list] = ([], [])
                      ) -> tuple[list[Listener], dict[str, tuple[int, list[tuple[Config, dict]]]]]:
    """Gateway listeners, plus the RDS names they use → (server port, servers) for routes.gateway_route_config.
    `security_filters` (HTTP, network) go first on every HTTP / TCP chain (AuthorizationPolicy, JWT)."""
    sec_http, sec_tcp = security_filters
    listeners: list[Listener] = []
    rds: dict[str, tuple[int, list[tuple[Config, dict]]]] = {}
    for (listen, bind), servers in sorted(gateway_servers(push, view, instances).items()):
        if listen in RESERVED_PORTS:
            continue
        address = bind or WILDCARD
        lst = Listener(name=f"{address}_{listen}", traffic_direction=base_pb2.OUTBOUND)
        pb.set_socket_address(lst.address, address, listen)
        chains: list[lc.FilterChain] = []
        keys: set[bytes] = set()
        plain_http: list[tuple[Config, dict]] = []
        sport_for_http = 0
        for gw, server, sport in servers:
            proto = protocol.parse((server.get("port") or {}).get("protocol"))
            stls = server.get("tls") or {}
            mode = stls.get("mode") or "SIMPLE"
            hosts = [h.partition("/")[2] if "/" in h else h for h in server.get("hosts") or []]
            gw_name = f"{gw.namespace}/{gw.name}"

            if protocol.is_http(proto) and not stls.get("mode"):
                plain_http.append((gw, server))  # merged into one `http.<port>` chain (httpsRedirect: vhost)
                sport_for_http = sport
            elif (protocol.is_http(proto) or proto == protocol.HTTPS) and mode not in ("PASSTHROUGH",
                                                                                       "AUTO_PASSTHROUGH"):
                # HTTPS terminated here: one chain per server, SNI = its hosts, RDS `https.<port>.<name>.<gw>.<ns>`
                name = https_route_name(server, gw, sport)
                rds[name] = (sport, [(gw, server)])
                h = build_hcm(push, view, f"outbound_{address}_{listen}", rds=name, port_protocol=proto,
                              use_remote_address=True, security_filters=sec_http)
                fc = _chain([hcm_filter(h)], sni=hosts)
                ctx = tls.server_tls(stls, push.mesh.trust_domain)
                if ctx is not None:
                    fc.transport_socket.CopyFrom(tls.tls_socket(ctx))
                _add_unique(chains, keys, fc)
            elif protocol.is_tls(proto) and mode == "AUTO_PASSTHROUGH":
                # SNI `outbound_.<port>_.<subset>_.<host>` names the SNI-DNAT cluster directly
                _add_unique(chains, keys, _chain(
                    [lc.Filter(name="envoy.filters.network.sni_cluster", typed_config=pb.pack(_sni_cluster())),
                     tcp_proxy_filter(view, pb.BLACKHOLE_CLUSTER)], sni=hosts, force_match=True))
            else:
                # TCP, TLS passthrough (VirtualService tls routes by SNI) or TLS terminated here (tcp routes)
                passthrough = protocol.is_tls(proto) and mode == "PASSTHROUGH"
                section = "tls" if passthrough else "tcp"
                ctx = tls.server_tls(stls, push.mesh.trust_domain) if protocol.is_tls(proto) and not passthrough \
                    else None
                for vs in push.mesh_virtual_services(view.namespace, gw_name):
                    for rule in vs.spec.get(section) or []:
                        for m in rule.get("match") or [{}]:
                            if m and not _vs_match_static(m, view, sport, {gw_name}):
                                continue
                            sni = [s for s in (m.get("sniHosts") or []) if any(host_matches(s, h) for h in hosts)]
                            if passthrough and not sni:
                                continue
                            if ctx is not None and not sni:
                                sni = hosts
                            fc = _chain([*sec_tcp, *_route_filters(view, rule.get("route") or [], sport, vs)], sni=sni,
                                        cidrs=list(m.get("destinationSubnets") or []),
                                        metadata=pb.istio_metadata({"config": vs.meta_path}))
                            if ctx is not None:
                                fc.transport_socket.CopyFrom(tls.tls_socket(ctx))
                            _add_unique(chains, keys, fc)
        if plain_http:
            name = f"http.{sport_for_http}{_bind_suffix(plain_http[0][1])}"
            rds[name] = (sport_for_http, plain_http)
            h = build_hcm(push, view, f"outbound_{address}_{listen}", rds=name,
                          port_protocol=protocol.HTTP, use_remote_address=True, security_filters=sec_http)
            fc = lc.FilterChain(filters=[hcm_filter(h)])
            if b"" not in keys:
                keys.add(b"")
                chains.append(fc)
        if not chains:
            continue
        lst.filter_chains.extend(chains)
        if any(fc.filter_chain_match.server_names for fc in chains):
            lst.listener_filters.append(_TLS_INSPECTOR)
        listeners.append(lst)
    return listeners, rds


def _add_unique(chains: list[lc.FilterChain], keys: set[bytes], fc: lc.FilterChain) -> None:
    """Append a chain unless one with the same match is there (Envoy rejects duplicates; the first wins)."""
    k = _match_key(fc)
    if k not in keys:
        keys.add(k)
        chains.append(fc)


def _sni_cluster():
    from envoy.extensions.filters.network.sni_cluster.v3 import sni_cluster_pb2

    return sni_cluster_pb2.SniCluster()
