"""The push context: the whole mesh model built once per config revision, like istiod's model.PushContext.

`PushContext.from_resources(objects)` takes the stored resource dicts (Kubernetes-shaped, as the registry keeps
them) and builds services (Kubernetes Services and ServiceEntry hosts) with their endpoints, and the Istio
configs (VirtualService with delegates merged, DestinationRule merged per host, Gateway, Sidecar,
PeerAuthentication), all in Istio's creation-time order. Builders ask it questions (which services a proxy
sees, which DestinationRule applies, which mTLS mode a workload has) and memoise their own results in
`push.cache`, so proxies that share a scope share the work and the resulting protos.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mizzen.services.mesh import locality, meshconfig, settings
from mizzen.services.mesh.duration import DurationError, parse_duration

from . import protocol, security
from .model import (
    CLIENT_SIDE_LB,
    DNS_LB,
    DNS_ROUND_ROBIN_LB,
    EXTERNAL,
    KUBERNETES,
    PASSTHROUGH,
    TLS_MODE_LABEL,
    Config,
    Endpoint,
    Port,
    Service,
    ServiceInstance,
    host_matches,
    labels_match,
    most_specific_host_match,
    resolve_short_name,
)

MESH_GATEWAY = "mesh"
# What a malformed field raises while we read it; such an object is reported and skipped, never fatal.
MALFORMED = (ValueError, TypeError, AttributeError, KeyError)
EXPORT_TO_ANNOTATION = "networking.istio.io/exportTo"


@dataclass(frozen=True)
class MeshConfig:
    """The MeshConfig fields translation reads, with Istio 1.7 install defaults."""

    root_namespace: str = settings.ROOT_NAMESPACE
    domain_suffix: str = settings.DOMAIN_SUFFIX
    trust_domain: str = settings.TRUST_DOMAIN
    connect_timeout: float = 10.0
    # 1.7's code default is 5s; the 1.7 install profiles set 100ms, which is what a real mesh ran with.
    protocol_detection_timeout: float = 0.1
    inbound_protocol_detection_timeout: float = 1.0  # PILOT_INBOUND_PROTOCOL_DETECTION_TIMEOUT
    dns_refresh_rate: float = 5.0
    enable_auto_mtls: bool = True
    outbound_traffic_policy: str = "ALLOW_ANY"
    h2_upgrade_policy: str = "DO_NOT_UPGRADE"
    tcp_keepalive: dict | None = None
    access_log_file: str = "/dev/stdout"
    access_log_encoding: str = "JSON"
    enable_tracing: bool = True
    trace_sampling: float = 1.0  # PILOT_TRACE_SAMPLING
    # meshConfig.localityLbSetting; None is Istio's install default `{enabled: true}` (no distribute/failover)
    locality_lb_setting: dict | None = None
    proxy_listen_port: int = settings.PROXY_OUTBOUND_PORT
    proxy_inbound_listen_port: int = settings.PROXY_INBOUND_PORT
    default_service_export_to: tuple[str, ...] = ("*",)
    default_virtual_service_export_to: tuple[str, ...] = ("*",)
    default_destination_rule_export_to: tuple[str, ...] = ("*",)
    # meshConfig.extensionProviders (ext_authz ones): name → {"type": "http"|"grpc", **provider fields}
    extension_providers: dict = field(default_factory=dict)


def mesh_from_resources(by_kind: dict[str, list[dict]], base: MeshConfig | None = None) -> MeshConfig:
    """istiod's mesh config input: ConfigMap `istio` in the root namespace, key `mesh` (defaults when absent or
    unreadable; the registry refuses a bad one at apply)."""
    base = base or MeshConfig()
    for cm in by_kind.get("ConfigMap", []):
        meta = cm.get("metadata") or {}
        if meta.get("name") != meshconfig.MESH_CONFIGMAP or meta.get("namespace") != base.root_namespace:
            continue
        text = (cm.get("data") or {}).get(meshconfig.MESH_KEY)
        if text is None:
            continue
        doc, errs = meshconfig.load(text)
        if errs:
            continue
        return dataclasses.replace(base, extension_providers=meshconfig.extension_providers(doc))
    return base


def _created(obj: dict) -> tuple:
    meta = obj.get("metadata") or {}
    return (str(meta.get("creationTimestamp") or ""), str(meta.get("name") or ""), str(meta.get("namespace") or ""))


def duration(value, default: float | None = None) -> float | None:
    """Seconds of a Go duration string (or a number of seconds); `default` when unset or malformed."""
    if value is None or value == "":
        return default
    if isinstance(value, int | float):
        return float(value)
    try:
        return parse_duration(str(value))
    except DurationError:
        return default


def _export_set(values, namespace: str) -> frozenset[str] | None:
    if not values:
        return None
    out = set()
    for v in values:
        v = str(v).strip()
        if not v:
            continue
        out.add(namespace if v == "." else v)
    return frozenset(out)


def _visible(export_to: frozenset[str] | None, default: tuple[str, ...], owner_ns: str, client_ns: str) -> bool:
    allowed = export_to if export_to is not None else frozenset(owner_ns if d == "." else d for d in default)
    if "~" in allowed and len(allowed) == 1:
        return False
    return "*" in allowed or client_ns in allowed


def resolve_gateway_name(name: str, namespace: str) -> str:
    """`mesh` stays; `gw` → `<ns>/gw`; `./gw` → `<ns>/gw`; old `gw.ns.svc.cluster.local` → `ns/gw`."""
    if name == MESH_GATEWAY:
        return name
    if "/" in name:
        ns, _, gw = name.partition("/")
        return f"{namespace}/{gw}" if ns == "." else name
    if "." in name:
        parts = name.split(".")
        return f"{parts[1]}/{parts[0]}"
    return f"{namespace}/{name}"


@dataclass(eq=False)
class EgressListener:
    """One egress listener of a sidecar scope: an optional explicit port, and what it imports."""

    port: Port | None
    bind: str
    capture_mode: str
    hosts: dict[str, list[str]]  # namespace (or "*") → dnsNames
    services: list[Service] = field(default_factory=list)
    virtual_services: list[Config] = field(default_factory=list)


@dataclass(eq=False)
class SidecarScope:
    namespace: str
    config: Config | None
    egress: list[EgressListener]
    services: list[Service]
    services_by_host: dict[str, Service]
    outbound_policy: str
    egress_proxy: dict | None = None

    @property
    def key(self) -> tuple:
        return (self.namespace, self.config.namespace + "/" + self.config.name if self.config else "")

    def listener_for_rds(self, port: int) -> EgressListener | None:
        for e in self.egress:
            if e.port is None or e.port.port == port:
                return e
        return None


@dataclass(eq=False)
class ProxyView:
    """What outbound config depends on: proxy type, namespace, scope, and the few labels rules test.

    Proxies with equal `key` get identical outbound clusters, listeners and routes (one shared layer).
    """

    type: str
    namespace: str
    labels: dict
    dns_domain: str
    scope: SidecarScope
    key: tuple
    own_ip: str | None = None  # set only when the proxy is itself an endpoint of a headless service
    access_log: tuple[str, str] = ("", "")
    gateways: list[Config] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the push context's error list

    @property
    def is_router(self) -> bool:
        return self.type == "router"


class PushContext:
    """Everything one config revision says, indexed for the builders."""

    def __init__(self, mesh: MeshConfig | None = None, revision: int = 0):
        self.mesh = mesh or MeshConfig()
        self.revision = revision
        self.services: list[Service] = []  # creation order
        self.services_by_host: dict[str, dict[str, Service]] = {}  # hostname → namespace → service
        self.pods: dict[tuple[str, str], dict] = {}
        self.pods_by_ip: dict[str, dict] = {}
        self.workload_entries: list[dict] = []
        self.virtual_services: list[Config] = []  # mesh + gateway, delegates merged, creation order
        self.delegate_virtual_services: dict[tuple[str, str], Config] = {}
        self.destination_rules: dict[str, dict[str, Config]] = {}  # namespace → host → merged rule
        self.gateways: list[Config] = []
        self.sidecars: dict[str, list[Config]] = {}
        self.peer_authentications: dict[str, list[Config]] = {}
        self.security = security.SecurityIndex()  # AuthorizationPolicy, RequestAuthentication
        self.envoy_filters: dict[str, list[Config]] = {}  # namespace → EnvoyFilters (envoyfilter.py orders them)
        self.secrets: dict[tuple[str, str], dict] = {}  # (namespace, name) → Secret (gateway credentials)
        self.namespaces: dict[str, dict] = {}
        self.node_labels: dict[str, dict] = {}  # Kubernetes Node name → its labels (its pods' locality)
        # headless services' endpoint IPs: a proxy with one of these IPs gets its own outbound layer.
        self.headless_ips: set[str] = set()
        # Builders memoise here (layers, per-service protos); lives as long as this revision.
        self.cache: dict = {}
        # Objects (or parts) skipped because they could not be translated: "Kind ns/name: reason".
        self.errors: list[str] = []
        self._scopes: dict[tuple, SidecarScope] = {}
        self._dr_cache: dict[tuple, Config | None] = {}
        self._dr_wildcards: dict[str, list[str]] = {}
        self._vs_mesh: dict[str, list[Config]] = {}
        self._svc_visible: dict[str, list[Service]] = {}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_resources(cls, objects: Iterable[dict], mesh: MeshConfig | None = None, revision: int = 0) -> PushContext:
        by_kind: dict[str, list[dict]] = {}
        for o in objects:
            if isinstance(o, dict) and isinstance(o.get("metadata"), dict):
                by_kind.setdefault(o.get("kind", ""), []).append(o)
        if mesh is None:
            mesh = mesh_from_resources(by_kind)
        push = cls(mesh, revision)
        for objs in by_kind.values():
            objs.sort(key=_created)
        for ns in by_kind.get("Namespace", []):
            push.namespaces[ns["metadata"]["name"]] = ns
        for node in by_kind.get("Node", []):
            push.node_labels[node["metadata"]["name"]] = node["metadata"].get("labels") or {}
        for pod in by_kind.get("Pod", []):
            meta = pod["metadata"]
            push.pods[(meta.get("namespace", "default"), meta["name"])] = pod
            ip = (pod.get("status") or {}).get("podIP")
            if ip:
                push.pods_by_ip.setdefault(ip, pod)
        push.workload_entries = by_kind.get("WorkloadEntry", [])
        for sec in by_kind.get("Secret", []):
            push.secrets[(sec["metadata"].get("namespace", "default"), sec["metadata"]["name"])] = sec
        push._build_services(by_kind)
        push._build_virtual_services(by_kind.get("VirtualService", []))
        push._build_destination_rules(by_kind.get("DestinationRule", []))
        for kind, index in (("Gateway", None), ("Sidecar", push.sidecars),
                            ("PeerAuthentication", push.peer_authentications),
                            ("EnvoyFilter", push.envoy_filters)):
            for obj in by_kind.get(kind, []):
                try:
                    c = push._config(obj)
                except MALFORMED as e:
                    push.report(push.describe(obj), e)
                    continue
                if index is None:
                    push.gateways.append(c)
                else:
                    index.setdefault(c.namespace, []).append(c)
        push.security = security.index(push, by_kind.get("AuthorizationPolicy", []),
                                       by_kind.get("RequestAuthentication", []))
        return push

    def report(self, what: str, err: Exception) -> None:
        """Record a config that could not be translated (it is skipped; the rest of the mesh still is)."""
        msg = f"{what}: {type(err).__name__}: {err}"
        if msg not in self.errors:
            self.errors.append(msg)

    @staticmethod
    def describe(obj: dict) -> str:
        meta = obj.get("metadata") or {}
        return f"{obj.get('kind', '?')} {meta.get('namespace', '')}/{meta.get('name', '')}"

    def _config(self, obj: dict) -> Config:
        meta = obj["metadata"]
        spec = obj.get("spec") or {}
        return Config(obj.get("kind", ""), meta["name"], meta.get("namespace") or "default", spec, _created(obj),
                      obj.get("apiVersion", ""))

    def fqdn(self, name: str, namespace: str) -> str:
        return f"{name}.{namespace}.svc.{self.mesh.domain_suffix}"

    # ---- services and endpoints
    def _build_services(self, by_kind: dict[str, list[dict]]) -> None:
        endpoints = {(o["metadata"].get("namespace", "default"), o["metadata"]["name"]): o
                     for o in by_kind.get("Endpoints", [])}
        slices: dict[tuple[str, str], list[dict]] = {}
        for s in by_kind.get("EndpointSlice", []):
            labels = s["metadata"].get("labels") or {}
            owner = labels.get("kubernetes.io/service-name")
            if owner:
                slices.setdefault((s["metadata"].get("namespace", "default"), owner), []).append(s)
        services: list[Service] = []
        for obj in by_kind.get("Service", []):
            try:
                svc = self._kube_service(obj)
                key = (svc.namespace, svc.name)
                if key in slices:
                    self._slice_endpoints(svc, slices[key])
                elif key in endpoints:
                    self._kube_endpoints(svc, endpoints[key])
            except MALFORMED as e:
                self.report(self.describe(obj), e)
                continue
            services.append(svc)
        for obj in by_kind.get("ServiceEntry", []):
            try:
                services.extend(self._service_entry(obj))
            except MALFORMED as e:
                self.report(self.describe(obj), e)
        # Creation order, then hostname (Istio sorts services by creation time; ties by name).
        services.sort(key=lambda s: (s.created[0], s.hostname, s.namespace))
        self.services = services
        for s in services:
            self.services_by_host.setdefault(s.hostname, {}).setdefault(s.namespace, s)
            if s.resolution == PASSTHROUGH and s.registry == KUBERNETES:
                for eps in s.endpoints.values():
                    self.headless_ips.update(e.address for e in eps)
            self._service_accounts(s)

    def _kube_service(self, obj: dict) -> Service:
        meta = obj["metadata"]
        spec = obj.get("spec") or {}
        name, ns = meta["name"], meta.get("namespace") or "default"
        ports = []
        for p in spec.get("ports") or []:
            number = int(p.get("port", 0))
            ports.append(Port(p.get("name") or "", number,
                              protocol.from_kube_port(number, p.get("name"), p.get("protocol"), p.get("appProtocol")),
                              p.get("targetPort")))
        svc_type = spec.get("type") or "ClusterIP"
        cluster_ip = spec.get("clusterIP") or ""
        addresses: list[str] = []
        external_name = (spec.get("externalName") or "") if svc_type == "ExternalName" else ""
        mesh_external = False
        if external_name:
            # 1.7: an ExternalName service is a DNS service whose one endpoint per port is the external name.
            resolution = DNS_LB
            mesh_external = True
        elif cluster_ip == "None" or svc_type == "ExternalName":
            resolution = PASSTHROUGH
        else:
            resolution = CLIENT_SIDE_LB
            if cluster_ip:
                addresses.append(cluster_ip)
        annotations = meta.get("annotations") or {}
        export = annotations.get(EXPORT_TO_ANNOTATION)
        export_to = _export_set(export.split(","), ns) if export else None
        labels = meta.get("labels") or {}
        svc = Service(self.fqdn(name, ns), ns, name, "Service", KUBERNETES, addresses, ports, resolution,
                      mesh_external=mesh_external, export_to=export_to,
                      selector=None if external_name else spec.get("selector") or None,
                      external_name=external_name, created=_created(obj), labels=labels)
        if external_name:
            for p in ports:
                if p.protocol != protocol.UDP:
                    svc.endpoints[p.port] = [Endpoint(external_name, p.port, p.name, dict(labels), namespace=ns)]
        return svc

    def pod_locality(self, pod: dict) -> str:
        """istiod's getPodLocality: the `istio-locality` label, else the labels of the Node in spec.nodeName."""
        node = (pod.get("spec") or {}).get("nodeName")
        return locality.pod_locality(pod["metadata"].get("labels") or {}, self.node_labels.get(node) if node else None)

    def _pod_fields(self, target_ref: dict | None, ns: str) -> tuple:
        """The Endpoint fields after (address, port, service_port_name), positionally (cheaper to pass than
        keywords): what comes from the address's Pod, computed once per address, not per port."""
        pod = None
        if target_ref and target_ref.get("kind", "Pod") == "Pod" and target_ref.get("name"):
            pod = self.pods.get((target_ref.get("namespace") or ns, target_ref["name"]))
        if pod is None:
            return ({}, "disabled", "", "", 0, "", "", ns)
        meta = pod["metadata"]
        labels = meta.get("labels") or {}
        spec = pod.get("spec") or {}
        sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        # labels, tls_mode, service_account, locality, weight, network, workload, namespace
        return (labels, labels.get(TLS_MODE_LABEL, "disabled"), sa, self.pod_locality(pod), 0, "", meta["name"],
                meta.get("namespace") or ns)

    def _kube_endpoints(self, svc: Service, obj: dict) -> None:
        for subset in obj.get("subsets") or []:
            ports = subset.get("ports") or []
            addrs = None
            for sp in svc.ports:
                if sp.protocol == protocol.UDP:
                    continue
                match = [p for p in ports if (p.get("name") or "") == sp.name]
                if not match and len(ports) == 1 and len(svc.ports) == 1:
                    match = ports
                if not match:
                    continue
                target = int(match[0].get("port", 0))
                eps = svc.endpoints.setdefault(sp.port, [])
                if addrs is None:
                    addrs = [(a.get("ip", ""), self._pod_fields(a.get("targetRef"), svc.namespace))
                             for a in subset.get("addresses") or []]
                eps.extend([Endpoint(ip, target, sp.name, *fields) for ip, fields in addrs])

    def _slice_endpoints(self, svc: Service, slices: list[dict]) -> None:
        for s in slices:
            ports = s.get("ports") or []
            addrs = None
            for sp in svc.ports:
                if sp.protocol == protocol.UDP:
                    continue
                match = [p for p in ports if (p.get("name") or "") == sp.name]
                if not match:
                    continue
                target = int(match[0].get("port", 0))
                eps = svc.endpoints.setdefault(sp.port, [])
                if addrs is None:
                    addrs = [(ip, self._pod_fields(e.get("targetRef"), svc.namespace))
                             for e in s.get("endpoints") or [] if (e.get("conditions") or {}).get("ready") is not False
                             for ip in e.get("addresses") or []]
                eps.extend([Endpoint(ip, target, sp.name, *fields) for ip, fields in addrs])

    def _service_entry(self, obj: dict) -> list[Service]:
        meta = obj["metadata"]
        spec = obj.get("spec") or {}
        ns = meta.get("namespace") or "default"
        resolution = {"NONE": PASSTHROUGH, "STATIC": CLIENT_SIDE_LB, "DNS": DNS_LB,
                      "DNS_ROUND_ROBIN": DNS_ROUND_ROBIN_LB}.get(spec.get("resolution") or "NONE", PASSTHROUGH)
        external = (spec.get("location") or "MESH_EXTERNAL") != "MESH_INTERNAL"
        ports = [Port(p.get("name") or "", int(p.get("number", 0)), protocol.parse(p.get("protocol")),
                      p.get("targetPort")) for p in spec.get("ports") or []]
        export_to = _export_set(spec.get("exportTo"), ns)
        out = []
        workloads = self._se_workloads(spec, ns)
        for host in spec.get("hosts") or []:
            svc = Service(host, ns, meta["name"], "ServiceEntry", EXTERNAL, list(spec.get("addresses") or []),
                          ports, resolution, mesh_external=external, export_to=export_to,
                          selector=(spec.get("workloadSelector") or {}).get("labels"), created=_created(obj),
                          labels=meta.get("labels") or {}, subject_alt_names=list(spec.get("subjectAltNames") or []))
            for sp in ports:
                eps = []
                for w in workloads:
                    wports = w.get("ports") or {}
                    target = int(wports.get(sp.name) or sp.target_port or sp.port)
                    labels = dict(w.get("labels") or {})
                    eps.append(Endpoint(w.get("address", ""), target, sp.name, labels,
                                        tls_mode=labels.get(TLS_MODE_LABEL, "disabled"),
                                        service_account=w.get("serviceAccount") or "",
                                        locality=w.get("locality") or locality.from_locality_label(labels),
                                        weight=int(w.get("weight") or 0),
                                        network=w.get("network") or "", workload=w.get("_name", ""),
                                        namespace=ns))
                if not workloads and resolution in (DNS_LB, DNS_ROUND_ROBIN_LB) and not host.startswith("*"):
                    eps.append(Endpoint(host, int(sp.target_port or sp.port), sp.name, {}, namespace=ns))
                if eps:
                    svc.endpoints[sp.port] = eps
            out.append(svc)
        return out

    def _se_workloads(self, spec: dict, ns: str) -> list[dict]:
        """SE endpoints: inline `endpoints`, or the WorkloadEntries and Pods its workloadSelector picks."""
        if spec.get("endpoints"):
            return list(spec["endpoints"])
        selector = (spec.get("workloadSelector") or {}).get("labels")
        if not selector:
            return []
        out = []
        for we in self.workload_entries:
            if (we["metadata"].get("namespace") or "default") != ns:
                continue
            wspec = dict(we.get("spec") or {})
            labels = dict(we["metadata"].get("labels") or {})
            labels.update(wspec.get("labels") or {})
            if labels_match(selector, labels):
                wspec["labels"] = labels
                wspec["_name"] = we["metadata"]["name"]
                out.append(wspec)
        for (pns, pname), pod in self.pods.items():
            if pns != ns:
                continue
            labels = pod["metadata"].get("labels") or {}
            ip = (pod.get("status") or {}).get("podIP")
            if ip and labels_match(selector, labels):
                pspec = pod.get("spec") or {}
                out.append({"address": ip, "labels": labels, "_name": pname, "locality": self.pod_locality(pod),
                            "serviceAccount": pspec.get("serviceAccountName") or "default"})
        return out

    def _service_accounts(self, svc: Service) -> None:
        td = self.mesh.trust_domain
        # each (account, namespace) once: a service's endpoints (every port's) mostly share a few
        pairs = {(e.service_account, e.namespace) for eps in svc.endpoints.values() for e in eps if e.service_account}
        accounts = {sa if sa.startswith("spiffe://") else f"spiffe://{td}/ns/{ns}/sa/{sa}" for sa, ns in pairs}
        accounts.update(svc.subject_alt_names)
        svc.service_accounts = sorted(accounts)

    # ---- VirtualServices
    def _build_virtual_services(self, objs: list[dict]) -> None:
        roots: list[Config] = []
        suffix = self.mesh.domain_suffix
        for obj in objs:
            try:
                c = self._config(obj)
                spec = c.spec = self._resolved_vs_spec(c.spec, c.namespace)
                c.export_to = _export_set(spec.get("exportTo"), c.namespace)
                c.hosts = [resolve_short_name(h, c.namespace, suffix) for h in spec.get("hosts") or []]
                c.gateways = [resolve_gateway_name(g, c.namespace) for g in spec.get("gateways") or []] or \
                    [MESH_GATEWAY]
            except MALFORMED as e:
                self.report(self.describe(obj), e)
                continue
            if not c.hosts:
                self.delegate_virtual_services[(c.namespace, c.name)] = c
            else:
                roots.append(c)
        for c in roots:
            if any("delegate" in (r or {}) for r in c.spec.get("http") or []):
                c.spec["http"] = self._merge_delegates(c)
        self.virtual_services = roots

    def _resolved_vs_spec(self, spec: dict, ns: str) -> dict:
        """The spec with short destination hosts and match gateways made fully qualified. Only the dicts and lists
        on the way to what changes are copied (the input objects stay untouched; the rest is shared, and nothing
        downstream mutates a spec)."""
        suffix = self.mesh.domain_suffix

        def dest(d: dict | None) -> dict | None:
            if isinstance(d, dict) and d.get("host"):
                d = dict(d)
                d["host"] = resolve_short_name(d["host"], ns, suffix)
            return d

        def with_dest(r: dict) -> dict:
            d = r.get("destination")
            if isinstance(d, dict) and d.get("host"):
                r = dict(r)
                r["destination"] = dest(d)
            return r

        def match(m: dict) -> dict:
            if m.get("gateways"):
                m = dict(m)
                m["gateways"] = [resolve_gateway_name(g, ns) for g in m["gateways"]]
            return m

        out = dict(spec)
        for section in ("http", "tcp", "tls"):
            rules = spec.get(section)
            if not rules:
                continue
            out[section] = new_rules = []
            for rule in rules:
                rule = dict(rule)
                if rule.get("route"):
                    rule["route"] = [with_dest(r) for r in rule["route"]]
                if section == "http":
                    if "mirror" in rule:
                        rule["mirror"] = dest(rule["mirror"])
                    if rule.get("mirrors"):
                        rule["mirrors"] = [with_dest(m) for m in rule["mirrors"]]
                if rule.get("match"):
                    rule["match"] = [match(m) for m in rule["match"]]
                new_rules.append(rule)
        return out

    def _merge_delegates(self, root: Config) -> list[dict]:
        out: list[dict] = []
        for rule in root.spec.get("http") or []:
            d = rule.get("delegate")
            if not d:
                out.append(rule)
                continue
            delegate = self.delegate_virtual_services.get((d.get("namespace") or root.namespace, d.get("name")))
            if delegate is None or not _visible(delegate.export_to, self.mesh.default_virtual_service_export_to,
                                                delegate.namespace, root.namespace):
                continue
            for drule in delegate.spec.get("http") or []:
                merged = copy.deepcopy(drule)
                root_matches = rule.get("match") or []
                dmatches = drule.get("match") or []
                if root_matches:
                    combined = []
                    for rm in root_matches:
                        for dm in dmatches or [{}]:
                            m = _merge_match(rm, dm)
                            if m is not None:
                                combined.append(m)
                    if not combined:
                        continue
                    merged["match"] = combined
                for key in ("rewrite", "timeout", "retries", "fault", "mirror", "mirrorPercentage", "mirrorPercent",
                            "corsPolicy", "headers"):
                    if key not in merged and key in rule:
                        merged[key] = copy.deepcopy(rule[key])
                if rule.get("name") and drule.get("name"):
                    merged["name"] = f"{rule['name']}-{drule['name']}"
                elif rule.get("name"):
                    merged["name"] = rule["name"]
                out.append(merged)
        return out

    # ---- DestinationRules
    def _build_destination_rules(self, objs: list[dict]) -> None:
        suffix = self.mesh.domain_suffix
        for obj in objs:
            try:
                c = self._config(obj)
                spec = c.spec
                host = resolve_short_name(spec.get("host") or "", c.namespace, suffix)
            except MALFORMED as e:
                self.report(self.describe(obj), e)
                continue
            c.hosts = [host]
            c.export_to = _export_set(spec.get("exportTo"), c.namespace)
            by_host = self.destination_rules.setdefault(c.namespace, {})
            existing = by_host.get(host)
            if existing is None:
                by_host[host] = c
                continue
            # Same host twice in one namespace: subsets are appended (names stay unique), first policy wins.
            merged = copy.copy(existing)
            mspec = dict(existing.spec)
            names = {s.get("name") for s in mspec.get("subsets") or []}
            subsets = list(mspec.get("subsets") or [])
            for s in spec.get("subsets") or []:
                if s.get("name") not in names:
                    subsets.append(s)
                    names.add(s.get("name"))
            mspec["subsets"] = subsets
            if not mspec.get("trafficPolicy") and spec.get("trafficPolicy"):
                mspec["trafficPolicy"] = spec["trafficPolicy"]
            merged.spec = mspec
            by_host[host] = merged

    def _dr_host(self, namespace: str, hostname: str) -> str | None:
        """Most specific DR host in a namespace for `hostname`: exact, else the longest matching wildcard."""
        rules = self.destination_rules.get(namespace)
        if not rules:
            return None
        if hostname in rules:
            return hostname
        wild = self._dr_wildcards.get(namespace)
        if wild is None:
            wild = self._dr_wildcards[namespace] = sorted((h for h in rules if h.startswith("*")), key=len,
                                                          reverse=True)
        return most_specific_host_match(hostname, wild) if wild else None

    def destination_rule(self, proxy_ns: str, service: Service) -> Config | None:
        """The DR for a service as seen from a namespace (Istio 1.7 PushContext.DestinationRule order)."""
        key = (proxy_ns, service.hostname, service.namespace)
        if key in self._dr_cache:
            return self._dr_cache[key]
        out = None
        root = self.mesh.root_namespace
        default = self.mesh.default_destination_rule_export_to
        if proxy_ns != root:
            h = self._dr_host(proxy_ns, service.hostname)
            if h is not None:
                out = self.destination_rules[proxy_ns][h]
        if out is None:
            for owner in (service.namespace, root):
                h = self._dr_host(owner, service.hostname)
                if h is None:
                    continue
                rule = self.destination_rules[owner][h]
                if owner == proxy_ns or _visible(rule.export_to, default, owner, proxy_ns):
                    out = rule
                    break
        self._dr_cache[key] = out
        return out

    # ------------------------------------------------------------------ visibility and scopes
    def visible_services(self, namespace: str) -> list[Service]:
        """Services a namespace sees: its private ones, those exported to it, then public ones (1.7 order)."""
        cached = self._svc_visible.get(namespace)
        if cached is not None:
            return cached
        private, exported, public = [], [], []
        default = self.mesh.default_service_export_to
        for s in self.services:
            allowed = s.export_to if s.export_to is not None else frozenset(
                s.namespace if d == "." else d for d in default)
            if "*" in allowed:
                public.append(s)
            elif "~" in allowed:
                continue
            elif namespace in allowed:
                (private if namespace == s.namespace else exported).append(s)
        out, seen = [], set()
        for s in private + exported + public:
            if s.hostname not in seen:
                seen.add(s.hostname)
                out.append(s)
        self._svc_visible[namespace] = out
        return out

    def mesh_virtual_services(self, namespace: str, gateway: str = MESH_GATEWAY) -> list[Config]:
        """VirtualServices bound to a gateway (`mesh` for sidecars) and visible to a namespace."""
        key = f"{namespace}|{gateway}"
        cached = self._vs_mesh.get(key)
        if cached is not None:
            return cached
        default = self.mesh.default_virtual_service_export_to
        private, exported, public = [], [], []
        for vs in self.virtual_services:
            if gateway not in vs.gateways:
                continue
            allowed = vs.export_to if vs.export_to is not None else frozenset(
                vs.namespace if d == "." else d for d in default)
            if "*" in allowed:
                public.append(vs)
            elif namespace in allowed:
                (private if vs.namespace == namespace else exported).append(vs)
        out = private + exported + public
        self._vs_mesh[key] = out
        return out

    def sidecar_for(self, namespace: str, labels: dict) -> Config | None:
        for ns in (namespace, self.mesh.root_namespace):
            fallback = None
            for sc in self.sidecars.get(ns, []):
                selector = (sc.spec.get("workloadSelector") or {}).get("labels")
                if selector:
                    if ns == namespace and labels_match(selector, labels):
                        return sc
                elif fallback is None:
                    fallback = sc
            if fallback is not None:
                return fallback
        return None

    def sidecar_scope(self, namespace: str, sidecar: Config | None) -> SidecarScope:
        key = (namespace, id(sidecar) if sidecar else 0)
        scope = self._scopes.get(key)
        if scope is None:
            scope = self._build_scope(namespace, sidecar)
            self._scopes[key] = scope
        return scope

    def _build_scope(self, namespace: str, sidecar: Config | None) -> SidecarScope:
        visible = self.visible_services(namespace)
        mesh_vs = self.mesh_virtual_services(namespace)
        policy = self.mesh.outbound_traffic_policy
        if sidecar is None:
            listener = EgressListener(None, "", "DEFAULT", {"*": ["*"]}, list(visible), list(mesh_vs))
            return SidecarScope(namespace, None, [listener], list(visible), {s.hostname: s for s in visible}, policy)
        spec = sidecar.spec
        egress_specs = spec.get("egress") or [{"hosts": ["*/*"]}]
        listeners = []
        for e in egress_specs:
            hosts: dict[str, list[str]] = {}
            for h in e.get("hosts") or []:
                ns, sep, dns = h.partition("/")
                if not sep:
                    continue
                hosts.setdefault(namespace if ns == "." else ns, []).append(dns)
            port = None
            if e.get("port"):
                p = e["port"]
                port = Port(p.get("name") or "", int(p.get("number", 0)), protocol.parse(p.get("protocol")))
            listener = EgressListener(port, e.get("bind") or "", e.get("captureMode") or "DEFAULT", hosts)
            listener.services = _select_services(listener, visible, namespace)
            listener.virtual_services = _select_virtual_services(listener, mesh_vs)
            listeners.append(listener)
        services: list[Service] = []
        added: dict[str, Service] = {}
        for listener in listeners:
            for s in listener.services:
                if s.hostname not in added:
                    added[s.hostname] = s
                    services.append(s)
            for vs in listener.virtual_services:
                for dest in _vs_destination_hosts(vs.spec):
                    if dest in added:
                        continue
                    by_ns = self.services_by_host.get(dest)
                    if by_ns:
                        s = by_ns.get(namespace) or by_ns[sorted(by_ns)[0]]
                        added[dest] = s
                        services.append(s)
        otp = spec.get("outboundTrafficPolicy") or {}
        return SidecarScope(namespace, sidecar, listeners, services, added, otp.get("mode") or policy,
                            otp.get("egressProxy"))

    # ------------------------------------------------------------------ workloads
    def proxy_instances(self, proxy) -> list[ServiceInstance]:
        """The service ports a proxy's own workload serves (its Pod's selecting Services, or endpoint IPs)."""
        key = ("instances", proxy.id, proxy.ip)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        out: list[ServiceInstance] = []
        pod = self.pods.get((proxy.namespace, proxy.pod)) or self.pods_by_ip.get(proxy.ip)
        if pod is not None:
            labels = pod["metadata"].get("labels") or {}
            pod_ns = pod["metadata"].get("namespace") or "default"
            for svc in self._selecting_services(pod_ns, labels):
                if not labels_match(svc.selector, labels):
                    continue
                for p in svc.ports:
                    if p.protocol == protocol.UDP:
                        continue
                    out.append(ServiceInstance(svc, p, _pod_target_port(pod, p)))
        if not out or self._has_mesh_internal_entries():  # else the endpoint index adds nothing
            by_ip = self._instances_by_ip().get(proxy.ip, ())
            if not out:
                out = [ServiceInstance(svc, p, port) for svc, p, port in by_ip if svc.registry == KUBERNETES]
            out += [ServiceInstance(svc, p, port) for svc, p, port in by_ip
                    if svc.registry == EXTERNAL and not svc.mesh_external]
        out.sort(key=lambda i: (i.service.created[0], i.service.hostname))
        self.cache[key] = out
        return out

    def view(self, proxy) -> ProxyView:
        """The outbound view of a proxy, memoised per key so equal proxies share one object."""
        is_router = proxy.type == "router"
        sidecar = None if is_router else self.sidecar_for(proxy.namespace, proxy.labels)
        scope = self.sidecar_scope(proxy.namespace, sidecar)
        signature = tuple(labels_match(sel, proxy.labels) for sel in self._source_selectors(scope))
        own_ip = proxy.ip if proxy.ip in self.headless_ips else None
        log_path = proxy.metadata.get("ACCESS_LOG_FILE") or self.mesh.access_log_file
        access_log = (log_path, proxy.metadata.get("ACCESS_LOG_ENCODING") or self.mesh.access_log_encoding)
        gateways = self.gateways_for(proxy) if is_router else []
        key = (proxy.type, proxy.namespace, scope.key, signature, own_ip, access_log,
               tuple(id(g) for g in gateways))
        cached = self.cache.get(("view", key))
        if cached is not None:
            return cached
        dns_domain = f"{proxy.namespace}.svc.{self.mesh.domain_suffix}"
        view = ProxyView(proxy.type, proxy.namespace, dict(proxy.labels), dns_domain, scope, key, own_ip,
                         access_log, gateways, self.errors)
        self.cache[("view", key)] = view
        return view

    def _source_selectors(self, scope: SidecarScope) -> list[dict]:
        """Every distinct `sourceLabels` selector in the VirtualServices a scope sees (they make routes per-proxy)."""
        key = ("selectors", scope.key)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        seen: list[dict] = []
        vss = {id(vs): vs for e in scope.egress for vs in e.virtual_services}
        for vs in vss.values():
            for section in ("http", "tcp", "tls"):
                for rule in vs.spec.get(section) or []:
                    for m in rule.get("match") or []:
                        sel = m.get("sourceLabels")
                        if sel and sel not in seen:
                            seen.append(sel)
        self.cache[key] = seen
        return seen

    def ingress_instances(self, proxy, sidecar: Config) -> list[ServiceInstance]:
        """Sidecar `ingress` listeners as service instances (Istio 1.7 findOrCreateServiceInstance)."""
        real = self.proxy_instances(proxy)
        out = []
        for ing in sidecar.spec.get("ingress") or []:
            p = ing.get("port") or {}
            number = int(p.get("number") or 0)
            listen = Port(p.get("name") or "", number, protocol.parse(p.get("protocol")))
            match = next((i for i in real if i.endpoint_port == number), None)
            service = match.service if match is not None else Service(
                f"{sidecar.name}.{sidecar.namespace}", sidecar.namespace, sidecar.name, "Sidecar", KUBERNETES, [],
                [listen], CLIENT_SIDE_LB)
            default = ing.get("defaultEndpoint") or f"127.0.0.1:{number}"
            if default.startswith("unix://"):
                address, target = default, 0
            else:
                host, _, port_text = default.rpartition(":")
                address = proxy.ip if host == "0.0.0.0" else "127.0.0.1"
                target = int(port_text or number)
            out.append(ServiceInstance(service, listen, target, endpoint_address=address, listen_port=number,
                                       capture_mode=ing.get("captureMode") or "DEFAULT", bind=ing.get("bind") or ""))
        return out

    def _has_mesh_internal_entries(self) -> bool:
        """Whether a ServiceEntry service is MESH_INTERNAL (whose endpoints are instances of their workloads)."""
        has = self.cache.get("mesh-internal-entries")
        if has is None:
            has = self.cache["mesh-internal-entries"] = any(
                s.registry == EXTERNAL and not s.mesh_external for s in self.services)
        return has

    def _instances_by_ip(self) -> dict[str, list[tuple[Service, Port, int]]]:
        """Endpoint IP → (service, port, endpoint port), first endpoint per service port; built once per push."""
        index = self.cache.get("by-ip")
        if index is None:
            index = {}
            for svc in self.services:
                for p in svc.ports:
                    if p.protocol == protocol.UDP:
                        continue
                    seen = set()
                    for e in svc.endpoints.get(p.port, ()):
                        if e.address not in seen:
                            seen.add(e.address)
                            index.setdefault(e.address, []).append((svc, p, e.port))
            self.cache["by-ip"] = index
        return index

    def _selecting_services(self, namespace: str, labels: dict) -> list[Service]:
        """Kubernetes services in a namespace whose selector may match `labels` (creation order).

        Indexed once per push by one (key, value) pair of each selector, so a pod looks at a handful of
        candidates instead of every service; callers still check the whole selector.
        """
        index = self.cache.get("selecting")
        if index is None:
            index = {}
            for pos, svc in enumerate(self.services):
                if svc.registry == KUBERNETES and svc.selector:
                    k, v = min(svc.selector.items())
                    index.setdefault((svc.namespace, k, str(v)), []).append((pos, svc))
            self.cache["selecting"] = index
        found: dict[int, Service] = {}
        for k, v in labels.items():
            for pos, svc in index.get((namespace, k, str(v)), ()):
                found[pos] = svc
        return [found[p] for p in sorted(found)]

    def gateways_for(self, proxy) -> list[Config]:
        """Gateways whose selector matches a router proxy's labels (all namespaces, creation order)."""
        out = []
        for gw in self.gateways:
            selector = gw.spec.get("selector")
            if selector and labels_match(selector, proxy.labels) or not selector and gw.namespace == proxy.namespace:
                out.append(gw)
        return out

    def mtls_mode(self, namespace: str, labels: dict | None, port: int | None = None) -> str:
        """PeerAuthentication mode for a workload (port-level → workload → namespace → mesh → PERMISSIVE)."""
        if labels is not None:
            for pa in self.peer_authentications.get(namespace, []):
                selector = (pa.spec.get("selector") or {}).get("matchLabels")
                if not selector or not labels_match(selector, labels):
                    continue
                if port is not None:
                    plm = pa.spec.get("portLevelMtls") or {}
                    pm = plm.get(str(port)) or plm.get(port)
                    if pm and (pm.get("mode") or "UNSET") != "UNSET":
                        return pm["mode"]
                mode = (pa.spec.get("mtls") or {}).get("mode") or "UNSET"
                if mode != "UNSET":
                    return mode
                break
        for ns in (namespace, self.mesh.root_namespace):
            for pa in self.peer_authentications.get(ns, []):
                if (pa.spec.get("selector") or {}).get("matchLabels"):
                    continue
                mode = (pa.spec.get("mtls") or {}).get("mode") or "UNSET"
                if mode != "UNSET":
                    return mode
                break
        return "PERMISSIVE"

    def endpoint_mtls_disabled(self, endpoint) -> bool:
        """Whether the endpoint's workload refuses mTLS on that port (PeerAuthentication DISABLE, workload- or
        port-level included): auto mTLS then talks plaintext to it (Istio's EDS mtlsChecker)."""
        if not self._may_disable(endpoint.namespace):
            return False
        return self.mtls_mode(endpoint.namespace, endpoint.labels or {}, endpoint.port) == "DISABLE"

    def endpoint_mtls_check(self) -> Callable[[Endpoint], bool] | None:
        """endpoint_mtls_disabled, or None when no PeerAuthentication anywhere says DISABLE (then it is false for
        every endpoint, and assignment builders skip a call per endpoint)."""
        return self.endpoint_mtls_disabled if self._disabling_namespaces() else None

    def _may_disable(self, namespace: str) -> bool:
        """Whether any PeerAuthentication that can apply in `namespace` says DISABLE (at any level); asked for
        every endpoint of every cluster, and almost always no."""
        index = self._disabling_namespaces()
        return namespace in index or self.mesh.root_namespace in index

    def _disabling_namespaces(self) -> set[str]:
        """The namespaces with a PeerAuthentication that says DISABLE (at any level)."""
        index = self.cache.get("pa-disable")
        if index is None:
            index = self.cache["pa-disable"] = {
                ns for ns, pas in self.peer_authentications.items()
                if any("DISABLE" in (str((pa.spec.get("mtls") or {}).get("mode")),
                                     *(str((v or {}).get("mode")) for v in (pa.spec.get("portLevelMtls") or {}).values()))
                       for pa in pas)}
        return index

    def service_mtls_mode(self, service: Service) -> str:
        """Best-effort mTLS mode of a destination service, for auto mTLS (Istio's BestEffortInferServiceMTLSMode)."""
        if service.mesh_external:
            return "UNKNOWN"
        return self.mtls_mode(service.namespace, None)

    def port_level_mtls_ports(self, namespace: str, labels: dict) -> dict[int, str]:
        for pa in self.peer_authentications.get(namespace, []):
            selector = (pa.spec.get("selector") or {}).get("matchLabels")
            if selector and labels_match(selector, labels):
                return {int(k): (v or {}).get("mode") or "UNSET" for k, v in (pa.spec.get("portLevelMtls") or {}).items()}
        return {}


