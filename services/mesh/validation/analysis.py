"""Analysis warnings over the whole stored config, like `istioctl analyze`: valid objects that probably do not do
what was meant. They never reject an apply: the registry stores the objects and returns these as warnings.

`analyze(applied, stored)` is pure: `applied` are the objects of one apply (already valid), `stored` the config
the registry holds of the kinds `needed_kinds(applied)` names. It returns findings for the applied objects only,
each naming its field, so the registry can hang them on the document that carried the object.

Codes: Istio's where istioctl has the analyzer (IST0101, IST0109, IST0127; same template text), Mizzen's own
(MZN…) where it has none. Istio rates IST0101/IST0109 as errors in `istioctl analyze`, but its API server stores
such objects all the same; Mizzen reports every finding as a warning for the same reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from .. import settings
from ..errors import FieldError
from .schema import index

# Istio's analyzer message types (pkg/config/analysis/msg/messages.yaml) and Mizzen's own.
REFERENCED_RESOURCE_NOT_FOUND = ("IST0101", "ReferencedResourceNotFound")
CONFLICTING_MESH_GATEWAY_VS_HOSTS = ("IST0109", "ConflictingMeshGatewayVirtualServiceHosts")
NO_MATCHING_WORKLOADS = ("IST0127", "NoMatchingWorkloadsFound")
# Istio has no analyzer for these: ALLOW policies are OR'ed, so a second allow-all is harmless to Envoy, and
# istiod merges DestinationRules of one host silently; both usually mean a leftover that hides a mistake.
REDUNDANT_ALLOW_ALL = ("MZN0002", "RedundantAllowAllPolicy")
CONFLICTING_GATEWAY_VS_HOSTS = ("MZN0003", "ConflictingGatewayVirtualServiceHosts")
MERGED_DESTINATION_RULES = ("MZN0004", "MergedDestinationRules")

MESH_GATEWAY = "mesh"
Ident = tuple[str, str, str]  # kind, namespace, name


@dataclass
class Finding(FieldError):
    """A field error with an analyzer message type: `code` (IST0127) and `type_name` (NoMatchingWorkloadsFound)."""

    code: str = ""
    type_name: str = ""


def _finding(kind: tuple[str, str], path: str, message: str) -> Finding:
    return Finding(path, message, kind[0], kind[1])


def needed_kinds(applied: list[dict]) -> set[str]:
    """The stored kinds `analyze` reads for these applied objects (none when nothing is analysed)."""
    kinds = {o.get("kind") for o in applied}
    out: set[str] = set()
    if "AuthorizationPolicy" in kinds:
        out |= {"AuthorizationPolicy", "Pod", "WorkloadEntry", "Namespace", "Service"}
    if "VirtualService" in kinds:
        out.add("VirtualService")
    if "DestinationRule" in kinds:
        out.add("DestinationRule")
    return out


def ident(obj: dict) -> Ident:
    meta = obj.get("metadata") or {}
    return (obj.get("kind", ""), meta.get("namespace") or "", meta.get("name") or "")


def _ref(obj: dict) -> str:
    _, ns, name = ident(obj)
    return f"{ns}/{name}"


def analyze(applied: list[dict], stored: list[dict], root_namespace: str = settings.ROOT_NAMESPACE,
            now: str | None = None) -> dict[Ident, list[Finding]]:
    """Findings for each applied object (by kind, namespace, name), over the config as it will be after the apply."""
    now = now or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    old = {ident(o): o for o in stored}
    after: dict[Ident, dict] = dict(old)
    for o in applied:
        after[ident(o)] = _as_stored(o, old.get(ident(o)), now)
    cfg = _Config(after.values(), root_namespace)
    out: dict[Ident, list[Finding]] = {}
    for o in applied:
        key = ident(o)
        obj = after[key]
        found: list[Finding] = []
        if key[0] == "AuthorizationPolicy":
            found += _authz_workloads(obj, cfg)
            found += _authz_namespaces(obj, cfg)
            found += _authz_allow_all(obj, cfg)
        elif key[0] == "VirtualService":
            found += _vs_conflicts(obj, cfg)
        elif key[0] == "DestinationRule":
            found += _dr_merges(obj, cfg)
        if found:
            out[key] = found
    return out


class _Config:
    """The config after the apply, each kind in istiod's creation order, with the indexes the checks share (built
    on first use, once per apply: a bulk apply stays linear in the config's size)."""

    def __init__(self, objects: Iterable[dict], root: str):
        self.root = root
        self.by_kind: dict[str, list[dict]] = {}
        for o in objects:
            self.by_kind.setdefault(o.get("kind", ""), []).append(o)
        for objs in self.by_kind.values():
            objs.sort(key=_created)

    def of(self, kind: str) -> list[dict]:
        return self.by_kind.get(kind, [])

    @cached_property
    def workloads(self) -> dict[str, list[dict]]:
        """namespace → labels of every workload a policy can select: Pods, and WorkloadEntries (VMs run proxies
        too; Istio's analyzer looks at Pods only and so warns wrongly for a VM-only selector)."""
        out: dict[str, list[dict]] = {}
        for o in self.of("Pod"):
            meta = o.get("metadata") or {}
            out.setdefault(meta.get("namespace") or "", []).append(meta.get("labels") or {})
        for o in self.of("WorkloadEntry"):
            ns = (o.get("metadata") or {}).get("namespace") or ""
            out.setdefault(ns, []).append((o.get("spec") or {}).get("labels") or {})
        return out

    @cached_property
    def namespaces(self) -> set[str]:
        """Namespace objects, and the namespaces workloads and Services live in: Mizzen does not require a
        Namespace object before objects in it (Kubernetes does), so those count as existing too."""
        out = {(o.get("metadata") or {}).get("name") or "" for o in self.of("Namespace")}
        out |= {(o.get("metadata") or {}).get("namespace") or "" for o in self.of("Service")}
        out |= set(self.workloads)
        return out - {""}

    @cached_property
    def allow_all(self) -> list[dict]:
        return [o for o in self.of("AuthorizationPolicy") if _allows_all(o.get("spec") or {})]

    @cached_property
    def vs_bindings(self) -> dict[tuple[str, str], list[dict]]:
        """(gateway, fqdn host) → the VirtualServices binding it, oldest first."""
        out: dict[tuple[str, str], list[dict]] = {}
        for vs in self.of("VirtualService"):
            for binding in _vs_bindings(vs):
                out.setdefault(binding, []).append(vs)
        return out

    @cached_property
    def dr_hosts(self) -> dict[tuple[str, str], list[dict]]:
        """(namespace, fqdn host) → the DestinationRules without workloadSelector istiod merges, oldest first."""
        out: dict[tuple[str, str], list[dict]] = {}
        for d in self.of("DestinationRule"):
            spec, ns = d.get("spec") or {}, ident(d)[1]
            if not spec.get("workloadSelector"):
                out.setdefault((ns, _fqdn(spec.get("host") or "", ns)), []).append(d)
        return out


