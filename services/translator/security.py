"""The security policies of one config revision (AuthorizationPolicy, RequestAuthentication) and the inbound
filters they give a workload: `jwt_authn` then the RBAC filters on HTTP chains, RBAC network filters on TCP
chains (istiod's listener_builder order: authn before authz, both before the rest of the chain).

`index` runs once per push context; `inbound_filters` is memoised per (namespace, labels) in `push.cache`, so
replicas of a workload share the protos and a mesh without policies pays one dict lookup per proxy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import authn, authz
from .model import Config

AUTHORIZATION_POLICY = "AuthorizationPolicy"
REQUEST_AUTHENTICATION = "RequestAuthentication"


@dataclass
class SecurityIndex:
    authorization: dict[str, list[Config]] = field(default_factory=dict)  # namespace → creation order
    authentication: dict[str, list[Config]] = field(default_factory=dict)

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
            target.setdefault(c.namespace, []).append(c)
    return out


def _selected(push, namespace: str, labels: dict) -> tuple[list[Config], list[Config]]:
    sec: SecurityIndex = push.security
    root = push.mesh.root_namespace
    # RequestAuthentication attaches to workloads exactly as AuthorizationPolicy does (ShouldAttachPolicy).
    return (authz.select(sec.authorization, root, namespace, labels),
            authz.select(sec.authentication, root, namespace, labels))


def layer_key(push, proxy) -> tuple:
    """What the proxy's inbound side depends on here: the ids of the policies selecting it."""
    if not getattr(push, "security", None):
        return ()
    az, an = _selected(push, proxy.namespace, proxy.labels)
    return tuple(id(c) for c in az), tuple(id(c) for c in an)


def inbound_filters(push, proxy) -> tuple[list, list]:
    """(HTTP filters, network filters) to put first on the proxy's inbound chains (gateways: on its servers)."""
    if not getattr(push, "security", None):
        return [], []
    key = ("security", proxy.namespace, tuple(sorted(proxy.labels.items())), proxy.is_router)
    hit = push.cache.get(key)
    if hit is not None:
        return hit
    az, an = _selected(push, proxy.namespace, proxy.labels)
    http = []
    jwt = authn.jwt_filter(push, an, clear_route_cache=proxy.is_router)
    if jwt is not None:
        http.append(jwt)
    http += authz.http_rbac_filters(az)
    hit = push.cache[key] = (http, authz.tcp_rbac_filters(az))
    return hit
