"""AuthorizationPolicy → Envoy RBAC filters, as istiod's pilot/pkg/security/authz (builder, model, matcher).

One RBAC filter per action, in Istio's order: AUDIT (action LOG), DENY, ALLOW (CUSTOM comes before them all:
extauthz.py, a shadow RBAC filter plus ext_authz). Each policy rule becomes one RBAC policy named
`ns[<namespace>]-policy[<name>]-rule[<index>]`, so Envoy's `response_code_details` reads
`rbac_access_denied_matched_policy[ns[…]-policy[…]-rule[…]]` exactly as under istiod. A policy with no rules is a
policy that never matches (an ALLOW with no rules denies everything). `istio.io/dry-run: "true"` policies become
shadow rules (stat prefix `istio_dry_run_allow_` / `istio_dry_run_deny_`).

A rule is `from` × `to` × `when`: each `from` entry is one principal (an AND of its fields, OR within a field),
each `to` entry one permission, and every `when` condition is ANDed into all of them. Fields that only exist for
HTTP (methods, paths, hosts, requestPrincipals, request.headers, request.auth.*) cannot be checked on a TCP chain:
an ALLOW rule using one is dropped there (it allows less), a DENY or AUDIT rule just loses that field (it denies
more), as istiod does. Source identities use Envoy's `authenticated` principal (the peer certificate's URI SAN),
which is what a stock Envoy offers (istiod's sidecars use the same matcher).

Pure functions over the push context: nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import re

from envoy.config.core.v3 import address_pb2, extension_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2
from envoy.type.matcher.v3 import metadata_pb2, path_pb2, regex_pb2, string_pb2, value_pb2

from . import pb

HTTP_RBAC = "envoy.filters.http.rbac"
NETWORK_RBAC = "envoy.filters.network.rbac"
JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD = "payload"
TCP_STAT_PREFIX = "tcp."
SHADOW_ALLOW_PREFIX = "istio_dry_run_allow_"
SHADOW_DENY_PREFIX = "istio_dry_run_deny_"
DRY_RUN_ANNOTATION = "istio.io/dry-run"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
SPIFFE_PREFIX = "spiffe://"

_ACTIONS = {"AUDIT": rbac_pb2.RBAC.LOG, "DENY": rbac_pb2.RBAC.DENY, "ALLOW": rbac_pb2.RBAC.ALLOW}


class HttpOnly(ValueError):
    """A field that needs HTTP, met while building for a TCP chain."""


# ------------------------------------------------------------------------------------------ string matchers
def _exact(v: str, ignore_case: bool = False) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(exact=v, ignore_case=ignore_case)


def _prefix(v: str, ignore_case: bool = False) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(prefix=v, ignore_case=ignore_case)


def _suffix(v: str, ignore_case: bool = False) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(suffix=v, ignore_case=ignore_case)


def _regex(r: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=r))


def _go_quote_meta(s: str) -> str:
    """Go's regexp.QuoteMeta (escapes the same characters as RE2 needs)."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", s)


def string_matcher(v: str, prefix: str = "") -> string_pb2.StringMatcher:
    """Istio's StringMatcherWithPrefix: `*` any non-empty, `*x` suffix, `x*` prefix, else exact."""
    if v == "*":
        return _regex(".+")
    if v.startswith("*"):
        return _suffix(v[1:]) if not prefix else _regex(prefix + ".*" + _go_quote_meta(v[1:]))
    if v.endswith("*"):
        return _prefix(prefix + v[:-1])
    return _exact(prefix + v)


def header_matcher(name: str, v: str, ignore_case: bool = False) -> rc.HeaderMatcher:
    if v == "*":
        return rc.HeaderMatcher(name=name, present_match=True)
    if v.startswith("*"):
        return rc.HeaderMatcher(name=name, string_match=_suffix(v[1:], ignore_case))
    if v.endswith("*"):
        return rc.HeaderMatcher(name=name, string_match=_prefix(v[:-1], ignore_case))
    return rc.HeaderMatcher(name=name, string_match=_exact(v, ignore_case))


def _cidr(value: str) -> address_pb2.CidrRange:
    """util.AddrStrToCidrRange: an address is a /32 (/128)."""
    net = ipaddress.ip_network(value, strict=False)
    addr = value.split("/", 1)[0]
    return address_pb2.CidrRange(address_prefix=addr, prefix_len=pb.u32(net.prefixlen))


def _or_values(values: list[str]) -> value_pb2.ValueMatcher:
    ms = [value_pb2.ValueMatcher(string_match=string_matcher(v)) for v in values]
    return ms[0] if len(ms) == 1 else value_pb2.ValueMatcher(or_match=value_pb2.OrMatcher(value_matchers=ms))


