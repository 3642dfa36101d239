"""A proxy's snapshot as layers of Envoy resources, shared between proxies wherever the content is the same.

    build_snapshot(push, proxy) -> Snapshot     layers: [outbound, endpoints, proxy's own]

* outbound layer — clusters, listeners and route configs that depend only on the proxy's view (type,
  namespace, Sidecar scope, the labels VirtualService rules test): memoised on the push context, so proxies
  with the same view get the **same Python object**;
* endpoints layer — the ClusterLoadAssignments the outbound EDS clusters need (memoised the same way; they
  depend on the proxy only through its locality, and only for clusters locality load balancing applies to);
* own layer — the sidecar's inbound clusters, InboundPassthroughClusterIpv4 and `virtualInbound` (replicas
  of one workload, which have identical inbound sides, share it too).

Within a type, resources keep istiod's order (outbound clusters, BlackHole, Passthrough, inbound clusters,
InboundPassthrough; per-port listeners, virtualOutbound, virtualInbound). The shell serialises each layer once
per object identity; every RDS name a listener uses and every EDS cluster's assignment is in the snapshot.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mizzen.services.mesh.xds_types import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET

from . import clusters, endpoints, envoyfilter, grpcgen, incremental, listeners, routes, secrets, security
from .model import CLIENT_SIDE_LB, KUBERNETES, Endpoint, service_id
from .proxy import Proxy
from .push_context import ProxyView, PushContext

Layer = dict[str, dict[str, object]]
# Kinds whose changes may reach no further than EDS (endpoint_only_changes checks, else a full build). A Node's
# labels are its pods' locality: endpoint localities, and the proxies' own (recomputed every build).
ENDPOINT_KINDS = frozenset({"Endpoints", "EndpointSlice", "Node"})
# A Pod reaches the mesh through its endpoints (labels, locality, service account via targetRef) and through the
# proxy it runs (its labels pick Services, Sidecars, policies); views and inbound layers are keyed by what the
# labels decide, so the endpoints path holds when endpoint_only_changes accepts the endpoint side.
POD_KINDS = ENDPOINT_KINDS | {"Pod"}


@dataclass
class Snapshot:
    proxy: Proxy
    layers: list[Layer] = field(default_factory=list)

    def resources(self, type_url: str) -> dict[str, object]:
        """One type's resources across layers (later layers win on a name clash), in order."""
        out: dict[str, object] = {}
        for layer in self.layers:
            out.update(layer.get(type_url, {}))
        return out

    def merged(self) -> dict[str, dict[str, object]]:
        return {t: self.resources(t) for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)}


def _by_name(items) -> dict[str, object]:
    out: dict[str, object] = {}
    for m in items:
        out.setdefault(m.name, m)
    return out


def _sidecar_outbound(push: PushContext, view: ProxyView) -> tuple[Layer, list]:
    cds, needs = clusters.outbound_clusters(push, view.scope, is_sidecar=True)
    lds, rds_names = listeners.outbound_listeners(push, view)
    lds.append(listeners.virtual_outbound_listener(push, view))
    rds = [routes.sidecar_route_config(push, view, name) for name in rds_names]
    layer = {CLUSTER: cds, LISTENER: _by_name(lds), ROUTE: _by_name(rds)}
    return layer, needs


def _router_outbound(push: PushContext, view: ProxyView, proxy: Proxy) -> tuple[Layer, list]:
    instances = push.proxy_instances(proxy)
    lds, rds_map = listeners.gateway_listeners(push, view, instances, security.inbound_filters(push, proxy))
    sni_dnat = any(((s.get("tls") or {}).get("mode") == "AUTO_PASSTHROUGH")
                   for g in view.gateways for s in g.spec.get("servers") or [])
    cds, needs = clusters.outbound_clusters(push, view.scope, is_sidecar=False, gateway_sni_dnat=sni_dnat)
    rds = [routes.gateway_route_config(push, view, name, servers, port) for name, (port, servers) in rds_map.items()]
    layer = {CLUSTER: cds, LISTENER: _by_name(lds), ROUTE: _by_name(rds)}
    sds = secrets.gateway_secrets(push, view)
    if sds:
        layer[SECRET] = _by_name(sds)
    return layer, needs


def _needs_key(needs: list) -> frozenset:
    return frozenset(n.key for n in needs)


def _endpoint_layer(push: PushContext, needs: list, where: tuple | None = None, proxy: Proxy | None = None,
                    needs_key: frozenset | None = None) -> Layer:
    """Shared by every proxy with the same needs (and, where locality LB applies, the same locality)."""
    key = ("eds-layer", needs_key if needs_key is not None else _needs_key(needs), where)
    layer = push.cache.get(key)
    if layer is None:
        layer = {ENDPOINT: endpoints.load_assignments(push, needs, proxy if where else None)}
        push.cache[key] = layer
    return layer


