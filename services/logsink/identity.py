"""Who wrote a log line: the `service.name` (and namespace, pod) of the sidecar's workload.

Sources, best first: the input's proxy identity (an Istio node id `sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`,
a plain `<name>.<namespace>`, or a kubelet log path `/var/log/pods/<ns>_<pod>_<uid>/…`); for a server-side line
the mTLS SNI (`outbound_.80_._.b.default.svc.cluster.local` names the service being called); the pod-IP map
learned from other lines (a client line's `upstream_host` is a pod of the service its cluster names); for a
client line, the server line of the same pod it was made for. Service names follow Istio's tracing default
(APP_LABEL_AND_NAMESPACE): `<name>.<namespace>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePath

_interned: dict[tuple[str, str, str], Identity] = {}
_K8S_ALNUM = "bcdfghjklmnpqrstvwxz2456789"  # the alphabet of ReplicaSet hashes and pod-name suffixes
_DEPLOY_POD = re.compile(rf"^(.+)-[{_K8S_ALNUM}]{{6,10}}-[{_K8S_ALNUM}]{{5}}$")
_SUFFIXED_POD = re.compile(rf"^(.+)-[{_K8S_ALNUM}]{{5}}$")
_ORDINAL_POD = re.compile(r"^(.+)-\d+$")


@dataclass(frozen=True, slots=True, eq=False)
class Identity:
    """Interned (make them with `Identity.of`): equal identities are the same object, so hashing and comparing
    them — done for every span when batching by resource — is the cheap default by-object one."""

    service: str
    namespace: str = ""
    pod: str = ""

    @staticmethod
    def of(service: str, namespace: str = "", pod: str = "") -> Identity:
        key = (service, namespace, pod)
        hit = _interned.get(key)
        if hit is None:
            if len(_interned) > 100_000:
                _interned.clear()
            hit = _interned[key] = Identity(service, namespace, pod)
        return hit

    def resource_attributes(self) -> list[tuple[str, str]]:
        attrs = [("service.name", self.service)]
        if self.namespace:
            attrs.append(("service.namespace", self.namespace))
            attrs.append(("k8s.namespace.name", self.namespace))
        if self.pod:
            attrs.append(("k8s.pod.name", self.pod))
            attrs.append(("service.instance.id", f"{self.pod}.{self.namespace}" if self.namespace else self.pod))
        return attrs


def workload_from_pod(pod: str) -> str:
    """`reviews-v1-545db77b95-2ps7q` → `reviews-v1` (Deployment), `web-0` → `web` (StatefulSet)."""
    for rx in (_DEPLOY_POD, _SUFFIXED_POD, _ORDINAL_POD):
        m = rx.match(pod)
        if m:
            return m.group(1)
    return pod


def identity_from_proxy(proxy: str) -> Identity | None:
    """An identity from what an input knows about the sidecar; None when it says nothing."""
    if not proxy:
        return None
    parts = proxy.split("~")
    if len(parts) == 4 and parts[0] in ("sidecar", "router", "waypoint"):
        pod_ns = parts[2]
        pod, _, ns = pod_ns.rpartition(".")
        if not pod:
            pod, ns = pod_ns, ""
        return Identity.of(f"{workload_from_pod(pod)}.{ns}" if ns else workload_from_pod(pod), ns, pod)
    if "/" in proxy:
        return identity_from_path(proxy)
    name, _, ns = proxy.partition(".")
    if ns and "." not in ns:
        return Identity.of(proxy, ns)
    return Identity.of(proxy)


def identity_from_path(path: str) -> Identity | None:
    """Kubelet log layouts: `/var/log/pods/<ns>_<pod>_<uid>/<container>/<n>.log` and
    `/var/log/containers/<pod>_<ns>_<container>-<id>.log`."""
    p = PurePath(path)
    for part in p.parts:
        bits = part.split("_")
        if len(bits) == 3 and len(bits[2]) >= 32 and "pods" in p.parts:
            ns, pod = bits[0], bits[1]
            return Identity.of(f"{workload_from_pod(pod)}.{ns}", ns, pod)
    if "containers" in p.parts:
        bits = p.name.split("_")
        if len(bits) == 3:
            pod, ns = bits[0], bits[1]
            return Identity.of(f"{workload_from_pod(pod)}.{ns}", ns, pod)
    return None


_san_cache: dict[str, Identity | None] = {}


def identity_from_san(san: str | None) -> Identity | None:
    """`spiffe://<td>/ns/<ns>/sa/<sa>` (the first of a comma-separated list) → `<sa>.<ns>`; None when it is not
    a workload SAN, or names the namespace's `default` service account (shared by unrelated workloads)."""
    if not san:
        return None
    hit = _san_cache.get(san)
    if hit is None and san not in _san_cache:
        first = san.split(",", 1)[0].strip()
        parts = first.split("/")
        # spiffe: / "" / td / ns / <ns> / sa / <sa>
        if len(parts) == 7 and parts[0] == "spiffe:" and parts[3] == "ns" and parts[5] == "sa" and parts[4] \
                and parts[6] and parts[6] != "default":
            hit = Identity.of(f"{parts[6]}.{parts[4]}", parts[4])
        if len(_san_cache) > 10000:
            _san_cache.clear()
        _san_cache[san] = hit
    return hit


