"""EDS: ClusterLoadAssignments for a proxy's EDS clusters (istiod's xds/endpoints, 1.7 shapes).

Endpoints do not depend on the proxy, only on the cluster (service port + subset labels), so each
assignment is built once per push and shared.
"""

from __future__ import annotations

from envoy.config.endpoint.v3 import endpoint_pb2

from .assignment import build_assignment
from .clusters import EdsNeed
from .push_context import PushContext

ClusterLoadAssignment = endpoint_pb2.ClusterLoadAssignment


def _labels_key(labels: dict | None) -> tuple:
    return tuple(sorted(labels.items())) if labels else ()


def load_assignment(push: PushContext, need: EdsNeed) -> ClusterLoadAssignment:
    """Memoised per (cluster, service, subset labels): endpoints of the port whose labels ⊇ the subset's."""
    key = ("eds", need.cluster_name, id(need.service), _labels_key(need.labels))
    cla = push.cache.get(key)
    if cla is not None:
        return cla
    cla = build_assignment(need.cluster_name, need.service.endpoints.get(need.port, ()), need.labels,
                           tls_metadata=True, mtls_disabled=push.endpoint_mtls_disabled)
    push.cache[key] = cla
    return cla


def load_assignments(push: PushContext, needs: list[EdsNeed]) -> dict[str, ClusterLoadAssignment]:
    return {n.cluster_name: load_assignment(push, n) for n in needs}
