"""EDS: ClusterLoadAssignments for a proxy's EDS clusters (istiod's xds/endpoints, 1.7 shapes).

Endpoints depend on the cluster (service port + subset labels), and — when locality load balancing applies to
the cluster (`EdsNeed.locality_lb`) — on the proxy's locality: istiod's loadbalancer.go gives each locality
a priority relative to the proxy (failover, failoverPriority) or rewrites the locality weights (distribute).
So each assignment is built once per push and cluster, and once more per distinct proxy locality that needs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from envoy.config.endpoint.v3 import endpoint_pb2

from mizzen.services.mesh import locality as loc

from .assignment import build_assignment
from .clusters import EdsNeed
from .push_context import PushContext

ClusterLoadAssignment = endpoint_pb2.ClusterLoadAssignment
MtlsCheck = Callable[[Any], bool] | None


def _base(push: PushContext, need: EdsNeed, mtls_disabled: MtlsCheck) -> ClusterLoadAssignment:
    key = ("eds", *need.key)  # ("eds", cluster, service_id, labels key): carry_over reads the service id
    cla = push.cache.get(key)
    if cla is None:
        cla = build_assignment(need.cluster_name, need.service.endpoints.get(need.port, ()), need.labels,
                               tls_metadata=True, mtls_disabled=mtls_disabled)
        push.cache[key] = cla
    return cla


def proxy_labels(proxy) -> dict[str, str]:
    """The proxy's labels as failoverPriority sees them: its own, plus the topology labels of its locality."""
    return {**proxy.labels, **loc.as_labels(proxy.locality)}


def failover_keys(needs: list[EdsNeed]) -> tuple[str, ...]:
    """Every label failoverPriority names in these needs' settings."""
    return tuple(sorted({k for n in needs if n.locality_lb for k in n.locality_lb.get("failoverPriority") or ()}))


def locality_signature(keys: tuple[str, ...], proxy) -> tuple | None:
    """What of the proxy locality-dependent assignments depend on: its locality and the failoverPriority labels
    (None without a locality: then they are the shared ones)."""
    if proxy is None or not proxy.locality:
        return None
    if not keys:
        return (proxy.locality, ())
    labels = proxy_labels(proxy)
    return (proxy.locality, tuple(labels.get(k) for k in keys))


def load_assignment(push: PushContext, need: EdsNeed, proxy, mtls_disabled: MtlsCheck) -> ClusterLoadAssignment:
    """Memoised per (cluster, service, subset labels[, proxy locality]): endpoints of the port whose labels ⊇
    the subset's, with locality priorities/weights for `proxy` when the cluster's locality setting applies.
    `mtls_disabled` is push.endpoint_mtls_check(), asked once for all of a proxy's assignments."""
    base = _base(push, need, mtls_disabled)
    setting = need.locality_lb
    if setting is None or proxy is None or not proxy.locality:
        return base
    prios = list(setting.get("failoverPriority") or ())
    labels = proxy_labels(proxy)
    key = ("eds-loc", *need.key, proxy.locality,
           tuple(labels.get(k) for k in prios))
    cla = push.cache.get(key)
    if cla is not None:
        return cla
    here = proxy.locality_parts
    if setting.get("distribute"):
        cla = ClusterLoadAssignment()
        cla.CopyFrom(base)
        apply_distribute(cla, here, setting["distribute"])
    elif prios:
        cla = build_assignment(need.cluster_name, need.service.endpoints.get(need.port, ()), need.labels,
                               tls_metadata=True, mtls_disabled=mtls_disabled,
                               priority=lambda e: failover_priority(e, labels, prios))
        normalise_priorities(cla)
    else:
        cla = ClusterLoadAssignment()
        cla.CopyFrom(base)
        apply_failover(cla, here, setting.get("failover") or ())
    push.cache[key] = cla
    return cla


def load_assignments(push: PushContext, needs: list[EdsNeed], proxy=None) -> dict[str, ClusterLoadAssignment]:
    mtls_disabled = push.endpoint_mtls_check()
    return {n.cluster_name: load_assignment(push, n, proxy, mtls_disabled) for n in needs}


# ---------------------------------------------------------------------------------------------- istiod's rules
def _parts(lle: endpoint_pb2.LocalityLbEndpoints) -> tuple[str, str, str]:
    return lle.locality.region, lle.locality.zone, lle.locality.sub_zone


def normalise_priorities(cla: ClusterLoadAssignment) -> None:
    """Envoy wants priorities 0..N without gaps: renumber the distinct ones in order."""
    order = {p: i for i, p in enumerate(sorted({lle.priority for lle in cla.endpoints}))}
    for lle in cla.endpoints:
        lle.priority = order[lle.priority]


def apply_failover(cla: ClusterLoadAssignment, here: tuple[str, str, str], failover) -> None:
    """istiod's applyLocalityFailover: priority 0 same subzone, 1 same zone, 2 same region, 3 elsewhere —
    4 for another region when a `failover` rule from the proxy's region names a different `to` region."""
    for lle in cla.endpoints:
        there = _parts(lle)
        prio = loc.lb_priority(here, there)
        if prio == 3:
            for rule in failover:
                if rule.get("from") == here[0]:
                    if there[0] != rule.get("to"):
                        prio = 4
                    break
        lle.priority = prio
    normalise_priorities(cla)


def failover_priority(endpoint, proxy_labels: dict[str, str], keys: list[str]) -> int:
    """istiod's failoverPriority: 0 when the endpoint matches the proxy on every listed label, else
    len(keys) - i for the first label i that differs (the earlier the mismatch, the lower the priority)."""
    labels = {**endpoint.labels, **loc.as_labels(endpoint.locality)}
    for i, key in enumerate(keys):
        if proxy_labels.get(key) != labels.get(key):
            return len(keys) - i
    return 0


def apply_distribute(cla: ClusterLoadAssignment, here: tuple[str, str, str], rules) -> None:
    """istiod's applyLocalityWeights: the first rule whose `from` matches the proxy sets each `to` locality's
    share (split over the localities a wildcard matches by their endpoint weights); localities no `to` names
    get no traffic."""
    for rule in rules:
        if not loc.matches(here, rule.get("from") or ""):
            continue
        unmatched = set(range(len(cla.endpoints)))
        for target, weight in (rule.get("to") or {}).items():
            picked: dict[int, int] = {}
            for i in sorted(unmatched):
                lle = cla.endpoints[i]
                if loc.matches(_parts(lle), target):
                    picked[i] = lle.load_balancing_weight.value or 1
            unmatched -= set(picked)
            total = sum(picked.values())
            for i, original in picked.items():
                share = original * int(weight) / total
                if share > 0:
                    cla.endpoints[i].load_balancing_weight.value = math.ceil(share)
        for i in unmatched:
            del cla.endpoints[i].lb_endpoints[:]
        return