def _jwt_claim(claims: list[str], value: value_pb2.ValueMatcher) -> metadata_pb2.MetadataMatcher:
    """A JWT claim in jwt_authn's payload metadata; a list claim matches when one element does (Istio's
    extended JWT matcher: `or(list one_of value, value)`)."""
    m = metadata_pb2.MetadataMatcher(filter=JWT_FILTER)
    for k in [JWT_PAYLOAD, *claims]:
        m.path.add(key=k)
    lst = value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(one_of=value))
    m.value.or_match.value_matchers.extend([lst, value])
    return m


def _jwt_string_claim(claim: str, sm: string_pb2.StringMatcher) -> metadata_pb2.MetadataMatcher:
    m = metadata_pb2.MetadataMatcher(filter=JWT_FILTER)
    m.path.add(key=JWT_PAYLOAD)
    m.path.add(key=claim)
    m.value.string_match.CopyFrom(sm)
    return m


def _claim_names(key: str) -> list[str]:
    """`request.auth.claims[a][b]` → [a, b]; `[a.b]` stays one name (extractNameInNestedBrackets)."""
    rest = key[len("request.auth.claims"):]
    names = re.findall(r"\[([^\[\]]*)\]", rest)
    if names and "".join(f"[{n}]" for n in names) == rest:
        return names
    if rest.startswith("[") and rest.endswith("]"):
        return [rest[1:-1]]
    raise ValueError(f"expecting format [<NAME>], but found {rest}")


def _header_name(key: str) -> str:
    rest = key[len("request.headers"):]
    if not (rest.startswith("[") and rest.endswith("]")):
        raise ValueError(f"expecting format [<NAME>], but found {rest}")
    return rest[1:-1]


# ------------------------------------------------------------------------------------------ generators
def _authenticated(sm: string_pb2.StringMatcher) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(principal_name=sm))


def _principal_one(key: str, value: str, tcp: bool, policy_ns: str) -> rbac_pb2.Principal:
    """One value of a principal-side (source) attribute."""
    if key == "source.ip":
        return rbac_pb2.Principal(direct_remote_ip=_cidr(value))
    if key == "remote.ip":
        return rbac_pb2.Principal(remote_ip=_cidr(value))
    if key == "source.namespace":
        ns = ".*".join(_go_quote_meta(p) for p in value.split("*"))
        return _authenticated(_regex(f".*/ns/{ns}/.*"))
    if key == "source.serviceAccount":
        ns, slash, sa = value.partition("/")
        if not slash:
            ns, sa = policy_ns, value
        return _authenticated(_regex(f"spiffe://.+/ns/{_go_quote_meta(ns)}/(.+/|)sa/{_go_quote_meta(sa)}(/.+)?"))
    if key == "source.trustDomain":
        if value == "*":
            sm = _prefix(SPIFFE_PREFIX)
        elif "*" not in value:
            sm = _prefix(f"{SPIFFE_PREFIX}{value}/")
        else:
            a, _, b = value.partition("*")
            sm = _regex(f"spiffe://{_go_quote_meta(a)}[^/]*{_go_quote_meta(b)}/.*")
        return _authenticated(sm)
    if key == "source.principal":
        return _authenticated(string_matcher(value, SPIFFE_PREFIX))
    if key.startswith("request.headers"):
        if tcp:
            raise HttpOnly(key)
        return rbac_pb2.Principal(header=header_matcher(_header_name(key), value))
    raise ValueError(f"unknown attribute {key}")


def _request_principals(values: list[str]) -> rbac_pb2.Principal:
    """`iss/sub` with `*` forms, split at the last `/` (an issuer may be a URL)."""
    any_ = _regex(".+")
    out = []
    for v in values:
        idx = v.rfind("/")
        found = idx >= 0
        iss, sub = (v[:idx], v[idx + 1:]) if found else (v, "")
        if v == "*":
            mi, ms = any_, any_
        elif v.startswith("*"):
            if found:
                mi = any_ if iss == "*" else _suffix(iss[1:])
                ms = _exact(sub)
            else:
                mi, ms = any_, _suffix(v[1:])
        elif v.endswith("*"):
            if found:
                mi = _exact(iss)
                ms = any_ if sub == "*" else _prefix(sub[:-1])
            else:
                mi, ms = _prefix(v[:-1]), any_
        else:
            mi, ms = _exact(iss), _exact(sub)
        p = rbac_pb2.Principal()
        p.and_ids.ids.add(metadata=_jwt_string_claim("iss", mi))
        p.and_ids.ids.add(metadata=_jwt_string_claim("sub", ms))
        out.append(p)
    if len(out) == 1:
        return out[0]
    p = rbac_pb2.Principal()
    p.or_ids.ids.extend(out)
    return p