def _pod_target_port(pod: dict, port: Port) -> int:
    target = port.target_port
    if target is None or target == "":
        return port.port
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        return int(target)
    for c in (pod.get("spec") or {}).get("containers") or []:
        for cp in c.get("ports") or []:
            if cp.get("name") == target:
                return int(cp.get("containerPort", port.port))
    return port.port


def _vs_destination_hosts(spec: dict) -> list[str]:
    out = []
    for section in ("http", "tcp", "tls"):
        for rule in spec.get(section) or []:
            for r in rule.get("route") or []:
                h = (r.get("destination") or {}).get("host")
                if h:
                    out.append(h)
            m = rule.get("mirror")
            if m and m.get("host"):
                out.append(m["host"])
    return out


def _select_services(listener: EgressListener, services: list[Service], config_ns: str) -> list[Service]:
    needs_port = listener.port is not None and listener.port.port and listener.port.protocol != protocol.HTTP_PROXY
    imported: list[Service] = []
    wildcard = listener.hosts.get("*")
    for s in services:
        for hosts in (listener.hosts.get(s.namespace), wildcard):
            if not hosts:
                continue
            for h in hosts:
                if host_matches(h, s.hostname):
                    if needs_port:
                        p = s.port_by_number(listener.port.port)
                        if p is not None:
                            trimmed = copy.copy(s)
                            trimmed.ports = [p]
                            imported.append(trimmed)
                    else:
                        imported.append(s)
                    break
    chosen: dict[str, str] = {}
    for s in imported:
        if s.hostname not in chosen or s.namespace == config_ns:
            chosen[s.hostname] = s.namespace
    out, seen = [], set()
    for s in imported:
        if chosen[s.hostname] == s.namespace and s.hostname not in seen:
            seen.add(s.hostname)
            out.append(s)
    return out