def outbound_layers(push: PushContext, proxy: Proxy) -> tuple[Layer, Layer]:
    """(outbound layer, endpoints layer) for a proxy: memoised, identical objects for equal views."""
    view = push.view(proxy)
    key = view.key
    if view.is_router:
        key = key + (tuple((i.port.port, i.endpoint_port) for i in push.proxy_instances(proxy)),
                     security.layer_key(push, proxy))
    hit = push.cache.get(("layers", key))
    if hit is None:
        carried = push.cache.get(("carried", key))
        routed = push.cache.get(("routed", key))
        if carried is not None:  # the previous revision's layer, still valid (see carry_over)
            layer, old_needs = carried
            needs = _rebind(push, old_needs)
        elif routed is not None:  # after a VirtualService/DestinationRule change (see incremental.carry_routing)
            layer, needs = _sidecar_outbound_reusing(push, view, *routed)
        elif view.is_router:
            layer, needs = _router_outbound(push, view, proxy)
        else:
            layer, needs = _sidecar_outbound(push, view)
        local = [n for n in needs if n.locality_lb]  # assignments that depend on the proxy's locality
        needs_key = _needs_key(needs)
        hit = (layer, _endpoint_layer(push, needs, needs_key=needs_key), needs,
               endpoints.failover_keys(local) if local else None, needs_key)
        push.cache[("layers", key)] = hit
    layer, shared, needs, keys, needs_key = hit
    where = endpoints.locality_signature(keys, proxy) if keys is not None else None
    if where is None:
        return layer, shared
    return layer, _endpoint_layer(push, needs, where, proxy, needs_key)


def _rebind(push: PushContext, old_needs: list) -> list:
    """EDS needs of a carried layer, pointing at this push's (equal) services."""
    by_id = _services_by_id(push)
    return [dataclasses.replace(n, service=by_id[service_id(n.service)]) for n in old_needs]


def _sidecar_outbound_reusing(push: PushContext, view: ProxyView, old: Layer, old_needs: list,
                              was: incremental.OutboundInputs) -> tuple[Layer, list]:
    """A sidecar's outbound layer keeping each part (clusters, listeners, routes) of the previous revision's
    layer whose inputs did not change; the same layer object when none did."""
    now = incremental.outbound_inputs(push, view)
    if now == was:
        return old, _rebind(push, old_needs)
    if now.clusters == was.clusters:
        cds, needs = old[CLUSTER], _rebind(push, old_needs)
    else:
        cds, needs = clusters.outbound_clusters(push, view.scope, is_sidecar=True)
    if now.listeners == was.listeners:
        lds, rds_names = old[LISTENER], list(old[ROUTE])
    else:
        built_lds, rds_names = listeners.outbound_listeners(push, view)
        built_lds.append(listeners.virtual_outbound_listener(push, view))
        lds = _by_name(built_lds)
    if now.routes == was.routes:  # route configurations are named after what they hold: keep those still named
        old_rds = old[ROUTE]
        rds = {n: old_rds[n] if n in old_rds else routes.sidecar_route_config(push, view, n) for n in rds_names}
        if list(old_rds) == rds_names:
            rds = old_rds
    else:
        rds = _by_name(routes.sidecar_route_config(push, view, name) for name in rds_names)
    return {CLUSTER: cds, LISTENER: lds, ROUTE: rds}, needs


def _services_by_id(push: PushContext) -> dict[tuple, object]:
    index = push.cache.get("services-by-id")
    if index is None:
        index = push.cache["services-by-id"] = {service_id(s): s for s in push.services}
    return index


def _endpoints_of(service) -> dict[int, list[tuple]]:
    return {port: [tuple(getattr(e, f) for f in Endpoint.__slots__) for e in eps]
            for port, eps in service.endpoints.items()}


def endpoint_only_changes(old: PushContext, new: PushContext) -> set[tuple] | None:
    """The services (by service_id) whose endpoints differ between two push contexts built from inputs that
    differ only in Endpoints/EndpointSlices/Nodes; None when the difference reaches further than EDS (a headless
    service's endpoints make listeners, endpoint service accounts make cluster SANs, a ServiceEntry's
    endpoints live in its cluster), which then needs a full rebuild."""
    if (len(old.services) != len(new.services) or old.headless_ips != new.headless_ips
            or old.errors != new.errors or old.mesh != new.mesh):
        return None
    changed: set[tuple] = set()
    for a, b in zip(old.services, new.services, strict=True):
        if service_id(a) != service_id(b):
            return None
        if a.endpoints is b.endpoints or _endpoints_of(a) == _endpoints_of(b):
            continue
        if (b.registry != KUBERNETES or b.resolution != CLIENT_SIDE_LB
                or a.service_accounts != b.service_accounts):
            return None
        changed.add(service_id(b))
    return changed


