"""What a VirtualService or DestinationRule change reaches, so a `routing` build rebuilds only that.

A sidecar's outbound layer (snapshot.py) has three parts with different inputs once only VirtualServices and
DestinationRules changed (services, endpoints, pods, Sidecars, policies and mesh config are then the same):

* clusters  — the scope's services and the DestinationRule each of them resolves to from the namespace;
* listeners — each egress listener's services and the VirtualServices with `tcp`/`tls` routes it imports
  (HTTP routes live in RDS; listeners only name the route configuration);
* routes    — the services, every imported VirtualService, and the consistent-hash parts of the rules.

`outbound_inputs` condenses each part's inputs into comparable values (content, never object ids, so a value
from the previous push context compares with one from the new); a part whose value is unchanged is carried
over object for object, so its bytes, hashes and xDS versions stay the same and nothing is pushed for it.
The `sourceLabels` selectors the view key is made of go into every part: the same key means the same thing
only under the same selectors. Gateways (router views) are always rebuilt: their views hold object ids.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

from .model import Config, Service, service_id
from .push_context import ProxyView, PushContext

ROUTING_KINDS = frozenset({"VirtualService", "DestinationRule"})
# Memo entries whose keys name everything they depend on (content, never ids): valid in any push context with
# the same services and endpoints, so a routing build may take them from the previous one (see `unit`).
UNIT_TAGS = frozenset({"cds", "vs-routes", "default-route"})
PREVIOUS_UNITS = "previous-units"


@dataclass(frozen=True)
class OutboundInputs:
    clusters: tuple
    listeners: tuple
    routes: tuple


def _memo(push: PushContext, key: tuple, obj: object, make) -> tuple:
    hit = push.cache.get(key)
    if hit is None or hit[1] is not obj:  # keep obj alive with its id-keyed entry
        hit = push.cache[key] = (make(), obj)
    return hit[0]


def _vs_fp(push: PushContext, vs: Config) -> tuple:
    # repr keeps dict order: builders iterate specs in order, so a reordering is a change
    return _memo(push, ("fp-vs", id(vs)), vs, lambda: (vs.namespace, vs.name, tuple(vs.hosts), tuple(vs.gateways),
                                                       vs.export_to, repr(vs.spec)))


def _dr_fp(push: PushContext, dr: Config | None) -> tuple | None:
    if dr is None:
        return None
    return _memo(push, ("fp-dr", id(dr)), dr, lambda: (dr.namespace, dr.name, tuple(dr.hosts), dr.export_to,
                                                       repr(dr.spec)))


_NO_LB = (repr(None), repr([]))


def _lb(policy) -> tuple:
    """The parts of a traffic policy routes read (consistent hash, whole and per port)."""
    policy = policy if isinstance(policy, dict) else {}
    if policy.get("loadBalancer") is None and not policy.get("portLevelSettings"):
        return _NO_LB  # what the reprs below give then (most policies)
    return (repr(policy.get("loadBalancer")),
            repr([(p.get("port"), p.get("loadBalancer")) for p in policy.get("portLevelSettings") or []
                  if isinstance(p, dict)]))


def _dr_route_fp(push: PushContext, dr: Config | None) -> tuple | None:
    if dr is None:
        return None
    return _memo(push, ("fp-dr-route", id(dr)), dr, lambda: (
        _lb(dr.spec.get("trafficPolicy")),
        tuple((s.get("name"), _lb(s.get("trafficPolicy"))) for s in dr.spec.get("subsets") or []
              if isinstance(s, dict))))


def _services_fp(services: list[Service]) -> tuple:
    return tuple((service_id(s), tuple((p.name, p.port, p.protocol) for p in s.ports)) for s in services)


def outbound_inputs(push: PushContext, view: ProxyView) -> OutboundInputs:
    """The inputs of a sidecar view's outbound clusters, listeners and routes (memoised per view key)."""
    key = ("outbound-inputs", view.key)
    hit = push.cache.get(key)
    if hit is not None:
        return hit
    scope = view.scope
    selectors = repr(push._source_selectors(scope))
    services = _services_fp(scope.services)
    rules = [push.destination_rule(scope.namespace, s) for s in scope.services]
    # an egress listener importing everything holds a copy of the scope's list: its fingerprint is the same
    egress_services = tuple(services if e.services == scope.services else _services_fp(e.services)
                            for e in scope.egress)
    tcp_tls = tuple(tuple(_vs_fp(push, vs) for vs in e.virtual_services if vs.spec.get("tcp") or vs.spec.get("tls"))
                    for e in scope.egress)
    every_vs = tuple(tuple(_vs_fp(push, vs) for vs in e.virtual_services) for e in scope.egress)
    hit = push.cache[key] = OutboundInputs(
        clusters=(services, tuple(_dr_fp(push, dr) for dr in rules)),
        listeners=(selectors, egress_services, tcp_tls),
        routes=(selectors, services, egress_services, every_vs, tuple(_dr_route_fp(push, dr) for dr in rules)))
    return hit