def _as_stored(obj: dict, old: dict | None, now: str) -> dict:
    """The creation time the store will give `obj`: an update keeps the old one, a new object gets `now`."""
    meta = dict(obj.get("metadata") or {})
    if old is not None:
        meta["creationTimestamp"] = (old.get("metadata") or {}).get("creationTimestamp", now)
    else:
        meta.setdefault("creationTimestamp", now)
    return {**obj, "metadata": meta}


def _created(obj: dict) -> tuple[str, str, str]:
    # istiod's order for conflicts: creation time, then name, then namespace
    meta = obj.get("metadata") or {}
    return (str(meta.get("creationTimestamp") or ""), meta.get("name") or "", meta.get("namespace") or "")


def _older(a: dict, b: dict) -> bool:
    return _created(a) < _created(b)


# ------------------------------------------------------------------------------------- AuthorizationPolicy
def _targets_gateway(spec: dict) -> bool:
    return bool(spec.get("targetRef") or spec.get("targetRefs"))


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _selector_text(selector: dict) -> str:
    # labels.SelectorFromSet(...).String(): sorted `k=v` joined by commas
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def _authz_workloads(obj: dict, cfg: _Config) -> list[Finding]:
    """IST0127 as Istio's AuthorizationPolicies analyzer: a selector no workload matches, or a namespace-wide
    policy in a namespace without workloads (a mesh-wide one, in the root namespace, is always in use)."""
    spec = obj.get("spec") or {}
    if _targets_gateway(spec):
        return []
    ns = ident(obj)[1]
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    template = "No matching workloads for this resource with the following labels: "
    if ns == cfg.root:
        if selector and not any(_selects(selector, labels) for ls in cfg.workloads.values() for labels in ls):
            return [_finding(NO_MATCHING_WORKLOADS, "spec.selector.matchLabels", template + _selector_text(selector))]
        return []
    if not selector:
        if not cfg.workloads.get(ns):
            return [_finding(NO_MATCHING_WORKLOADS, "metadata.namespace",
                             template + f"(none: no workload in namespace {ns!r})")]
        return []
    if not any(_selects(selector, labels) for labels in cfg.workloads.get(ns, [])):
        return [_finding(NO_MATCHING_WORKLOADS, "spec.selector.matchLabels",
                         template + _selector_text(selector) + f" (in namespace {ns!r})")]
    return []


