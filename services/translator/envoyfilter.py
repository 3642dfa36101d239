"""EnvoyFilter: users' patches applied to the translated Envoy resources, as istiod's `core/envoyfilter` does.

    patches_for(push, proxy) -> tuple[ConfigPatch, ...]     the patches that select a proxy, in Istio's order
    apply_patches(resources, patches, is_router) -> resources  patched copies (inputs are never changed)

Which filters select a proxy: those in the root namespace and in the proxy's namespace, with no
`workloadSelector` or one that matches the proxy's labels, ordered by `priority`, then root namespace first,
then creation time, then name. A patch also needs its `match.context` (SIDECAR_INBOUND, SIDECAR_OUTBOUND,
GATEWAY, ANY) and `match.proxy` to fit. Operations per applyTo follow Istio's: MERGE (proto merge; filter
`typed_config`s are unpacked and merged), ADD, REMOVE, INSERT_BEFORE / INSERT_AFTER / INSERT_FIRST (filters,
HTTP routes) and REPLACE (filters, virtual hosts). A patch Envoy rejects reaches it all the same and comes back
as a NACK; a patch that cannot be applied here is skipped and reported on the push context.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from mizzen.services.mesh import xds_json
from mizzen.services.mesh.xds_types import CLUSTER, LISTENER, ROUTE

from .model import Config
from .push_context import PushContext

INBOUND, OUTBOUND, GATEWAY, ANY = "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY", "ANY"
HCM = "envoy.filters.network.http_connection_manager"
# Mizzen emits istiod 1.7's deprecated network filter names; an EnvoyFilter may use either spelling.
_CANONICAL = {"envoy.http_connection_manager": HCM, "envoy.tcp_proxy": "envoy.filters.network.tcp_proxy",
              "envoy.router": "envoy.filters.http.router", "envoy.cors": "envoy.filters.http.cors",
              "envoy.fault": "envoy.filters.http.fault", "envoy.listener.tls_inspector":
              "envoy.filters.listener.tls_inspector", "envoy.listener.original_dst":
              "envoy.filters.listener.original_dst", "envoy.listener.http_inspector":
              "envoy.filters.listener.http_inspector"}


def same_filter(a: str, b: str) -> bool:
    return _CANONICAL.get(a, a) == _CANONICAL.get(b, b)
VIRTUAL_LISTENERS = ("virtualInbound", "virtualOutbound")
_UNKNOWN_VERSION = "65536.65536.65536"  # Istio matches proxyVersion against this when a proxy names none


@dataclass(frozen=True, eq=False)
class ConfigPatch:
    apply_to: str
    context: str
    match: dict
    operation: str
    value: Message | None
    where: str  # "EnvoyFilter ns/name configPatches[i]"

    def fits(self, context: str) -> bool:
        return self.context in (ANY, context)

    # match parts (empty dicts when the patch does not say)
    @property
    def listener(self) -> dict:
        return self.match.get("listener") or {}

    @property
    def chain(self) -> dict:
        return self.listener.get("filterChain") or {}

    @property
    def filter(self) -> dict:
        return self.chain.get("filter") or {}

    @property
    def sub_filter(self) -> dict:
        return self.filter.get("subFilter") or {}

    @property
    def rc(self) -> dict:
        return self.match.get("routeConfiguration") or {}

    @property
    def vhost(self) -> dict:
        return self.rc.get("vhost") or {}

    def clone(self) -> Message:
        assert self.value is not None
        out = type(self.value)()
        out.CopyFrom(self.value)
        return out


# ---------------------------------------------------------------------------------------------- selection
def _parsed(push: PushContext, ef: Config) -> list[ConfigPatch]:
    """An EnvoyFilter's patches with their values as protos (once per push)."""
    key = ("envoyfilter", id(ef))
    hit = push.cache.get(key)
    if hit is not None:
        return hit
    out: list[ConfigPatch] = []
    for i, cp in enumerate(ef.spec.get("configPatches") or []):
        where = f"EnvoyFilter {ef.namespace}/{ef.name} configPatches[{i}]"
        apply_to = cp.get("applyTo", "")
        patch = cp.get("patch") or {}
        match = cp.get("match") or {}
        value = None
        try:
            xds_json.message_class(apply_to)
            if patch.get("value") is not None:
                value = xds_json.parse(apply_to, patch["value"])
        except xds_json.XdsValueError as e:
            push.report(where, e)
            continue
        out.append(ConfigPatch(apply_to, match.get("context") or ANY, match, patch.get("operation", ""), value, where))
    push.cache[key] = out
    return out


