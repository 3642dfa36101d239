"""EDS: ClusterLoadAssignments for a proxy's EDS clusters (istiod's xds/endpoints, 1.7 shapes).

Endpoints do not depend on the proxy, only on the cluster (service port + subset labels), so each
assignment is built once per push and shared.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from .clusters import EdsNeed, _set_locality
from .push_context import PushContext

ClusterLoadAssignment = endpoint_pb2.ClusterLoadAssignment
TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"


_TLS_MODE_MD: dict[str, base_pb2.Metadata] = {}


def _tls_mode_metadata(mode: str) -> base_pb2.Metadata:
    md = _TLS_MODE_MD.get(mode)
    if md is None:
        md = base_pb2.Metadata()
        md.filter_metadata[TRANSPORT_SOCKET_MATCH].update({"tlsMode": mode})
        _TLS_MODE_MD[mode] = md
    return md


def _labels_key(labels: dict | None) -> tuple:
    return tuple(sorted(labels.items())) if labels else ()


def load_assignment(push: PushContext, need: EdsNeed) -> ClusterLoadAssignment:
    """Memoised per (cluster, service, subset labels): endpoints of the port whose labels ⊇ the subset's."""
    key = ("eds", need.cluster_name, id(need.service), _labels_key(need.labels))
    cla = push.cache.get(key)
    if cla is not None:
        return cla
    labels = need.labels
    cla = ClusterLoadAssignment(cluster_name=need.cluster_name)
    groups: dict[str, list] = {}
    for e in need.service.endpoints.get(need.port, ()):
        if labels and any(e.labels.get(k) != v for k, v in labels.items()):
            continue
        groups.setdefault(e.locality, []).append(e)
    for locality, eps in groups.items():
        lle = cla.endpoints.add()
        if locality:
            _set_locality(lle.locality, locality)
        total = 0
        for e in eps:
            lb = lle.lb_endpoints.add()
            sa = lb.endpoint.address.socket_address
            sa.address = e.address
            sa.port_value = e.port
            w = e.weight or 1
            lb.load_balancing_weight.value = w
            total += w
            # Auto mTLS picks the TLS transport socket for endpoints whose workload runs a sidecar.
            lb.metadata.CopyFrom(_tls_mode_metadata(e.tls_mode or "disabled"))
        lle.load_balancing_weight.value = total
    push.cache[key] = cla
    return cla


def load_assignments(push: PushContext, needs: list[EdsNeed]) -> dict[str, ClusterLoadAssignment]:
    return {n.cluster_name: load_assignment(push, n) for n in needs}