def identity_from_fields(extra: dict) -> Identity | None:
    """Node metadata a log format may carry (`"node_id": "%ENVIRONMENT(…)%"`-style fields): an Istio node id,
    or a pod name with its namespace (and optionally its workload/canonical service name)."""
    node = extra.get("node_id")
    if node.__class__ is str and node.count("~") == 3:
        return identity_from_proxy(node)
    pod = extra.get("pod_name")
    if pod.__class__ is str and pod and pod != "-":
        ns = extra.get("pod_namespace") or extra.get("namespace")
        ns = ns if ns.__class__ is str and ns != "-" else ""
        wl = extra.get("workload") or extra.get("canonical_service") or extra.get("app")
        wl = wl if wl.__class__ is str and wl and wl != "-" else workload_from_pod(pod)
        return Identity.of(f"{wl}.{ns}" if ns else wl, ns, pod)
    return None


@dataclass(slots=True)
class Source:
    """Where lines come from: an input name (for metrics) and, when known, the sidecar that wrote them."""

    input: str
    proxy: str = ""
    identity: Identity | None = field(default=None)

    pod_key: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if self.identity is None and self.proxy:
            self.identity = identity_from_proxy(self.proxy)
        # Names the sidecar when the input knows which one wrote the lines (else "", and IPs decide).
        self.pod_key = self.proxy if self.identity is not None else ""


# Addresses that are the same on every pod and so say nothing about which pod wrote a line.
_SHARED_IPS = frozenset({"127.0.0.1", "127.0.0.6", "::1", "0.0.0.0", "::", "::6"})


class PeerMap:
    """pod IP → identity, learned from the lines themselves, with a bound (cleared when full: the entries are
    relearned from the next lines). Entries learned from a sidecar's own identity are strong and are not
    overwritten by guesses from other lines."""

    def __init__(self, capacity: int = 65536):
        self.capacity = capacity
        self._idents: dict[str, Identity] = {}
        self._strong: set[str] = set()  # ips whose identity came from their own sidecar
        # `get(ip)` → the identity learned for ip, or None (also for None and "", never learned): the dict's own
        # C method, since the join and the metrics ask several times per line.
        self.get = self._idents.get

    def learn(self, ip: str | None, ident: Identity, strong: bool) -> None:
        if not ip or ip in _SHARED_IPS:
            return
        old = self._idents.get(ip)
        if old is not None and (old is ident or (not strong and ip in self._strong)):
            return
        if len(self._idents) >= self.capacity:
            self._idents.clear()
            self._strong.clear()
        self._idents[ip] = ident
        if strong:
            self._strong.add(ip)
        else:
            self._strong.discard(ip)

    def __len__(self) -> int:
        return len(self._idents)


_unknowns: dict[str | None, Identity] = {}


def unknown(ip: str | None) -> Identity:
    """The OpenTelemetry fallback name, made distinct per pod so unknown callers stay apart in Jaeger."""
    hit = _unknowns.get(ip)
    if hit is None:
        if len(_unknowns) > 10000:
            _unknowns.clear()
        hit = _unknowns[ip] = Identity.of(f"unknown_service:{ip}" if ip else "unknown_service")
    return hit