def _principal_extended(key: str, values: list[str], tcp: bool) -> rbac_pb2.Principal:
    """Attributes matched as a whole list (JWT-based: always HTTP only)."""
    if tcp:
        raise HttpOnly(key)
    if key == "request.auth.principal":
        return _request_principals(values)
    if key == "request.auth.audiences":
        return rbac_pb2.Principal(metadata=_jwt_claim(["aud"], _or_values(values)))
    if key == "request.auth.presenter":
        return rbac_pb2.Principal(metadata=_jwt_claim(["azp"], _or_values(values)))
    if key.startswith("request.auth.claims"):
        return rbac_pb2.Principal(metadata=_jwt_claim(_claim_names(key), _or_values(values)))
    raise ValueError(f"unknown attribute {key}")


def _permission_one(key: str, value: str, tcp: bool) -> rbac_pb2.Permission:
    if key == "destination.ip":
        return rbac_pb2.Permission(destination_ip=_cidr(value))
    if key == "destination.port":
        port = int(value)
        if not 0 <= port <= 65535:
            raise ValueError(f"invalid port {value}")
        return rbac_pb2.Permission(destination_port=port)
    if key == "connection.sni":
        return rbac_pb2.Permission(requested_server_name=string_matcher(value))
    if key == ":authority":
        if tcp:
            raise HttpOnly("hosts")
        return rbac_pb2.Permission(header=header_matcher(":authority", value, ignore_case=True))
    if key == ":method":
        if tcp:
            raise HttpOnly("methods")
        return rbac_pb2.Permission(header=header_matcher(":method", value))
    if key == "path":
        if tcp:
            raise HttpOnly("paths")
        if "{*}" in value or "{**}" in value:
            tmpl = uri_template_match_pb2.UriTemplateMatchConfig(
                path_template=value.replace("{**}", "**").replace("{*}", "*"))
            return rbac_pb2.Permission(uri_template=extension_pb2.TypedExtensionConfig(
                name="uri-template", typed_config=pb.pack(tmpl)))
        return rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=string_matcher(value)))
    raise ValueError(f"unknown attribute {key}")


def _envoy_filter_permission(key: str, values: list[str]) -> rbac_pb2.Permission:
    """`experimental.envoy.filters.a.b[c]`: dynamic metadata `c` of filter `envoy.filters.a.b`; `[v]` matches a
    list element (envoyFilterGenerator.extendedPermission)."""
    filt, _, rest = key[len("experimental."):].partition("[")
    ms = []
    for v in values:
        if v.startswith("[") and v.endswith("]"):
            ms.append(value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(
                one_of=value_pb2.ValueMatcher(string_match=string_matcher(v[1:-1])))))
        else:
            ms.append(value_pb2.ValueMatcher(string_match=string_matcher(v)))
    m = metadata_pb2.MetadataMatcher(filter=filt)
    m.path.add(key=rest[:-1] if rest.endswith("]") else rest)
    m.value.CopyFrom(ms[0] if len(ms) == 1 else value_pb2.ValueMatcher(or_match=value_pb2.OrMatcher(value_matchers=ms)))
    return rbac_pb2.Permission(metadata=m)


_PERMISSION_KEYS = ("destination.ip", "destination.port", "connection.sni")
_EXTENDED_KEYS = ("request.auth.principal", "request.auth.audiences", "request.auth.presenter")


def _is_extended(key: str) -> bool:
    return key in _EXTENDED_KEYS or key.startswith("request.auth.claims")


# ------------------------------------------------------------------------------------------ the model
# A condition: (key, values, notValues). A rule list ANDs its conditions.
Cond = tuple[str, list[str], list[str]]