def _select_virtual_services(listener: EgressListener, virtual_services: list[Config]) -> list[Config]:
    out = []
    for vs in virtual_services:
        picked = False
        for hosts in (listener.hosts.get(vs.namespace), listener.hosts.get("*")):
            if picked or not hosts:
                continue
            if any(host_matches(h, vh) for h in hosts for vh in vs.hosts):
                out.append(vs)
                picked = True
    return out


def _merge_match(root: dict, delegate: dict) -> dict | None:
    """A delegate match inside a root match; None when they conflict (the rule is dropped)."""
    out = copy.deepcopy(root)
    for key, value in delegate.items():
        if key == "uri" and "uri" in root:
            r, d = root["uri"], value
            if "prefix" in r:
                dtext = d.get("prefix", d.get("exact"))
                if dtext is None or not dtext.startswith(r["prefix"]):
                    return None
            elif r != d:
                return None
            out["uri"] = copy.deepcopy(d)
        elif key in ("headers", "queryParams", "withoutHeaders", "sourceLabels"):
            merged = dict(root.get(key) or {})
            for k, v in (value or {}).items():
                if k in merged and merged[k] != v:
                    return None
                merged[k] = v
            out[key] = merged
        elif key in root and root[key] != value and key != "name":
            return None
        else:
            out[key] = copy.deepcopy(value)
    return out
