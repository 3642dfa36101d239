"""Envoy admin `/config_dump?include_eds` documents: build one from a proxy's snapshot, and parse any back.

Both directions meet in `ParsedDump`: the CLI parses every source (a file, a live Envoy's admin, the
registry's `/debug/config_dump`, an offline translation) through `parse_config_dump`, so for the same config
every source prints the same rows.

The dump we build has the shape a real Envoy (1.40, checked against the bundled binary) answers with:
`configs` = [BootstrapConfigDump?, ClustersConfigDump, EndpointsConfigDump, ListenersConfigDump,
RoutesConfigDump]. What Envoy adds on its own is added here too, because the printers read it:
- inline `route_config`s of every HTTP connection manager (static and dynamic listeners) are listed under
  `static_route_configs`, as Envoy's route-config provider manager does;
- every cluster gets an endpoint config: CDS clusters under `dynamic_endpoint_configs`, bootstrap clusters
  under `static_endpoint_configs`; EDS clusters take their ClusterLoadAssignment from the snapshot, the others
  their inline `load_assignment`; a host whose EDS health is UNKNOWN is reported HEALTHY (Envoy treats it
  so). DNS names are not resolved: a STRICT_DNS endpoint shows its configured host name.
"""

from __future__ import annotations

import copy
import importlib
import json
import pkgutil
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import xds_types

ADMIN = "type.googleapis.com/envoy.admin.v3."
BOOTSTRAP_DUMP = ADMIN + "BootstrapConfigDump"
CLUSTERS_DUMP = ADMIN + "ClustersConfigDump"
ENDPOINTS_DUMP = ADMIN + "EndpointsConfigDump"
LISTENERS_DUMP = ADMIN + "ListenersConfigDump"
ROUTES_DUMP = ADMIN + "RoutesConfigDump"
BOOTSTRAP = "type.googleapis.com/envoy.config.bootstrap.v3.Bootstrap"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
STRUCT = "type.googleapis.com/google.protobuf.Struct"

# Older dumps (Envoy v2 API, Istio ≤1.6, or istio-proxy builds of the seed's era) name the same messages
# differently; their fields are close enough that the v3 messages read them (unknown fields are ignored).
_LEGACY_TYPES = {
    "envoy.admin.v2alpha.BootstrapConfigDump": "envoy.admin.v3.BootstrapConfigDump",
    "envoy.admin.v2alpha.ClustersConfigDump": "envoy.admin.v3.ClustersConfigDump",
    "envoy.admin.v2alpha.ListenersConfigDump": "envoy.admin.v3.ListenersConfigDump",
    "envoy.admin.v2alpha.RoutesConfigDump": "envoy.admin.v3.RoutesConfigDump",
    "envoy.admin.v2alpha.EndpointsConfigDump": "envoy.admin.v3.EndpointsConfigDump",
    "envoy.api.v2.Cluster": "envoy.config.cluster.v3.Cluster",
    "envoy.api.v2.Listener": "envoy.config.listener.v3.Listener",
    "envoy.api.v2.RouteConfiguration": "envoy.config.route.v3.RouteConfiguration",
    "envoy.api.v2.ClusterLoadAssignment": "envoy.config.endpoint.v3.ClusterLoadAssignment",
    "envoy.config.bootstrap.v2.Bootstrap": "envoy.config.bootstrap.v3.Bootstrap",
    "envoy.config.filter.network.http_connection_manager.v2.HttpConnectionManager":
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
    "envoy.config.filter.network.tcp_proxy.v2.TcpProxy": "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
}


class ConfigDumpError(ValueError):
    """The input is not a config dump we can read."""


# ---------------------------------------------------------------------------------------------------------
# message types: make every `@type` in a document resolvable before json_format sees it

_imported_packages: set[str] = set()


def _pool():
    from google.protobuf import descriptor_pool

    return descriptor_pool.Default()


def _known(full_name: str) -> bool:
    try:
        _pool().FindMessageTypeByName(full_name)
        return True
    except KeyError:
        return False