def _rule_lists(rule: dict) -> tuple[list[list[Cond]], list[list[Cond]]]:
    """Istio's model.New: (principal lists, permission lists), `when` conditions appended to each."""
    base_perm: list[Cond] = []
    base_prin: list[Cond] = []
    for w in rule.get("when") or []:
        k = w.get("key", "")
        cond = (k, list(w.get("values") or []), list(w.get("notValues") or []))
        if not cond[1] and not cond[2]:
            continue
        if k in _PERMISSION_KEYS or k.startswith("experimental.envoy.filters."):
            base_perm.append(cond)
        elif k in ("source.ip", "remote.ip", "source.namespace", "source.trustDomain", "source.serviceAccount",
                   "source.principal") or k.startswith("request.headers") or _is_extended(k):
            base_prin.append(cond)
        else:
            raise ValueError(f"unknown attribute {k}")
    principals = []
    for frm in rule.get("from") or []:
        s = frm.get("source") or {}
        front = []
        # Istio inserts each at the front in this order, so the final order is the reverse.
        for key, f, nf in (("source.ip", "ipBlocks", "notIpBlocks"),
                           ("remote.ip", "remoteIpBlocks", "notRemoteIpBlocks"),
                           ("source.namespace", "namespaces", "notNamespaces"),
                           ("source.trustDomain", "trustDomains", "notTrustDomains"),
                           ("source.serviceAccount", "serviceAccounts", "notServiceAccounts"),
                           ("request.auth.principal", "requestPrincipals", "notRequestPrincipals"),
                           ("source.principal", "principals", "notPrincipals")):
            if s.get(f) or s.get(nf):
                front.insert(0, (key, list(s.get(f) or []), list(s.get(nf) or [])))
        principals.append(front + base_prin)
    if not rule.get("from"):
        principals.append(base_prin)
    permissions = []
    for to in rule.get("to") or []:
        o = to.get("operation") or {}
        front = []
        for key, f, nf in (("destination.port", "ports", "notPorts"), ("path", "paths", "notPaths"),
                           (":method", "methods", "notMethods"), (":authority", "hosts", "notHosts")):
            if o.get(f) or o.get(nf):
                front.insert(0, (key, list(o.get(f) or []), list(o.get(nf) or [])))
        permissions.append(front + base_perm)
    if not rule.get("to"):
        permissions.append(base_perm)
    return principals, permissions


def _soft(action: int, fn, *args):
    """checkError: an ALLOW rule fails as a whole; DENY/AUDIT just drop the part (None)."""
    try:
        return fn(*args)
    except (HttpOnly, ValueError):
        if action == rbac_pb2.RBAC.ALLOW:
            raise
        return None


def _principal(conds: list[Cond], tcp: bool, action: int, policy_ns: str) -> rbac_pb2.Principal:
    and_ = rbac_pb2.Principal()
    for key, values, not_values in conds:
        for vals, negate in ((values, False), (not_values, True)):
            if not vals:
                continue
            if _is_extended(key):
                p = _soft(action, _principal_extended, key, vals, tcp)
                if p is None:
                    continue
            else:
                ors = [x for x in (_soft(action, _principal_one, key, v, tcp, policy_ns) for v in vals)
                       if x is not None]
                if not ors:
                    continue
                p = rbac_pb2.Principal()
                p.or_ids.ids.extend(ors)
            and_.and_ids.ids.add().CopyFrom(rbac_pb2.Principal(not_id=p) if negate else p)
    if not and_.and_ids.ids:
        and_.and_ids.ids.add(any=True)
    return and_


def _permission(conds: list[Cond], tcp: bool, action: int) -> rbac_pb2.Permission:
    and_ = rbac_pb2.Permission()
    for key, values, not_values in conds:
        for vals, negate in ((values, False), (not_values, True)):
            if not vals:
                continue
            if key.startswith("experimental.envoy.filters."):
                p = _envoy_filter_permission(key, vals)
            else:
                ors = [x for x in (_soft(action, _permission_one, key, v, tcp) for v in vals) if x is not None]
                if not ors:
                    continue
                p = rbac_pb2.Permission()
                p.or_rules.rules.extend(ors)
            and_.and_rules.rules.add().CopyFrom(rbac_pb2.Permission(not_rule=p) if negate else p)
    if not and_.and_rules.rules:
        and_.and_rules.rules.add(any=True)
    return and_


def rule_policy(rule: dict, tcp: bool, action: int, policy_ns: str) -> rbac_pb2.Policy | None:
    """One Istio rule as an RBAC policy; None when it cannot apply on this chain (an ALLOW rule with HTTP-only
    fields on TCP)."""
    try:
        principals, permissions = _rule_lists(rule)
        policy = rbac_pb2.Policy()
        for conds in permissions:
            policy.permissions.append(_permission(conds, tcp, action))
        for conds in principals:
            policy.principals.append(_principal(conds, tcp, action, policy_ns))
    except (HttpOnly, ValueError):
        return None
    return policy


def _match_never() -> rbac_pb2.Policy:
    p = rbac_pb2.Policy()
    p.permissions.add().not_rule.any = True
    p.principals.add().not_id.any = True
    return p


def policy_name(namespace: str, name: str, rule: int) -> str:
    return f"ns[{namespace}]-policy[{name}]-rule[{rule}]"