def carry_over(old: PushContext, new: PushContext, changed: set[tuple]) -> None:
    """Seed `new` with what `old` built that the endpoint changes in `changed` leave untouched: every outbound
    layer (clusters, listeners and routes do not depend on EDS endpoints), the assignments of unchanged
    services and the inbound layers (their cache keys name the instances they were built from). The next
    builds then cost the changed assignments plus assembling each endpoints layer, and keep the same layer
    objects, so the shell need not serialise them again. Only valid when endpoint_only_changes said so."""
    for k, v in old.cache.items():
        if not isinstance(k, tuple):
            continue
        tag = k[0]
        # Only keys free of id()s move on: an id names an object of the old push, and a later push may
        # allocate a different object at the same address. Router views hold gateway ids, inbound layers
        # under security policies hold policy ids: those are rebuilt.
        if tag == "layers" and k[1][0] != "router":
            new.cache[("carried", k[1])] = (v[0], v[2])  # the outbound layer and its EDS needs
        elif (tag == "eds" and k[2] not in changed) or (tag == "own-layer" and k[1][0] != "router"
                                                         and not any(k[4])):
            new.cache[k] = v


def reuse_previous(old: PushContext, new: PushContext, kinds: set[str]) -> str:
    """Seed `new` with what `old` built that changes of these kinds leave valid; the build kind that results."""
    if kinds <= POD_KINDS:
        changed = endpoint_only_changes(old, new)
        if changed is not None:
            carry_over(old, new, changed)
            return "endpoints"
    elif kinds <= incremental.ROUTING_KINDS and incremental.routing_only_changes(old, new):
        incremental.carry_routing(old, new)
        return "routing"
    return "full"


def proxy_layer(push: PushContext, proxy: Proxy) -> Layer:
    """The sidecar's own inbound side (empty for gateways)."""
    if proxy.is_router:
        return {}
    view = push.view(proxy)
    sidecar = view.scope.config
    if sidecar is not None and sidecar.spec.get("ingress"):
        instances = push.ingress_instances(proxy, sidecar)  # Sidecar ingress replaces the service-derived side
    else:
        instances = push.proxy_instances(proxy)
    # Replicas of one workload have identical inbound sides: share the layer unless it names the pod's IP.
    uses_ip = any(i.capture_mode == "NONE" or i.endpoint_address == proxy.ip for i in instances)
    modes = (push.mtls_mode(proxy.namespace, proxy.labels),
             tuple(sorted(push.port_level_mtls_ports(proxy.namespace, proxy.labels).items())),
             tuple(push.mtls_mode(proxy.namespace, proxy.labels, i.inbound_port) for i in instances))
    key = ("own-layer", view.key, modes, proxy.ip if uses_ip else None, security.layer_key(push, proxy),
           tuple((service_id(i.service), i.port.port, i.port.name, i.port.protocol, i.endpoint_port, i.endpoint_address,
                  i.listen_port, i.capture_mode, i.bind) for i in instances))
    layer = push.cache.get(key)
    if layer is not None:
        return layer
    cds = clusters.inbound_clusters(push, proxy, instances)
    cds.append(clusters.inbound_passthrough_cluster(push))
    lds = listeners.bound_inbound_listeners(push, view, proxy, instances)
    lds.append(listeners.virtual_inbound_listener(push, view, proxy, instances))
    layer = push.cache[key] = {CLUSTER: _by_name(cds), LISTENER: _by_name(lds)}
    return layer


def build_snapshot(push: PushContext, proxy: Proxy) -> Snapshot:
    if grpcgen.is_proxyless(proxy):  # a gRPC application's own xDS client, not an Envoy
        return Snapshot(proxy, grpcgen.layers(push, proxy))
    outbound, eds = outbound_layers(push, proxy)
    layers = [outbound, eds, proxy_layer(push, proxy)]
    patches = envoyfilter.patches_for(push, proxy) if push.envoy_filters else ()
    if patches:
        layers = [_patched_layer(push, proxy, layers, patches)]
    return Snapshot(proxy, layers)


def _patched_layer(push: PushContext, proxy: Proxy, layers: list[Layer], patches: tuple) -> Layer:
    """The layers merged and EnvoyFilter-patched into one, shared by proxies with the same layers and patches."""
    key = ("envoyfilter-layer", tuple(id(x) for x in layers), tuple(id(p) for p in patches), proxy.is_router)
    layer = push.cache.get(key)
    if layer is None:
        merged = Snapshot(proxy, layers).merged()
        layer = push.cache[key] = envoyfilter.apply_patches(merged, patches, proxy.is_router)
    return layer


def build_all(push: PushContext, proxies: list[Proxy]) -> dict[str, Snapshot]:
    """Snapshots for many proxies from one push context (shared layers are built once)."""
    return {p.id: build_snapshot(push, p) for p in proxies}
