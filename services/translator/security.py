"""The security policies of one config revision (AuthorizationPolicy, RequestAuthentication) and the inbound
filters they give a workload: `jwt_authn` then the RBAC filters on HTTP chains, RBAC network filters on TCP
chains (istiod's listener_builder order: authn before authz, both before the rest of the chain).

`index` runs once per push context; `inbound_filters` is memoised per (namespace, labels) in `push.cache`, so
replicas of a workload share the protos and a mesh without policies pays one dict lookup per proxy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import authn, authz, extauthz
from .model import Config

AUTHORIZATION_POLICY = "AuthorizationPolicy"
REQUEST_AUTHENTICATION = "RequestAuthentication"


@dataclass
class _NamespacePolicies:
    """One namespace's configs of one kind: creation order, plus an index by the first selector label so a
    workload only tests the policies that could select it."""

    ordered: list[Config] = field(default_factory=list)
    unselective: list[int] = field(default_factory=list)  # positions of configs without matchLabels
    by_label: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def add(self, c: Config) -> None:
        pos = len(self.ordered)
        self.ordered.append(c)
        labels = (c.spec.get("selector") or {}).get("matchLabels") or {}
        if labels:
            k, v = next(iter(labels.items()))
            self.by_label.setdefault((k, str(v)), []).append(pos)
        else:
            self.unselective.append(pos)

    def candidates(self, labels: dict) -> list[Config]:
        positions = list(self.unselective)
        for k, v in labels.items():
            positions += self.by_label.get((k, str(v)), ())
        return [self.ordered[p] for p in sorted(positions)]


@dataclass
class SecurityIndex:
    authorization: dict[str, _NamespacePolicies] = field(default_factory=dict)  # namespace → policies
    authentication: dict[str, _NamespacePolicies] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.authorization or self.authentication)


def index(push, authz_objects: list[dict], authn_objects: list[dict]) -> SecurityIndex:
    """Index the (already creation-ordered) objects by namespace; a malformed one is reported and skipped."""
    out = SecurityIndex()
    for objs, target in ((authz_objects, out.authorization), (authn_objects, out.authentication)):
        for obj in objs:
            try:
                c = push._config(obj)
                c.annotations = dict(obj["metadata"].get("annotations") or {})
            except (ValueError, TypeError, AttributeError, KeyError) as e:
                push.report(push.describe(obj), e)
                continue
            target.setdefault(c.namespace, _NamespacePolicies()).add(c)
    return out


def select(by_ns: dict[str, _NamespacePolicies], root_ns: str, namespace: str, labels: dict) -> list[Config]:
    """The configs that apply to a workload: root namespace first, then its own (creation order within each)."""
    out = []
    for ns in dict.fromkeys((root_ns, namespace)):
        pols = by_ns.get(ns)
        if pols is not None:
            out += [c for c in pols.candidates(labels) if authz.attaches(c, namespace, labels)]
    return out


def _selected(push, namespace: str, labels: dict) -> tuple[list[Config], list[Config]]:
    key = ("security-selected", namespace, tuple(sorted(labels.items())))
    hit = push.cache.get(key)
    if hit is None:
        sec: SecurityIndex = push.security
        root = push.mesh.root_namespace
        # RequestAuthentication attaches to workloads exactly as AuthorizationPolicy does (ShouldAttachPolicy).
        hit = push.cache[key] = (select(sec.authorization, root, namespace, labels),
                                 select(sec.authentication, root, namespace, labels))
    return hit


def layer_key(push, proxy) -> tuple:
    """What the proxy's inbound side depends on here: the ids of the policies selecting it."""
    if not getattr(push, "security", None):
        return ()
    az, an = _selected(push, proxy.namespace, proxy.labels)
    return tuple(id(c) for c in az), tuple(id(c) for c in an)


def inbound_filters(push, proxy) -> tuple[list, list]:
    """(HTTP filters, network filters) to put first on the proxy's inbound chains (gateways: on its servers);
    workloads selected by the same policies share one set of protos."""
    if not getattr(push, "security", None):
        return [], []
    az, an = _selected(push, proxy.namespace, proxy.labels)
    if not az and not an:
        return [], []
    key = ("security", tuple(id(c) for c in az), tuple(id(c) for c in an), proxy.is_router)
    hit = push.cache.get(key)
    if hit is not None:
        return hit
    http = []
    jwt = authn.jwt_filter(push, an, clear_route_cache=proxy.is_router)
    if jwt is not None:
        http.append(jwt)
    # istiod's order: CUSTOM (shadow RBAC + ext_authz), then AUDIT, DENY, ALLOW
    http += extauthz.http_filters(push, az) + authz.http_rbac_filters(az)
    hit = push.cache[key] = (http, extauthz.tcp_filters(push, az) + authz.tcp_rbac_filters(az))
    return hit
