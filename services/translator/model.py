"""The mesh model the builders read: services, ports, endpoints and the Istio configs around them.

Plain data classes with no Envoy types; `push_context.py` fills them from stored resource dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from ..mesh.addresses import is_ip
from . import protocol

# Service resolution, as Istio's model.Resolution.
CLIENT_SIDE_LB = "ClientSideLB"
DNS_LB = "DNSLB"
DNS_ROUND_ROBIN_LB = "DNSRoundRobinLB"
PASSTHROUGH = "Passthrough"
ALIAS = "Alias"

KUBERNETES = "Kubernetes"
EXTERNAL = "External"

UNSPECIFIED_IP = "0.0.0.0"
TLS_MODE_LABEL = "security.istio.io/tlsMode"


def is_wildcard(host: str) -> bool:
    return host.startswith("*")


def host_matches(a: str, b: str) -> bool:
    """Istio's host.Name.Matches: equal, or one is a wildcard (`*`, `*.suffix`) covering the other."""
    aw, bw = a.startswith("*"), b.startswith("*")
    if aw:
        if bw:
            return b[1:].endswith(a[1:]) if len(a) < len(b) else a[1:].endswith(b[1:])
        return b.endswith(a[1:])
    if bw:
        return a.endswith(b[1:])
    return a == b


def host_subset_of(a: str, b: str) -> bool:
    """True when every name `a` matches is also matched by `b` (Istio's host.Name.SubsetOf)."""
    if b.startswith("*"):
        return a[1:].endswith(b[1:]) if a.startswith("*") else a.endswith(b[1:])
    return not a.startswith("*") and a == b


def most_specific_host_match(needle: str, stack) -> str | None:
    """The entry of `stack` that matches `needle` best: the exact name, else the longest wildcard."""
    if needle in stack:
        return needle
    best = None
    for h in stack:
        if h.startswith("*") and host_matches(h, needle) and (best is None or len(h) > len(best)):
            best = h
    return best


def resolve_short_name(host: str, namespace: str, domain_suffix: str) -> str:
    """Istio's ResolveShortnameToFQDN: `reviews` in `default` → `reviews.default.svc.cluster.local`."""
    if not host or host == "*" or "." in host or is_ip(host):
        return host
    return f"{host}.{namespace}.svc.{domain_suffix}"


def labels_match(selector: dict | None, labels: dict) -> bool:
    """True if `labels` is a superset of `selector` (an empty selector matches everything)."""
    if not selector:
        return True
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass(eq=False, slots=True)
class Port:
    name: str
    port: int
    protocol: str
    target_port: int | str | None = None

    @property
    def listener_class(self) -> str | None:
        return protocol.listener_class(self.protocol)


@dataclass(eq=False, slots=True)
class Endpoint:
    address: str
    port: int  # the workload's port (targetPort)
    service_port_name: str
    labels: dict
    tls_mode: str = "disabled"
    service_account: str = ""
    locality: str = ""
    weight: int = 0
    network: str = ""
    workload: str = ""  # pod or WorkloadEntry name, for the istio metadata
    namespace: str = ""


@dataclass(eq=False)
class Service:
    hostname: str
    namespace: str
    name: str
    kind: str  # "Service" or "ServiceEntry"
    registry: str
    addresses: list[str]
    ports: list[Port]
    resolution: str
    mesh_external: bool = False
    export_to: frozenset[str] | None = None  # None: the mesh default; "*" public; "~" nobody; else namespaces
    selector: dict | None = None
    external_name: str = ""
    created: tuple = ()
    labels: dict = field(default_factory=dict)
    subject_alt_names: list[str] = field(default_factory=list)
    # Filled by the push context: service port number → endpoints.
    endpoints: dict[int, list[Endpoint]] = field(default_factory=dict)
    service_accounts: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.addresses[0] if self.addresses else UNSPECIFIED_IP

    def port_by_number(self, number: int) -> Port | None:
        for p in self.ports:
            if p.port == number:
                return p
        return None

    def key(self) -> tuple[str, str]:
        return (self.hostname, self.namespace)

    def __repr__(self) -> str:
        return f"Service({self.hostname} ns={self.namespace})"


@dataclass(eq=False)
class Config:
    """An Istio config object (VirtualService, DestinationRule, Gateway, Sidecar, PeerAuthentication)."""

    kind: str
    name: str
    namespace: str
    spec: dict
    created: tuple
    api_version: str = ""
    # Derived fields each kind fills.
    hosts: list[str] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)
    export_to: frozenset[str] | None = None
    annotations: dict = field(default_factory=dict)  # read by kinds that honour some (istio.io/dry-run)

    @cached_property  # read for every route and cluster a config makes
    def meta_path(self) -> str:
        """The `istio.config` metadata path istioctl turns into `name.namespace`."""
        kebab = {"VirtualService": "virtual-service", "DestinationRule": "destination-rule", "Gateway": "gateway",
                 "Sidecar": "sidecar", "ServiceEntry": "service-entry"}[self.kind]
        return f"/apis/networking.istio.io/v1alpha3/namespaces/{self.namespace}/{kebab}/{self.name}"

    def __repr__(self) -> str:
        return f"{self.kind}({self.namespace}/{self.name})"


@dataclass(eq=False)
class ServiceInstance:
    """A service port the proxy's workload serves (Istio's ServiceInstance)."""

    service: Service
    port: Port
    endpoint_port: int
    # Sidecar `ingress` listeners: where the app listens (defaultEndpoint) and the port traffic arrives on.
    endpoint_address: str = "127.0.0.1"
    listen_port: int | None = None
    capture_mode: str = "DEFAULT"
    bind: str = ""

    @property
    def inbound_port(self) -> int:
        """The port inbound traffic is addressed to (the chain's destination_port)."""
        return self.listen_port if self.listen_port is not None else self.endpoint_port


def labels_key(labels: dict | None) -> tuple:
    """A label selector as a hashable key (order-free)."""
    return tuple(sorted(labels.items())) if labels else ()


def service_id(service) -> tuple:
    """A service's identity that survives a new push context (so memoised results can be carried over to the
    next revision when only other services' endpoints changed); unique within a push."""
    return (service.kind, service.namespace, service.name, service.hostname)