def _proxy_fits(patch: ConfigPatch, metadata: dict) -> bool:
    want = patch.match.get("proxy") or {}
    for k, v in (want.get("metadata") or {}).items():
        if str(metadata.get(k, "")) != v:
            return False
    version = want.get("proxyVersion")
    if version:
        try:
            return re.match(version, str(metadata.get("ISTIO_VERSION") or _UNKNOWN_VERSION)) is not None
        except re.error:
            return False
    return True


def patches_for(push: PushContext, proxy) -> tuple[ConfigPatch, ...]:
    root = push.mesh.root_namespace
    filters: list[Config] = []
    for ns in dict.fromkeys((root, proxy.namespace)):
        for ef in push.envoy_filters.get(ns, []):
            labels = (ef.spec.get("workloadSelector") or {}).get("labels")
            if not labels or all(proxy.labels.get(k) == v for k, v in labels.items()):
                filters.append(ef)
    filters.sort(key=lambda ef: (ef.spec.get("priority", 0), ef.namespace != root, ef.created,
                                 f"{ef.name}.{ef.namespace}"))
    return tuple(p for ef in filters for p in _parsed(push, ef) if _proxy_fits(p, proxy.metadata))


# ---------------------------------------------------------------------------------------------- helpers
def _copy(m: Message) -> Message:
    out = type(m)()
    out.CopyFrom(m)
    return out


def _merge_any(dst: any_pb2.Any, src: any_pb2.Any) -> None:
    """Istio's MergeAnyWithAny: the same type is merged field by field; another type is left alone."""
    if dst.type_url != src.type_url:
        return
    from google.protobuf import symbol_database

    cls = symbol_database.Default().GetSymbol(dst.type_url.rpartition("/")[2])
    a, b = cls(), cls()
    dst.Unpack(a)
    src.Unpack(b)
    a.MergeFrom(b)
    dst.Pack(a)


def _merge(dst: Message, src: Message) -> None:
    """MERGE: proto merge, except a transport socket of the same name, whose typed_config is merged inside."""
    ts = getattr(src, "transport_socket", None)
    if ts is not None and src.HasField("transport_socket") and dst.HasField("transport_socket") \
            and dst.transport_socket.name == ts.name:
        _merge_any(dst.transport_socket.typed_config, ts.typed_config)
        rest = _copy(src)
        rest.ClearField("transport_socket")
        dst.MergeFrom(rest)
        return
    dst.MergeFrom(src)


def _edit_list(items: list, patch: ConfigPatch, matches: Callable[[Message], bool], has_match: bool) -> list:
    """ADD / INSERT_* / REPLACE / REMOVE / MERGE on an ordered list of filters (Istio's semantics)."""
    op = patch.operation
    if op == "ADD":
        return [*items, patch.clone()]
    if op == "INSERT_FIRST":
        return [patch.clone(), *items]
    if op in ("INSERT_BEFORE", "INSERT_AFTER"):
        if not has_match:
            return [patch.clone(), *items] if op == "INSERT_BEFORE" else [*items, patch.clone()]
        for i, it in enumerate(items):
            if matches(it):
                at = i if op == "INSERT_BEFORE" else i + 1
                return [*items[:at], patch.clone(), *items[at:]]
        return items
    if not has_match:
        return items
    if op == "REPLACE":
        for i, it in enumerate(items):
            if matches(it):
                return [*items[:i], patch.clone(), *items[i + 1:]]
        return items
    if op == "REMOVE":
        return [it for it in items if not matches(it)]
    if op == "MERGE":
        for it in items:
            if matches(it) and it.HasField("typed_config"):
                if patch.value.name:
                    it.name = patch.value.name
                if patch.value.HasField("typed_config"):
                    _merge_any(it.typed_config, patch.value.typed_config)
    return items


