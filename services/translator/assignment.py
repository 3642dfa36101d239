"""One ClusterLoadAssignment builder for both places endpoints appear: EDS responses (endpoints.py) and the
inline `load_assignment` of DNS clusters (clusters.py). Endpoints are grouped by locality, each weighted."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import wrappers_pb2

TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"
_WEIGHT_1 = wrappers_pb2.UInt32Value(value=1)

_TLS_MODE_MD: dict[str, base_pb2.Metadata] = {}


def tls_mode_metadata(mode: str) -> base_pb2.Metadata:
    md = _TLS_MODE_MD.get(mode)
    if md is None:
        md = base_pb2.Metadata()
        md.filter_metadata[TRANSPORT_SOCKET_MATCH].update({"tlsMode": mode})
        _TLS_MODE_MD[mode] = md
    return md


def set_locality(loc: base_pb2.Locality, label: str) -> None:
    """`region/zone/subzone` → Locality."""
    parts = label.split("/")
    loc.region = parts[0]
    if len(parts) > 1:
        loc.zone = parts[1]
    if len(parts) > 2:
        loc.sub_zone = parts[2]


_LOCALITIES: dict[str, base_pb2.Locality] = {}


def _locality(label: str) -> base_pb2.Locality:
    """A Locality per label, built once (callers pass it as a keyword argument, which copies it)."""
    loc = _LOCALITIES.get(label)
    if loc is None:
        if len(_LOCALITIES) > 10_000:
            _LOCALITIES.clear()
        loc = _LOCALITIES[label] = base_pb2.Locality()
        set_locality(loc, label)
    return loc


def build_assignment(name: str, endpoints: Iterable, labels: dict | None,
                     tls_metadata: bool,
                     mtls_disabled: Callable[[Any], bool] | None = None,
                     priority: Callable[[Any], int] | None = None) -> endpoint_pb2.ClusterLoadAssignment:
    """The endpoints whose labels ⊇ `labels`, grouped by locality. With `tls_metadata`, each endpoint says
    whether its workload takes mTLS (auto mTLS picks the TLS transport socket by it): it runs a sidecar, and
    `mtls_disabled(endpoint)` (its PeerAuthentication says DISABLE for that workload and port, Istio's EDS
    mtlsChecker) is false. With `priority`, a locality's endpoints are split further by their priority
    (failoverPriority, endpoints.py)."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    groups: dict[tuple[str, int], list] = {}
    for e in endpoints:
        if labels and any(e.labels.get(k) != v for k, v in labels.items()):
            continue
        groups.setdefault((e.locality, priority(e) if priority else 0), []).append(e)
    for (locality, prio), eps in groups.items():
        lle = cla.endpoints.add(locality=_locality(locality)) if locality else cla.endpoints.add()
        if prio:
            lle.priority = prio
        total = 0
        add = lle.lb_endpoints.add
        for e in eps:
            w = e.weight or 1
            total += w
            # Message-valued keyword arguments are copied in C: cheaper than setting each field from Python.
            weight = _WEIGHT_1 if w == 1 else wrappers_pb2.UInt32Value(value=w)
            if tls_metadata:
                mode = e.tls_mode or "disabled"
                if mode == "istio" and mtls_disabled is not None and mtls_disabled(e):
                    mode = "disabled"
                lb = add(load_balancing_weight=weight, metadata=tls_mode_metadata(mode))
            else:
                lb = add(load_balancing_weight=weight)
            sa = lb.endpoint.address.socket_address
            sa.address = e.address
            sa.port_value = e.port
        lle.load_balancing_weight.value = total
    return cla