# ------------------------------------------------------------------------------------------ selection
def is_dry_run(cfg) -> bool:
    value = str((cfg.annotations or {}).get(DRY_RUN_ANNOTATION, "false")).lower()
    return value in ("true", "1", "t")


def _target_refs(spec: dict) -> list[dict]:
    refs = spec.get("targetRefs") or []
    if not refs and spec.get("targetRef"):
        refs = [spec["targetRef"]]
    return refs


def attaches(cfg, namespace: str, labels: dict) -> bool:
    """model.WorkloadPolicyMatcher.ShouldAttachPolicy for sidecars and gateways (no waypoints): a policy with
    targetRefs applies only to the Kubernetes Gateway it names (in its own namespace); otherwise its selector
    (none = the whole namespace, or the mesh from the root namespace) must be a subset of the labels."""
    refs = _target_refs(cfg.spec)
    gateway_name = labels.get(GATEWAY_NAME_LABEL)
    if gateway_name is None:
        if refs:
            return False
    elif refs:
        return cfg.namespace == namespace and any(
            r.get("group") == "gateway.networking.k8s.io" and r.get("kind") == "Gateway"
            and r.get("name") == gateway_name and r.get("namespace", "") in ("", namespace) for r in refs)
    selector = (cfg.spec.get("selector") or {}).get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


# ------------------------------------------------------------------------------------------ filters
def _rbac_sets(policies: list, action_name: str, tcp: bool) -> tuple[rbac_pb2.RBAC | None, rbac_pb2.RBAC | None]:
    """builder.build: (enforced rules, shadow rules) of one action."""
    action = _ACTIONS[action_name]
    rules, shadow = rbac_pb2.RBAC(action=action), rbac_pb2.RBAC(action=action)
    has_rules = has_shadow = False
    for cfg in policies:
        target = shadow if is_dry_run(cfg) else rules
        if target is shadow:
            has_shadow = True
        else:
            has_rules = True
        spec_rules = cfg.spec.get("rules") or []
        for i, rule in enumerate(spec_rules):
            p = rule_policy(rule or {}, tcp, action, cfg.namespace)
            if p is not None:
                target.policies[policy_name(cfg.namespace, cfg.name, i)].CopyFrom(p)
        if not spec_rules:
            target.policies[policy_name(cfg.namespace, cfg.name, 0)].CopyFrom(_match_never())
    return (rules if has_rules else None), (shadow if has_shadow else None)


def _shadow_prefix(shadow: rbac_pb2.RBAC | None) -> str:
    if shadow is None:
        return SHADOW_ALLOW_PREFIX  # istiod reads the action of nil shadow rules: ALLOW, proto's zero value
    return {rbac_pb2.RBAC.ALLOW: SHADOW_ALLOW_PREFIX, rbac_pb2.RBAC.DENY: SHADOW_DENY_PREFIX}.get(shadow.action, "")


def _by_action(policies: list) -> dict[str, list]:
    out: dict[str, list] = {"AUDIT": [], "DENY": [], "ALLOW": []}
    for cfg in policies:
        action = cfg.spec.get("action") or "ALLOW"
        if action in out:
            out[action].append(cfg)
    return out


def http_rbac_filters(policies: list) -> list[hcm_pb.HttpFilter]:
    """AUDIT, DENY, ALLOW: one `envoy.filters.http.rbac` each (only the actions some policy uses)."""
    out = []
    for action, cfgs in _by_action(policies).items():
        if not cfgs:
            continue
        rules, shadow = _rbac_sets(cfgs, action, tcp=False)
        r = http_rbac_pb2.RBAC(shadow_rules_stat_prefix=_shadow_prefix(shadow))
        if rules is not None:
            r.rules.CopyFrom(rules)
        if shadow is not None:
            r.shadow_rules.CopyFrom(shadow)
        out.append(hcm_pb.HttpFilter(name=HTTP_RBAC, typed_config=pb.pack(r)))
    return out


def tcp_rbac_filters(policies: list) -> list[lc.Filter]:
    """The same for TCP chains: `envoy.filters.network.rbac` with stat prefix `tcp.`."""
    out = []
    for action, cfgs in _by_action(policies).items():
        if not cfgs:
            continue
        rules, shadow = _rbac_sets(cfgs, action, tcp=True)
        r = net_rbac_pb2.RBAC(stat_prefix=TCP_STAT_PREFIX, shadow_rules_stat_prefix=_shadow_prefix(shadow))
        if rules is not None:
            r.rules.CopyFrom(rules)
        if shadow is not None:
            r.shadow_rules.CopyFrom(shadow)
        out.append(lc.Filter(name=NETWORK_RBAC, typed_config=pb.pack(r)))
    return out