def _namespace_matches(ns: str, pattern: str) -> bool:
    # Istio's analyzer: `*`, a `*suffix`, a `prefix*`, else an exact (case-insensitive) name
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return ns.endswith(pattern[1:])
    if pattern.endswith("*"):
        return ns.startswith(pattern[:-1])
    return ns.lower() == pattern.lower()


def _authz_namespaces(obj: dict, cfg: _Config) -> list[Finding]:
    """IST0101 for each `from.source.namespaces` / `notNamespaces` entry that names no namespace."""
    known = cfg.namespaces
    out = []
    for i, rule in enumerate((obj.get("spec") or {}).get("rules") or []):
        for j, frm in enumerate(rule.get("from") or []):
            source = frm.get("source") or {}
            for field in ("namespaces", "notNamespaces"):
                for k, pattern in enumerate(source.get(field) or []):
                    if not any(_namespace_matches(ns, pattern) for ns in known):
                        path = f"{index(index('spec.rules', i) + '.from', j)}.source.{index(field, k)}"
                        out.append(_finding(REFERENCED_RESOURCE_NOT_FOUND, path,
                                            f'Referenced namespace not found: "{pattern}"'))
    return out


def _allows_all(spec: dict) -> bool:
    """An ALLOW policy with an empty rule: every request matches it."""
    return (spec.get("action") or "ALLOW") == "ALLOW" and not _targets_gateway(spec) and \
        not spec.get("provider") and any(not r for r in spec.get("rules") or [])


def _scope(obj: dict, root: str) -> tuple[str, dict]:
    ns = ident(obj)[1]
    return ("*" if ns == root else ns, (obj.get("spec") or {}).get("selector", {}).get("matchLabels") or {})


def _overlap(a: dict, b: dict, cfg: _Config) -> list[str] | None:
    """Whether two policies apply to a common workload: None if not, else the shared workloads' labels (an empty
    list when both have the same scope and no workload exists yet)."""
    (ans, asel), (bns, bsel) = _scope(a, cfg.root), _scope(b, cfg.root)
    if "*" not in (ans, bns) and ans != bns:
        return None
    where = [ans] if ans != "*" else [bns] if bns != "*" else list(cfg.workloads)
    shared = [_selector_text(labels) or "{}" for ns in where for labels in cfg.workloads.get(ns, [])
              if _selects(asel, labels) and _selects(bsel, labels)]
    if shared:
        return shared
    return [] if (ans, asel) == (bns, bsel) else None


def _authz_allow_all(obj: dict, cfg: _Config) -> list[Finding]:
    """MZN0002: a second ALLOW-all policy for the same workloads adds nothing (ALLOW policies are OR'ed)."""
    spec = obj.get("spec") or {}
    if not _allows_all(spec):
        return []
    out = []
    rule = next(i for i, r in enumerate(spec.get("rules") or []) if not r)
    for other in cfg.allow_all:
        if ident(other) == ident(obj):
            continue
        shared = _overlap(obj, other, cfg)
        if shared is None:
            continue
        where = f"workloads {{{'; '.join(sorted(set(shared))[:3])}}}" if shared else "the same workloads"
        out.append(_finding(REDUNDANT_ALLOW_ALL, index("spec.rules", rule),
                            f"a second ALLOW-all policy: AuthorizationPolicy {_ref(other)} already allows every "
                            f"request to {where}; this empty rule adds nothing"))
    return out


# ------------------------------------------------------------------------------------------ VirtualService
def _fqdn(host: str, namespace: str) -> str:
    # Istio's ResolveShortnameToFQDN (the translator's model.resolve_short_name; validation cannot import it)
    if not host or "." in host or host == "*" or ":" in host:
        return host
    return f"{host}.{namespace}.svc.{settings.DOMAIN_SUFFIX}"


def _gateway_name(name: str, namespace: str) -> str:
    if name == MESH_GATEWAY or "/" in name:
        return name if not name.startswith("./") else f"{namespace}/{name[2:]}"
    return f"{namespace}/{name}"


def _export_scopes(spec: dict, namespace: str) -> set[str]:
    export = spec.get("exportTo") or []
    if not export or "*" in export:
        return {"*"}
    return {namespace if e == "." else e for e in export}