def _replace_repeated(field, items: Iterable[Message]) -> None:
    items = [_copy(i) for i in items]  # copies first: the originals may be elements of `field` itself
    del field[:]
    field.extend(items)


# ---------------------------------------------------------------------------------------------- listeners
def _listener_matches(lst, p: ConfigPatch) -> bool:
    m = p.listener
    if m.get("name") and m["name"] != lst.name:
        return False
    if p.apply_to != "LISTENER" and lst.name in VIRTUAL_LISTENERS:
        return True  # the port is matched on the filter chain's destination port instead
    port = m.get("portNumber")
    return not port or lst.address.socket_address.port_value == port


def _chain_matches(lst, fc, p: ConfigPatch) -> bool:
    m = p.listener
    if not m:
        return True
    fcm = fc.filter_chain_match
    if lst.name in VIRTUAL_LISTENERS and m.get("portNumber") and fcm.destination_port.value != m["portNumber"]:
        return False
    c = p.chain
    if c.get("name") and c["name"] != fc.name:
        return False
    if c.get("sni") and c["sni"] not in fcm.server_names:
        return False
    if c.get("transportProtocol") and fcm.transport_protocol != c["transportProtocol"]:
        return False
    if c.get("applicationProtocols") and not all(
            a in fcm.application_protocols for a in c["applicationProtocols"].split(",")):
        return False
    return not c.get("destinationPort") or fcm.destination_port.value == c["destinationPort"]


def _patch_http_filters(hcm: hcm_pb2.HttpConnectionManager, patches: list[ConfigPatch]) -> None:
    items = list(hcm.http_filters)
    for p in patches:
        name = p.sub_filter.get("name")
        items = _edit_list(items, p, lambda f, name=name: same_filter(f.name, name), bool(name))
    _replace_repeated(hcm.http_filters, items)


def _patch_chain(lst, fc, context: str, by_type: dict[str, list[ConfigPatch]]) -> bool:
    """Patch one filter chain in place; False when a REMOVE dropped it."""
    for p in by_type.get("FILTER_CHAIN", ()):
        if p.fits(context) and _listener_matches(lst, p) and _chain_matches(lst, fc, p):
            if p.operation == "REMOVE":
                return False
            if p.operation == "MERGE":
                _merge(fc, p.value)
    items = list(fc.filters)
    for p in by_type.get("NETWORK_FILTER", ()):
        if p.fits(context) and _listener_matches(lst, p) and _chain_matches(lst, fc, p):
            name = p.filter.get("name")
            items = _edit_list(items, p, lambda f, name=name: same_filter(f.name, name), bool(name))
    _replace_repeated(fc.filters, items)
    http = [p for p in by_type.get("HTTP_FILTER", ()) if p.fits(context) and _listener_matches(lst, p)
            and _chain_matches(lst, fc, p)]
    inline_routes = [p for t in ("ROUTE_CONFIGURATION", "VIRTUAL_HOST", "HTTP_ROUTE")
                     for p in by_type.get(t, ()) if p.fits(context)] if context == INBOUND else []
    for f in fc.filters:
        if not same_filter(f.name, HCM) or not f.HasField("typed_config") or not (http or inline_routes):
            continue
        hcm = hcm_pb2.HttpConnectionManager()
        f.typed_config.Unpack(hcm)
        _patch_http_filters(hcm, [p for p in http if not p.filter.get("name") or same_filter(p.filter["name"], HCM)])
        if inline_routes and hcm.HasField("route_config"):
            _patch_route_config(hcm.route_config, context, by_type)
        f.typed_config.Pack(hcm)
    return True


def _listener_context(lst, is_router: bool) -> str:
    if is_router:
        return GATEWAY
    return INBOUND if lst.traffic_direction == base_pb2.INBOUND or lst.name == "virtualInbound" else OUTBOUND