def _import_package(package: str) -> None:
    """Import every generated module of a proto package (xds-protos lays packages out as directories)."""
    if package in _imported_packages:
        return
    _imported_packages.add(package)
    try:
        mod = importlib.import_module(package)
    except ImportError:
        return
    for info in pkgutil.iter_modules(getattr(mod, "__path__", [])):
        if info.name.endswith("_pb2"):
            try:
                importlib.import_module(f"{package}.{info.name}")
            except Exception:  # noqa: BLE001 - one broken module must not hide the others
                continue


def ensure_type(type_url: str) -> bool:
    """True if the message a type URL names is in the descriptor pool (importing its package if needed)."""
    full_name = type_url.rsplit("/", 1)[-1]
    if _known(full_name):
        return True
    if "." in full_name:
        _import_package(full_name.rsplit(".", 1)[0])
    return _known(full_name)


def ensure_nested_types(msg: Any) -> None:
    """Import the message types of every Any inside a message (protos read from bytes carry only URLs, and
    json_format needs the types to print them)."""
    from google.protobuf import symbol_database

    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            value_field = fd.message_type.fields_by_name["value"]
            items = list(value.values()) if value_field.message_type is not None else []
        else:
            items = list(value) if fd.is_repeated else [value]
        for item in items:
            if item.DESCRIPTOR.full_name == "google.protobuf.Any":
                if not ensure_type(item.type_url):
                    continue
                name = item.type_url.rsplit("/", 1)[-1]
                inner = symbol_database.Default().GetSymbol(name)()
                inner.ParseFromString(item.value)
                ensure_nested_types(inner)
            else:
                ensure_nested_types(item)


