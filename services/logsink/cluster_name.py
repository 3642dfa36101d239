"""Istio cluster names decoded: `outbound|80|v1|webserver.default.svc.cluster.local` → direction, port, subset,
host, service, namespace; also the DNS-SRV form Istio uses as the mTLS SNI
(`outbound_.80_.v1_.webserver.default.svc.cluster.local`), which the server side logs as `requested_server_name`.
Grammar from istio `pilot/pkg/model/service.go` (BuildSubsetKey / BuildDNSSrvSubsetKey)."""

from __future__ import annotations

from dataclasses import dataclass

# Clusters every sidecar has that do not name a service.
SPECIAL = {
    "PassthroughCluster": "outbound",
    "BlackHoleCluster": "outbound",
    "AllowAnyDynamicDNSCluster": "outbound",
    "InboundPassthroughCluster": "inbound",
    "InboundPassthroughClusterIpv4": "inbound",
    "InboundPassthroughClusterIpv6": "inbound",
}


@dataclass(frozen=True, slots=True)
class ClusterName:
    raw: str
    direction: str  # "outbound" | "inbound" | "" (unknown)
    port: int | None = None
    subset: str = ""
    host: str = ""  # FQDN or ServiceEntry host; "" for `inbound|port||`
    service: str = ""  # k8s short name when host is <svc>.<ns>.svc.<domain>, else host
    namespace: str = ""  # only for k8s service FQDNs
    special: str = ""  # PassthroughCluster, BlackHoleCluster, … when the name is one of those

    @property
    def service_id(self) -> str:
        """`<service>.<namespace>` (Istio's tracing service name form), or the host when not a k8s service."""
        if self.namespace:
            return f"{self.service}.{self.namespace}"
        return self.host


def split_host(host: str) -> tuple[str, str]:
    """`reviews.default.svc.cluster.local` → (`reviews`, `default`); a non-k8s host → (host, "")."""
    parts = host.split(".")
    if len(parts) >= 4 and parts[2] == "svc" and parts[0] and parts[1]:
        return parts[0], parts[1]
    return host, ""


_cache: dict[str, ClusterName] = {}


def _port(text: str) -> int | None:
    if text.isdigit() and len(text) <= 5:
        p = int(text)
        return p if p <= 65535 else None
    return None


def _decode(name: str) -> ClusterName:
    if name in SPECIAL:
        return ClusterName(name, SPECIAL[name], special=name)
    parts = name.split("|")
    if len(parts) == 4 and parts[0] in ("outbound", "inbound"):
        direction, port, subset, host = parts
        svc, ns = split_host(host) if host else ("", "")
        return ClusterName(name, direction, _port(port), subset, host, svc, ns)
    return ClusterName(name, "")


def parse_cluster(name: str) -> ClusterName:
    """Never raises: a name outside the grammar decodes with direction "" (unknown) and keeps `raw`."""
    hit = _cache.get(name)
    if hit is None:
        hit = _decode(name)
        if len(_cache) < 8192:
            _cache[name] = hit
    return hit


def parse_sni(sni: str) -> ClusterName | None:
    """`outbound_.9080_.v1_.reviews.default.svc.cluster.local` → the cluster it names; None for other SNIs."""
    parts = sni.split("_.", 3)
    if len(parts) != 4 or parts[0] not in ("outbound", "inbound"):
        return None
    direction, port, subset, host = parts
    svc, ns = split_host(host)
    return ClusterName(sni, direction, _port(port), subset, host, svc, ns)