def patch_listeners(listeners: dict[str, Message], by_type: dict[str, list[ConfigPatch]], is_router: bool
                    ) -> dict[str, Message]:
    out: dict[str, Message] = {}
    for original in listeners.values():
        context = _listener_context(original, is_router)
        lst = _copy(original)
        removed = False
        for p in by_type.get("LISTENER", ()):
            if p.fits(context) and _listener_matches(lst, p):
                if p.operation == "REMOVE":
                    removed = True
                    break
                if p.operation == "MERGE":
                    _merge(lst, p.value)
        if removed:
            continue
        filters = list(lst.listener_filters)
        for p in by_type.get("LISTENER_FILTER", ()):
            if p.fits(context) and _listener_matches(lst, p):
                want = p.listener.get("listenerFilter")
                filters = _edit_list(filters, p, lambda f, want=want: same_filter(f.name, want), bool(want))
        _replace_repeated(lst.listener_filters, filters)
        kept = [fc for fc in lst.filter_chains if _patch_chain(lst, fc, context, by_type)]
        for p in by_type.get("FILTER_CHAIN", ()):
            if p.operation == "ADD" and p.fits(context) and _listener_matches(lst, p):
                kept.append(p.clone())
        _replace_repeated(lst.filter_chains, kept)
        if lst.HasField("default_filter_chain") and not _patch_chain(lst, lst.default_filter_chain, context, by_type):
            lst.ClearField("default_filter_chain")
        out[lst.name] = lst
    add_context = GATEWAY if is_router else OUTBOUND
    for p in by_type.get("LISTENER", ()):
        if p.operation == "ADD" and p.fits(add_context):
            out.setdefault(p.value.name, p.clone())
    return out


# ---------------------------------------------------------------------------------------------- routes
def _rc_matches(rc, p: ConfigPatch, context: str) -> bool:
    m = p.rc
    if m.get("name") and m["name"] != rc.name:
        return False
    port = m.get("portNumber")
    if context == GATEWAY:
        # `http.<port>` / `https.<port>.<portName>.<gateway>.<ns>`
        parts = rc.name.split(".")
        if m.get("portName") and (len(parts) < 3 or parts[2] != m["portName"]):
            return False
        if m.get("gateway") and (len(parts) < 5 or f"{parts[4]}/{parts[3]}" != m["gateway"]):
            return False
        return not port or (len(parts) > 1 and parts[1] == str(port))
    if port:
        name_port = rc.name.split("|")[1] if rc.name.startswith("inbound|") else rc.name
        return name_port == str(port)
    return True


def _vhost_matches(vh, p: ConfigPatch) -> bool:
    m = p.vhost
    return (not m.get("name") or m["name"] == vh.name) and (not m.get("domainName") or m["domainName"] in vh.domains)


_ROUTE_ACTIONS = {"ROUTE": "route", "REDIRECT": "redirect", "DIRECT_RESPONSE": "direct_response"}


def _route_matches(r, p: ConfigPatch) -> bool:
    m = p.vhost.get("route") or {}
    if m.get("name") and m["name"] != r.name:
        return False
    action = _ROUTE_ACTIONS.get(m.get("action", "ANY"))
    return action is None or r.WhichOneof("action") == action


def _patch_route_config(rc, context: str, by_type: dict[str, list[ConfigPatch]]) -> None:
    for p in by_type.get("ROUTE_CONFIGURATION", ()):
        if p.operation == "MERGE" and p.fits(context) and _rc_matches(rc, p, context):
            _merge(rc, p.value)
    vhosts = []
    for vh in rc.virtual_hosts:
        keep = True
        for p in by_type.get("VIRTUAL_HOST", ()):
            if p.fits(context) and _rc_matches(rc, p, context) and _vhost_matches(vh, p):
                if p.operation == "REMOVE":
                    keep = False
                    break
                if p.operation == "MERGE":
                    _merge(vh, p.value)
                elif p.operation == "REPLACE":
                    vh = p.clone()
        if not keep:
            continue
        _patch_http_routes(rc, vh, context, by_type)
        vhosts.append(vh)
    for p in by_type.get("VIRTUAL_HOST", ()):
        if p.operation == "ADD" and p.fits(context) and _rc_matches(rc, p, context):
            vhosts.append(p.clone())
    _replace_repeated(rc.virtual_hosts, vhosts)