class RouteEnv:
    """What a sidecar view's routes read besides the VirtualServices themselves, as a memo key part. Interned:
    equal contents share one instance (while a key holds it), so keys hash and compare by identity."""

    __slots__ = ("value", "__weakref__")

    def __init__(self, value: tuple):
        self.value = value


_ROUTE_ENVS: weakref.WeakValueDictionary[tuple, RouteEnv] = weakref.WeakValueDictionary()


def route_env(push: PushContext, view: ProxyView) -> RouteEnv:
    """A sidecar view's route environment (selectors, services, consistent-hash parts of the rules): part of the
    key of every route unit memoised for it, equal (the same object) in another push context with equal inputs."""
    key = ("route-env", view.key)
    hit = push.cache.get(key)
    if hit is None:
        r = outbound_inputs(push, view).routes
        env = (r[0], r[1], r[2], r[4])  # all but the VirtualServices
        hit = _ROUTE_ENVS.get(env)
        if hit is None:
            hit = _ROUTE_ENVS[env] = RouteEnv(env)
        push.cache[key] = hit
    return hit


def vs_key(push: PushContext, vs: Config) -> tuple:
    """A VirtualService by content, for memo keys."""
    return _vs_fp(push, vs)


def dr_key(push: PushContext, dr: Config | None) -> tuple | None:
    """A DestinationRule by content, for memo keys."""
    return _dr_fp(push, dr)


def unit(push: PushContext, key: tuple, make: Callable[[], object]) -> object:
    """push.cache[key], else the previous push context's entry under the same content key, else make()."""
    hit = push.cache.get(key)
    if hit is None:
        previous = push.cache.get(PREVIOUS_UNITS)
        hit = previous.get(key) if previous else None
        if hit is None:
            hit = make()
        push.cache[key] = hit
    return hit


class _ServiceRef:
    """Enough of a service for a DestinationRule lookup (its identity from a cache key)."""

    __slots__ = ("hostname", "namespace")

    def __init__(self, sid: tuple):
        self.namespace, self.hostname = sid[1], sid[3]


def _inbound_rules_same(old: PushContext, new: PushContext, namespace: str, sids) -> bool:
    """Inbound clusters read the DestinationRule of each served service from the proxy's namespace."""
    for sid in sids:
        ref = _ServiceRef(sid)
        if _dr_fp(old, old.destination_rule(namespace, ref)) != _dr_fp(new, new.destination_rule(namespace, ref)):
            return False
    return True


def routing_only_changes(old: PushContext, new: PushContext) -> bool:
    """Whether two push contexts can differ only in VirtualServices and DestinationRules (the caller knows which
    objects changed; this checks what those kinds can never reach agrees, as a guard)."""
    return (old.mesh == new.mesh and old.headless_ips == new.headless_ips
            and len(old.services) == len(new.services)
            and all(service_id(a) == service_id(b) for a, b in zip(old.services, new.services, strict=True)))


def carry_routing(old: PushContext, new: PushContext) -> None:
    """Seed `new` (built from inputs that differ from `old`'s only in VirtualServices and DestinationRules) with
    what `old` built that such a change cannot reach: every sidecar outbound layer with the inputs of its parts
    (snapshot.outbound_layers keeps the parts whose inputs are unchanged), every endpoint assignment (endpoints
    did not change; locality-dependent ones read DestinationRule settings and are rebuilt) and the inbound
    layers whose services' DestinationRules are unchanged."""
    # only the units the previous build used move on (unit() copies what it finds), so nothing piles up
    new.cache[PREVIOUS_UNITS] = {k: v for k, v in old.cache.items() if isinstance(k, tuple) and k[0] in UNIT_TAGS}
    for k, v in list(old.cache.items()):  # computing inputs memoises into old.cache
        if not isinstance(k, tuple):
            continue
        tag = k[0]
        if tag == "layers" and k[1][0] != "router":
            view = old.cache.get(("view", k[1]))
            if view is not None:
                new.cache[("routed", k[1])] = (v[0], v[2], outbound_inputs(old, view))
        elif (tag == "eds" or (tag == "eds-layer" and k[2] is None)
              or (tag == "own-layer" and k[1][0] != "router" and not any(k[4])
                  and _inbound_rules_same(old, new, k[1][1], {i[0] for i in k[5]}))):
            new.cache[k] = v
