"""What a proxyless gRPC application gets instead of a sidecar's config (istiod's pilot/pkg/networking/grpcgen).

A node whose metadata says `GENERATOR: grpc` (written by `mizzen bootstrap --grpc`) is a grpcio/grpc-go process
with a built-in xDS client, not an Envoy. Its channel for `xds:///<host>:<port>` asks for:

* LDS `<host>:<port>` — a Listener whose `api_listener` holds an HttpConnectionManager with RDS (over ADS)
  naming route config `outbound|<port>||<fqdn>`, and only the HTTP filters gRPC implements (fault, router);
* RDS `outbound|<port>||<fqdn>` — the service's virtual host as the sidecar's RDS has it (VirtualService
  matches, weights, subsets, timeouts, retries), so routing is decided by the same code as for Envoy;
* CDS `outbound|<port>|<subset>|<fqdn>` — plain EDS clusters over ADS (`service_name` = the cluster name);
* EDS — the same ClusterLoadAssignments sidecars get.

istiod builds only the requested names; Mizzen's snapshots are content-addressed and complete, so this builds
every service port's resources once per view (shared by every proxyless client with the same view) and the
gateway answers each request with the named subset. Listeners exist under each name a client may use for
the host: the FQDN and the short forms a client in the proxy's namespace can resolve (`svc`, `svc.ns`, …).
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb

from mizzen.services.mesh.xds_types import CLUSTER, ENDPOINT, LISTENER, ROUTE

from . import clusters, endpoints, pb, routes
from .clusters import subset_key
from .model import ALIAS, UNSPECIFIED_IP
from .proxy import Proxy
from .push_context import PushContext

GENERATOR = "grpc"  # node metadata GENERATOR value of proxyless clients (as Istio's gRPC bootstrap)

# gRPC implements these HTTP filters (fault injection and the router, which must be last), as istiod sends them.
_FILTERS = (
    hcm_pb.HttpFilter(name=pb.HTTP_FAULT, typed_config=pb.pack(fault_pb2.HTTPFault())),
    hcm_pb.HttpFilter(name=pb.HTTP_ROUTER, typed_config=pb.pack(router_pb2.Router())),
)


def is_proxyless(proxy: Proxy) -> bool:
    return str(proxy.metadata.get("GENERATOR", "")).lower() == GENERATOR


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


def eds_cluster(name: str) -> cluster_pb2.Cluster:
    """grpcgen's edsCluster: a name, type EDS, endpoints over ADS; gRPC ignores (or NACKs) Envoy-only fields."""
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS, lb_policy=cluster_pb2.Cluster.ROUND_ROBIN)
    c.eds_cluster_config.service_name = name
    c.eds_cluster_config.eds_config.CopyFrom(_ads())
    return c


def api_listener(name: str, address: str, port: int, route_name: str) -> listener_pb2.Listener:
    h = hcm_pb.HttpConnectionManager()
    h.rds.config_source.CopyFrom(_ads())
    h.rds.route_config_name = route_name
    h.http_filters.extend(_FILTERS)
    ln = listener_pb2.Listener(name=name)
    sa = ln.address.socket_address
    sa.address, sa.port_value = address, port
    ln.api_listener.api_listener.CopyFrom(pb.pack(h))
    return ln


def listener_names(fqdn: str, port: int, proxy_domain: str) -> list[str]:
    """`<fqdn>:<port>` and each shorter host form with its port (`svc:port`, `svc.ns:port`, `svc.ns.svc:port`)."""
    out = [f"{fqdn}:{port}"]
    out += [h for h in routes.alt_hosts(fqdn, port, proxy_domain) if h.endswith(f":{port}")]
    return out


def route_config(push: PushContext, view, fqdn: str, port: int, name: str) -> route_pb2.RouteConfiguration:
    """The service's virtual host from the sidecar's RDS for the port (same VirtualService translation), or a
    default route to the service's cluster when the port has none (e.g. a TCP port)."""
    vhosts = [v for v in routes.outbound_virtual_hosts(push, view, port) if f"{fqdn}:{port}" in v.domains]
    rc = route_pb2.RouteConfiguration(name=name)
    for v in vhosts:
        routes.add_virtual_host(rc, v)
    if not vhosts:
        vh = rc.virtual_hosts.add(name=f"{fqdn}:{port}", domains=[fqdn, f"{fqdn}:{port}"])
        vh.routes.append(routes.default_route(subset_key("outbound", "", fqdn, port), f"{fqdn}:{port}/*"))
    return rc


def grpc_assignment(push: PushContext, cla: endpoint_pb2.ClusterLoadAssignment) -> endpoint_pb2.ClusterLoadAssignment:
    """The sidecar's assignment with every locality present: gRPC rejects a LocalityLbEndpoints without one
    (istiod always sets it, empty when unknown)."""
    if all(lle.HasField("locality") for lle in cla.endpoints):
        return cla
    key = ("grpc-eds", id(cla))
    out = push.cache.get(key)
    if out is None:
        out = endpoint_pb2.ClusterLoadAssignment()
        out.CopyFrom(cla)
        for lle in out.endpoints:
            lle.locality.SetInParent()
        push.cache[key] = (out, cla)  # keep cla alive: its id is the key
        return out
    return out[0]


def layers(push: PushContext, proxy: Proxy) -> list[dict]:
    """[outbound layer (CDS, LDS, RDS), endpoints layer], memoised per proxy view."""
    view = push.view(proxy)
    key = ("grpc-layers", view.key, view.dns_domain)
    hit = push.cache.get(key)
    if hit is not None:
        return hit
    envoy_clusters, needs = clusters.outbound_clusters(push, view.scope, is_sidecar=True)
    eds_names = {n.cluster_name for n in needs}
    cds = {name: eds_cluster(name) for name in envoy_clusters if name in eds_names}
    lds: dict[str, object] = {}
    rds: dict[str, object] = {}
    for svc in view.scope.services:
        if svc.resolution == ALIAS:
            continue
        address = svc.address if svc.address and "/" not in svc.address else UNSPECIFIED_IP
        for port in svc.ports:
            rname = subset_key("outbound", "", svc.hostname, port.port)
            if rname not in cds:
                continue  # not an EDS service port (DNS, passthrough): gRPC has no cluster to call
            rds.setdefault(rname, route_config(push, view, svc.hostname, port.port, rname))
            for name in listener_names(svc.hostname, port.port, view.dns_domain):
                lds.setdefault(name, api_listener(name, address, port.port, rname))
    eds = {name: grpc_assignment(push, cla)
           for name, cla in endpoints.load_assignments(push, [n for n in needs if n.cluster_name in cds]).items()}
    hit = [{CLUSTER: cds, LISTENER: lds, ROUTE: rds}, {ENDPOINT: eds}]
    push.cache[key] = hit
    return hit