def _type_urls(obj: Any, out: set[str]) -> None:
    if isinstance(obj, dict):
        t = obj.get("@type")
        if isinstance(t, str):
            out.add(t)
        for v in obj.values():
            _type_urls(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _type_urls(v, out)


def _normalise(obj: Any, unknown: set[str]) -> Any:
    """A copy where legacy type URLs name their v3 messages and unknown ones are kept as a Struct."""
    if isinstance(obj, list):
        return [_normalise(v, unknown) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {k: _normalise(v, unknown) for k, v in obj.items()}
    t = out.get("@type")
    if isinstance(t, str):
        prefix, _, name = t.rpartition("/")
        if name in _LEGACY_TYPES:
            out["@type"] = f"{prefix}/{_LEGACY_TYPES[name]}"
        elif t in unknown:
            # A type this build has no proto for (e.g. an istio-proxy-only filter): keep its content readable.
            body = {k: v for k, v in out.items() if k != "@type"}
            out = {"@type": STRUCT, "value": {"@type": t, **body}}
    return out


_TYPE_FIELD = re.compile(r'"@type"\s*:\s*"([^"\\]*)"')


def prepare(document: Any, text: str | bytes | None = None) -> Any:
    """Resolve every `@type` of a JSON document: returns the document, or a rewritten copy when it names
    legacy or unknown types, ready for json_format. `text`, the JSON the document was read from, is a faster
    place to find the type URLs."""
    urls: set[str] = set()
    if text is not None:
        urls.update(_TYPE_FIELD.findall(text.decode() if isinstance(text, bytes) else text))
    else:
        _type_urls(document, urls)
    unknown: set[str] = set()
    rewrite = False
    for url in urls:
        name = url.rsplit("/", 1)[-1]
        if name in _LEGACY_TYPES:
            rewrite = True
            if ensure_type(_LEGACY_TYPES[name]):
                continue
        if not ensure_type(url):
            unknown.add(url)
    return _normalise(document, unknown) if rewrite or unknown else document


def _parse(message_cls, data: Any, what: str):
    from google.protobuf import json_format

    msg = message_cls()
    try:
        json_format.ParseDict(data, msg, ignore_unknown_fields=True)
    except json_format.ParseError as e:
        raise ConfigDumpError(f"cannot read {what}: {e}") from None
    return msg


# ---------------------------------------------------------------------------------------------------------
# parsing


@dataclass
class ParsedDump:
    """The resources of a config dump, in the dump's order (dynamic and static kept apart, as Envoy does)."""

    bootstrap: Any = None
    static_clusters: list = field(default_factory=list)
    dynamic_clusters: list = field(default_factory=list)
    static_listeners: list = field(default_factory=list)
    dynamic_listeners: list = field(default_factory=list)
    static_routes: list = field(default_factory=list)
    dynamic_routes: list = field(default_factory=list)
    static_endpoints: list = field(default_factory=list)
    dynamic_endpoints: list = field(default_factory=list)
    has_endpoints: bool = False  # False when the dump was taken without ?include_eds
    raw: dict = field(default_factory=dict)

    # istioctl reads dynamic resources first, then static ones.
    @property
    def clusters(self) -> list:
        return self.dynamic_clusters + self.static_clusters

    @property
    def listeners(self) -> list:
        return self.dynamic_listeners + self.static_listeners

    @property
    def routes(self) -> list:
        return self.dynamic_routes + self.static_routes

    @property
    def endpoints(self) -> list:
        return self.dynamic_endpoints + self.static_endpoints


def _unpack(any_msg, cls):
    """An Any's content as `cls`, whatever version its type URL names (as istioctl does)."""
    out = cls()
    out.ParseFromString(any_msg.value)
    return out


def parse_config_dump(document: Mapping | str | bytes) -> ParsedDump:
    """Read a `/config_dump` (JSON text or an already decoded dict) into protos."""
    from envoy.admin.v3 import config_dump_pb2
    from envoy.admin.v3 import config_dump_shared_pb2 as shared
    from envoy.config.bootstrap.v3 import bootstrap_pb2

    text = None
    if isinstance(document, (str, bytes)):
        text = document
        try:
            document = json.loads(document)
        except ValueError as e:
            raise ConfigDumpError(f"not JSON: {e}") from None
    if not isinstance(document, Mapping) or not isinstance(document.get("configs"), list):
        raise ConfigDumpError("not an Envoy config dump: no `configs` list")
    dump = _parse(config_dump_pb2.ConfigDump, prepare(dict(document), text), "config dump")
    cluster_cls = xds_types.message_class(xds_types.CLUSTER)
    listener_cls = xds_types.message_class(xds_types.LISTENER)
    route_cls = xds_types.message_class(xds_types.ROUTE)
    cla_cls = xds_types.message_class(xds_types.ENDPOINT)

    out = ParsedDump(raw=dict(document))
    for section in dump.configs:
        kind = section.type_url.rsplit(".", 1)[-1]
        if kind == "BootstrapConfigDump":
            b = _unpack(section, config_dump_pb2.BootstrapConfigDump)
            out.bootstrap = b.bootstrap if b.HasField("bootstrap") else bootstrap_pb2.Bootstrap()
        elif kind == "ClustersConfigDump":
            c = _unpack(section, shared.ClustersConfigDump)
            out.static_clusters += [_unpack(s.cluster, cluster_cls) for s in c.static_clusters if s.HasField("cluster")]
            out.dynamic_clusters += [_unpack(d.cluster, cluster_cls) for d in c.dynamic_active_clusters
                                     if d.HasField("cluster")]
        elif kind == "ListenersConfigDump":
            ld = _unpack(section, shared.ListenersConfigDump)
            out.static_listeners += [_unpack(s.listener, listener_cls) for s in ld.static_listeners
                                     if s.HasField("listener")]
            out.dynamic_listeners += [_unpack(d.active_state.listener, listener_cls) for d in ld.dynamic_listeners
                                      if d.HasField("active_state") and d.active_state.HasField("listener")]
        elif kind == "RoutesConfigDump":
            r = _unpack(section, shared.RoutesConfigDump)
            out.static_routes += [_unpack(s.route_config, route_cls) for s in r.static_route_configs
                                  if s.HasField("route_config")]
            out.dynamic_routes += [_unpack(d.route_config, route_cls) for d in r.dynamic_route_configs
                                   if d.HasField("route_config")]
        elif kind == "EndpointsConfigDump":
            out.has_endpoints = True
            e = _unpack(section, shared.EndpointsConfigDump)
            out.static_endpoints += [_unpack(s.endpoint_config, cla_cls) for s in e.static_endpoint_configs
                                     if s.HasField("endpoint_config")]
            out.dynamic_endpoints += [_unpack(d.endpoint_config, cla_cls) for d in e.dynamic_endpoint_configs
                                      if d.HasField("endpoint_config")]
    return out


def load_config_dump_file(path: str | Path) -> ParsedDump:
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise ConfigDumpError(f"cannot read {path}: {e.strerror}") from None
    return parse_config_dump(text)


# ---------------------------------------------------------------------------------------------------------
# building


def merge_layers(layers: Iterable[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The translator's snapshot layers (type → name → message) as one map; later layers win, as in Redis."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for type_url, resources in layer.items():
            out.setdefault(type_url, {}).update(resources)
    return out


def _bootstrap_proto(bootstrap: Any):
    from envoy.config.bootstrap.v3 import bootstrap_pb2

    if bootstrap is None or isinstance(bootstrap, bootstrap_pb2.Bootstrap):
        return bootstrap
    if isinstance(bootstrap, (str, bytes)):
        bootstrap = json.loads(bootstrap)
    return _parse(bootstrap_pb2.Bootstrap, prepare(dict(bootstrap)), "bootstrap")


def _connection_managers(listener) -> list:
    """A listener's HTTP connection managers, in chain order (the default chain last)."""
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    return [_unpack(f.typed_config, hcm_pb2.HttpConnectionManager) for chain in chains for f in chain.filters
            if f.HasField("typed_config") and f.typed_config.type_url.endswith(".HttpConnectionManager")]


def inline_route_configs(listener) -> list:
    """The route configurations written inline in a listener's HTTP connection managers, in chain order."""
    return [hcm.route_config for hcm in _connection_managers(listener) if hcm.HasField("route_config")]


def rds_route_names(listener) -> list[str]:
    """The route configurations a listener asks RDS for."""
    return [hcm.rds.route_config_name for hcm in _connection_managers(listener) if hcm.HasField("rds")]


def _reported_endpoints(cla, cluster_name: str):
    """A ClusterLoadAssignment as Envoy's endpoint dump reports it: named after the cluster, hosts whose
    EDS health is UNKNOWN shown HEALTHY."""
    from envoy.config.core.v3 import health_check_pb2

    out = copy.deepcopy(cla)
    out.cluster_name = cluster_name
    for locality in out.endpoints:
        for lb in locality.lb_endpoints:
            if lb.health_status == health_check_pb2.UNKNOWN:
                lb.health_status = health_check_pb2.HEALTHY
    return out


def _endpoint_config(cluster, assignments: Mapping[str, Any]):
    from envoy.config.cluster.v3 import cluster_pb2

    cla_cls = xds_types.message_class(xds_types.ENDPOINT)
    if cluster.WhichOneof("cluster_discovery_type") == "type" and cluster.type == cluster_pb2.Cluster.EDS:
        service = cluster.eds_cluster_config.service_name or cluster.name
        return _reported_endpoints(assignments.get(service) or cla_cls(cluster_name=service), service)
    if cluster.HasField("load_assignment"):
        return _reported_endpoints(cluster.load_assignment, cluster.name)
    return cla_cls(cluster_name=cluster.name)


def dump_from_snapshot(resources: Mapping[str, Mapping[str, Any]], bootstrap: Any = None) -> ParsedDump:
    """The config dump a proxy with this snapshot (and bootstrap) would show, as protos (no JSON in between).

    `resources` is type URL → name → message (SnapshotStore.load_messages, or `merge_layers` of the
    translator's layers). `bootstrap` (a Bootstrap proto or its JSON dict) adds the bootstrap and the static
    clusters and listeners it declares."""
    boot = _bootstrap_proto(bootstrap)
    out = ParsedDump(bootstrap=boot, has_endpoints=True)
    out.dynamic_clusters = list(resources.get(xds_types.CLUSTER, {}).values())
    out.dynamic_listeners = list(resources.get(xds_types.LISTENER, {}).values())
    # Envoy asks RDS only for the route configurations its listeners name
    wanted = {name for lst in out.dynamic_listeners for name in rds_route_names(lst)}
    out.dynamic_routes = [rc for name, rc in resources.get(xds_types.ROUTE, {}).items() if name in wanted]
    if boot is not None:
        out.static_clusters = list(boot.static_resources.clusters)
        out.static_listeners = list(boot.static_resources.listeners)
    assignments = resources.get(xds_types.ENDPOINT, {})
    out.static_endpoints = [_endpoint_config(c, assignments) for c in out.static_clusters]
    out.dynamic_endpoints = [_endpoint_config(c, assignments) for c in out.dynamic_clusters]
    out.static_routes = [rc for lst in out.static_listeners + out.dynamic_listeners for rc in inline_route_configs(lst)]
    return out


def to_config_dump(dump: ParsedDump, version: str = "") -> dict:
    """A ParsedDump as the JSON document Envoy's admin serves (`version` goes into every version_info)."""
    from envoy.admin.v3 import config_dump_pb2
    from envoy.admin.v3 import config_dump_shared_pb2 as shared
    from google.protobuf import json_format

    cd = config_dump_pb2.ConfigDump()
    if dump.bootstrap is not None:
        cd.configs.add().Pack(config_dump_pb2.BootstrapConfigDump(bootstrap=dump.bootstrap))

    clusters = shared.ClustersConfigDump(version_info=version)
    for c in dump.static_clusters:
        clusters.static_clusters.add().cluster.Pack(c)
    for c in dump.dynamic_clusters:
        clusters.dynamic_active_clusters.add(version_info=version).cluster.Pack(c)
    cd.configs.add().Pack(clusters)

    if dump.has_endpoints:
        endpoints = shared.EndpointsConfigDump()
        for cla in dump.static_endpoints:
            endpoints.static_endpoint_configs.add().endpoint_config.Pack(cla)
        for cla in dump.dynamic_endpoints:
            endpoints.dynamic_endpoint_configs.add(version_info=version).endpoint_config.Pack(cla)
        cd.configs.add().Pack(endpoints)

    listeners = shared.ListenersConfigDump(version_info=version)
    for lst in dump.static_listeners:
        listeners.static_listeners.add().listener.Pack(lst)
    for lst in dump.dynamic_listeners:
        dl = listeners.dynamic_listeners.add(name=lst.name)
        dl.active_state.version_info = version
        dl.active_state.listener.Pack(lst)
    cd.configs.add().Pack(listeners)

    routes = shared.RoutesConfigDump()
    for rc in dump.static_routes:
        routes.static_route_configs.add().route_config.Pack(rc)
    for rc in dump.dynamic_routes:
        routes.dynamic_route_configs.add(version_info=version).route_config.Pack(rc)
    cd.configs.add().Pack(routes)

    ensure_nested_types(cd)
    return json_format.MessageToDict(cd, preserving_proto_field_name=True)


def config_dump_for_snapshot(resources: Mapping[str, Mapping[str, Any]], bootstrap: Any = None,
                             version: str = "") -> dict:
    """An Envoy `/config_dump?include_eds` JSON document (a dict) for a proxy's snapshot; see
    `dump_from_snapshot` for the arguments. This is what the registry's `/debug/config_dump` serves."""
    return to_config_dump(dump_from_snapshot(resources, bootstrap), version)


def snapshot_dump(resources: Mapping[str, Mapping[str, Any]], bootstrap: Any = None, version: str = "") -> ParsedDump:
    """A snapshot as the CLI sees it: built into a config dump and read back through the one parse path."""
    return parse_config_dump(config_dump_for_snapshot(resources, bootstrap, version))