def _vs_bindings(vs: dict) -> dict[tuple[str, str], int]:
    """(gateway, fqdn host) → index in spec.hosts, for every gateway the VirtualService binds (none: mesh)."""
    spec, ns = vs.get("spec") or {}, ident(vs)[1]
    gateways = [_gateway_name(g, ns) for g in spec.get("gateways") or [MESH_GATEWAY]]
    out: dict[tuple[str, str], int] = {}
    for i, h in enumerate(spec.get("hosts") or []):
        for g in gateways:
            out.setdefault((g, _fqdn(h, ns)), i)
    return out


def _vs_conflicts(obj: dict, cfg: _Config) -> list[Finding]:
    """Two VirtualServices with the same host on the mesh gateway: istiod builds the host's routes from the
    oldest (creation time, then name) and ignores the other (IST0109). On a named gateway istiod merges their
    routes instead, the oldest's first (MZN0003: order-dependent, so still worth a warning)."""
    if (obj.get("spec") or {}).get("delegate") or not (obj.get("spec") or {}).get("hosts"):
        return []
    scopes = _export_scopes(obj.get("spec") or {}, ident(obj)[1])
    out = []
    for (gw, host), i in _vs_bindings(obj).items():
        for other in cfg.vs_bindings.get((gw, host), []):
            if ident(other) == ident(obj):
                continue
            other_scopes = _export_scopes(other.get("spec") or {}, ident(other)[1])
            if not ("*" in scopes or "*" in other_scopes or scopes & other_scopes):
                continue  # exported to disjoint namespaces: no proxy sees both
            older, newer = (obj, other) if _older(obj, other) else (other, obj)
            names = ",".join(sorted(f"{_ref(v)}" for v in (obj, other)))
            if gw == MESH_GATEWAY:
                text = (f"The VirtualServices {names} associated with mesh gateway define the same host {host} which "
                        "can lead to undefined behavior. This can be fixed by merging the conflicting VirtualServices "
                        f"into a single resource. The oldest, {_ref(older)}, serves the host; {_ref(newer)}'s routes "
                        "for it are ignored.")
                out.append(_finding(CONFLICTING_MESH_GATEWAY_VS_HOSTS, index("spec.hosts", i), text))
            else:
                text = (f"VirtualServices {names} both bind host {host} to gateway {gw}: their routes are merged, "
                        f"{_ref(older)}'s (the oldest) first, so a route of {_ref(newer)} matching the same "
                        "requests is never used.")
                out.append(_finding(CONFLICTING_GATEWAY_VS_HOSTS, index("spec.hosts", i), text))
    return out


# ----------------------------------------------------------------------------------------- DestinationRule
def _dr_merges(obj: dict, cfg: _Config) -> list[Finding]:
    """Two DestinationRules for one host in one namespace (without workload selectors) are merged by istiod,
    oldest first: the first top-level trafficPolicy wins, later subsets are added unless the name is taken."""
    spec, ns = obj.get("spec") or {}, ident(obj)[1]
    if spec.get("workloadSelector"):
        return []
    host = _fqdn(spec.get("host") or "", ns)
    same = cfg.dr_hosts.get((ns, host), [])
    if len(same) < 2:
        return []
    others = ", ".join(_ref(d) for d in same if ident(d) != ident(obj))
    out = [_finding(MERGED_DESTINATION_RULES, "spec.host",
                    f"DestinationRules {', '.join(_ref(d) for d in same)} (oldest first) all set host {host}: they "
                    f"are merged into one (also defined by {others})")]
    me = next(k for k, d in enumerate(same) if ident(d) == ident(obj))
    earlier = same[:me]
    if spec.get("trafficPolicy") is not None:
        owner = next((d for d in earlier if (d.get("spec") or {}).get("trafficPolicy") is not None), None)
        if owner is not None:
            out.append(_finding(MERGED_DESTINATION_RULES, "spec.trafficPolicy",
                                f"ignored: the older DestinationRule {_ref(owner)} for host {host} sets trafficPolicy"))
    for k, s in enumerate(spec.get("subsets") or []):
        owner = next((d for d in earlier if any(x.get("name") == s.get("name")
                                                for x in (d.get("spec") or {}).get("subsets") or [])), None)
        if owner is not None:
            out.append(_finding(MERGED_DESTINATION_RULES, index("spec.subsets", k),
                                f"ignored: subset {s.get('name')!r} of host {host} is already defined by the older "
                                f"DestinationRule {_ref(owner)}"))
    return out