def _patch_http_routes(rc, vh, context: str, by_type: dict[str, list[ConfigPatch]]) -> None:
    routes = []
    for r in vh.routes:
        keep = True
        for p in by_type.get("HTTP_ROUTE", ()):
            if p.fits(context) and _rc_matches(rc, p, context) and _vhost_matches(vh, p) and _route_matches(r, p):
                if p.operation == "REMOVE":
                    keep = False
                    break
                if p.operation == "MERGE":
                    _merge(r, p.value)
        if keep:
            routes.append(r)
    for p in by_type.get("HTTP_ROUTE", ()):
        if p.operation in ("MERGE", "REMOVE") or not (p.fits(context) and _rc_matches(rc, p, context)
                                                      and _vhost_matches(vh, p)):
            continue
        has_match = "route" in p.vhost
        if p.operation == "INSERT_FIRST":
            if not has_match or any(_route_matches(r, p) for r in routes):
                routes = [p.clone(), *routes]
        else:
            routes = _edit_list(routes, p, lambda r, p=p: _route_matches(r, p), has_match)
    _replace_repeated(vh.routes, routes)


def patch_routes(route_configs: dict[str, Message], by_type: dict[str, list[ConfigPatch]], is_router: bool
                 ) -> dict[str, Message]:
    context = GATEWAY if is_router else OUTBOUND
    out = {}
    for name, original in route_configs.items():
        rc = _copy(original)
        _patch_route_config(rc, context, by_type)
        out[name] = rc
    return out


# ---------------------------------------------------------------------------------------------- clusters
def _cluster_matches(c, p: ConfigPatch, hosts: Callable[[str], list[str]]) -> bool:
    m = p.match.get("cluster") or {}
    if not m:
        return True
    if m.get("name"):
        return m["name"] == c.name
    parts = c.name.split("|")
    if len(parts) != 4:
        return not (m.get("subset") or m.get("service") or m.get("portNumber"))
    direction, port, subset, host = parts
    if m.get("subset") and m["subset"] != subset:
        return False
    if m.get("service") and m["service"] not in (hosts(c.name) if direction == "inbound" else [host]):
        return False
    return not m.get("portNumber") or str(m["portNumber"]) == port


def patch_clusters(clusters: dict[str, Message], by_type: dict[str, list[ConfigPatch]], is_router: bool
                   ) -> dict[str, Message]:
    out: dict[str, Message] = {}
    patches = by_type.get("CLUSTER", ())

    def hosts(name: str) -> list[str]:
        return [name.split("|")[3]]

    for name, original in clusters.items():
        context = GATEWAY if is_router else (
            INBOUND if name.startswith("inbound|") or name == "InboundPassthroughClusterIpv4" else OUTBOUND)
        c = original
        for p in patches:
            if p.fits(context) and _cluster_matches(c, p, hosts):
                if p.operation == "REMOVE":
                    c = None
                    break
                if p.operation == "MERGE":
                    c = _copy(c) if c is original else c
                    _merge(c, p.value)
        if c is not None:
            out[name] = c
    add_context = GATEWAY if is_router else OUTBOUND
    for p in patches:
        if p.operation == "ADD" and p.fits(add_context):
            out.setdefault(p.value.name, p.clone())
    return out


def apply_patches(resources: dict[str, dict[str, Message]], patches: tuple[ConfigPatch, ...], is_router: bool
                  ) -> dict[str, dict[str, Message]]:
    """Patched copies of a snapshot's resources (type URL → name → message)."""
    by_type: dict[str, list[ConfigPatch]] = {}
    for p in patches:
        by_type.setdefault(p.apply_to, []).append(p)
    out = dict(resources)
    if any(t in by_type for t in ("LISTENER", "LISTENER_FILTER", "FILTER_CHAIN", "NETWORK_FILTER", "HTTP_FILTER",
                                  "ROUTE_CONFIGURATION", "VIRTUAL_HOST", "HTTP_ROUTE")):
        out[LISTENER] = patch_listeners(resources.get(LISTENER, {}), by_type, is_router)
    if any(t in by_type for t in ("ROUTE_CONFIGURATION", "VIRTUAL_HOST", "HTTP_ROUTE")):
        out[ROUTE] = patch_routes(resources.get(ROUTE, {}), by_type, is_router)
    if "CLUSTER" in by_type:
        out[CLUSTER] = patch_clusters(resources.get(CLUSTER, {}), by_type, is_router)
    return out
