"""AuthorizationPolicy and RequestAuthentication: Istio's `ValidateAuthorizationPolicy` /
`ValidateRequestAuthentication` (pkg/config/validation/validation.go, pkg/config/security/security.go) and the
CEL rules of their CRDs, with Istio's wording. Each error names the exact field (`spec.rules[0].from[1].source
.ipBlocks[2]`) instead of Istio's "found at rule N" suffix, which the path already says.
"""

from __future__ import annotations

import ipaddress
import json
import re
from urllib.parse import urlsplit

from ..errors import FieldError
from .common import Errs, check_workload_selector
from .schema import child, index

# The `when` keys Istio accepts (security.ValidateAttribute); `[...]` keys are checked for their brackets.
_PLAIN_KEYS = {
    "source.ip", "remote.ip", "source.namespace", "source.serviceAccount", "source.principal", "source.trustDomain",
    "request.auth.principal", "request.auth.audiences", "request.auth.presenter", "destination.ip",
    "destination.port", "connection.sni",
}
_MAP_PREFIXES = ("request.headers", "request.auth.claims", "experimental.envoy.filters.")
# PolicyTargetReference kinds Istio allows (group "" means core).
_TARGET_KINDS = {("core", "Service"), ("networking.istio.io", "ServiceEntry"),
                 ("gateway.networking.k8s.io", "Gateway"), ("gateway.networking.k8s.io", "GatewayClass")}
_TARGET_KINDS_TEXT = ("[core/v1/Service networking.istio.io/v1/ServiceEntry gateway.networking.k8s.io/v1/Gateway "
                      "gateway.networking.k8s.io/v1/GatewayClass]")
_GROUP_RE = re.compile(r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_KIND_RE = re.compile(r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$")
_STRICT_HEADER_RE = re.compile(r"^[-_A-Za-z0-9]+$")
_VALID_LITERAL = re.compile(r"^[a-zA-Z0-9-._~%!$&'()+,;:@=]+$")

_SOURCE_FIELDS = ("principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces",
                  "notNamespaces", "serviceAccounts", "notServiceAccounts", "trustDomains", "notTrustDomains",
                  "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks")
_OPERATION_FIELDS = ("hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths")
# Source fields that only mean something with mTLS/TCP (Istio's tcpRulesInFrom).
_TCP_SOURCE_FIELDS = ("principals", "notPrincipals", "ipBlocks", "notIpBlocks", "namespaces", "notNamespaces",
                      "remoteIpBlocks", "notRemoteIpBlocks", "serviceAccounts", "notServiceAccounts")
# CUSTOM action: source fields and when keys it cannot use (they need the peer identity or the JWT).
_CUSTOM_UNSUPPORTED_SOURCE = ("namespaces", "notNamespaces", "serviceAccounts", "notServiceAccounts", "trustDomains",
                              "notTrustDomains", "principals", "notPrincipals", "requestPrincipals",
                              "notRequestPrincipals")


def _cap(field: str) -> str:
    return field[0].upper() + field[1:]


def ip_errors(values: list[str]) -> list[str]:
    """security.ValidateIPs."""
    out = []
    for v in values:
        if "/" in v:
            try:
                ipaddress.ip_network(v, strict=False)
                addr, _, bits = v.partition("/")
                ipaddress.ip_address(addr)
                if not bits.isdigit():
                    raise ValueError(f"bad bits after slash: {bits!r}")
            except ValueError as e:
                out.append(f"bad CIDR range ({v}): netip.ParsePrefix({v!r}): {e}")
        else:
            try:
                ipaddress.ip_address(v)
            except ValueError:
                out.append(f"bad IP address ({v})")
    return out


def port_errors(values: list[str]) -> list[str]:
    """security.ValidatePorts."""
    out = []
    for p in values:
        if not p.isdigit() or int(p) > 65535:
            out.append(f'bad port ({p}): strconv.ParseUint: parsing "{p}": invalid syntax' if not p.isdigit()
                       else f"bad port ({p}): port out of range")
    return out


def empty_value_error(key: str, values: list[str]) -> str | None:
    return f"empty value not allowed, found in {key}" if any(v == "" for v in values) else None


def wildcard_error(key: str, values: list[str]) -> str | None:
    """security.CheckWildcardValues."""
    if (e := empty_value_error(key, values)) is not None:
        return e
    for v in values:
        n = v.count("*")
        if n > 1:
            return f'at most one wildcard is allowed, found in {key}: "{v}"'
        if n == 1 and v != "*" and not v.startswith("*") and not v.endswith("*"):
            return f'wildcard is only allowed at the start or end, found in {key}: "{v}"'
    return None


def trust_domain_error(key: str, values: list[str]) -> str | None:
    if (e := wildcard_error(key, values)) is not None:
        return e
    for v in values:
        if "/" in v:
            return f"trust domain must not contain '/', found in {key}: \"{v}\""
    return None


def service_account_error(key: str, values: list[str]) -> str | None:
    """security.CheckServiceAccount."""
    if len(values) > 16:
        return "may not have more than 16 values"
    for v in values:
        if v == "":
            return f"empty value not allowed, found in {key}"
        if "*" in v:
            return f"wildcard not allowed, found in {key}"
        if v.count("/") not in (0, 1):
            return f"expected format 'serviceAccount' or 'namespace/serviceAccount', found \"{v}\" in {key}"
        if len(v) > 320:
            return f'value cannot exceed 320 characters, found "{v}" in {key}'
        ns, slash, sa = v.partition("/")
        if slash and not ns:
            return f"expected format 'serviceAccount' or 'namespace/serviceAccount', found empty namespace \"{v}\" in {key}"
        if slash and not sa:
            return (f"expected format 'serviceAccount' or 'namespace/serviceAccount', found empty serviceAccount "
                    f"\"{v}\" in {key}")
    return None


def path_template_error(key: str, paths: list[str]) -> str | None:
    """security.CheckValidPathTemplate: `{*}` / `{**}` segments, `{**}` last."""
    for path in paths:
        templated = "{*}" in path or "{**}" in path
        trimmed = path.strip("/")
        found_any = False
        for glob in trimmed.split("/"):
            if glob == "{*}" and not found_any:
                continue
            if glob == "{**}" and not found_any:
                found_any = True
                continue
            if glob in ("{*}", "{**}") and found_any:
                return f"invalid or unsupported path {trimmed}, found in {key}. {{**}} is not the last operator"
            if "{" in glob or "}" in glob:
                return (f"invalid or unsupported path {trimmed}, found in {key}. "
                        "Contains '{' or '}' beyond a supported path template")
            if templated and not _VALID_LITERAL.match(glob):
                return (f"invalid or unsupported path {trimmed}, found in {key}. "
                        f"Contains segment {glob} with invalid string literal")
    return None


def _map_key_error(key: str) -> str | None:
    open_ = key.find("[")
    if key.endswith("]") and 0 < open_ < len(key) - 2:
        return None
    return f"bad key ({key}): should have format a[b]"


def attribute_error(key: str, values: list[str]) -> str | None:
    """security.ValidateAttribute: is `key` a condition Istio knows, and are the values right for it."""
    if (e := empty_value_error(key, values)) is not None:
        return e
    if key.startswith(_MAP_PREFIXES):
        return _map_key_error(key)
    if key in ("source.ip", "remote.ip", "destination.ip"):
        errs = ip_errors(values)
        return "; ".join(errs) if errs else None
    if key == "source.serviceAccount":
        return service_account_error(key, values)
    if key == "source.trustDomain":
        return wildcard_error(key, values)
    if key == "destination.port":
        errs = port_errors(values)
        return "; ".join(errs) if errs else None
    if key in _PLAIN_KEYS:
        return None
    if key == "destination.namespace":
        return f"attribute {key} is replaced by the metadata.namespace"
    if key.startswith("destination.labels"):
        return f"attribute {key} is replaced by the workload selector"
    if key in ("destination.name", "destination.user"):
        return f"deprecated attribute {key}: only supported in v1alpha1"
    return f"unknown attribute: {key}"


def check_target_ref_patterns(ref: dict, path: str, errs: Errs) -> None:
    """The CRD's patterns of a PolicyTargetReference's group and kind (every kind that has targetRefs)."""
    group, kind = ref.get("group", ""), ref.get("kind", "")
    if not _GROUP_RE.match(group):
        errs.add(child(path, "group"), f'Invalid value: "{group}": should match the pattern of a DNS subdomain')
    if not _KIND_RE.match(kind):
        errs.add(child(path, "kind"), f'Invalid value: "{kind}": should start with a letter, letters/digits/dashes')


def _check_target_ref(ref: dict, path: str, errs: Errs) -> None:
    """validatePolicyTargetReference plus the CRD's patterns."""
    name, ns = ref.get("name", ""), ref.get("namespace", "")
    group, kind = ref.get("group", ""), ref.get("kind", "")
    if name == "":
        errs.add(child(path, "name"), "targetRef name must be set")
    if ns:
        errs.add(child(path, "namespace"),
                 "targetRef namespace must not be set; cross namespace referencing is not supported")
    check_target_ref_patterns(ref, path, errs)
    if ((group or "core"), kind) not in _TARGET_KINDS:
        errs.add(child(path, "kind"), f"targetRef must be to one of {_TARGET_KINDS_TEXT} but was {group}/{kind}")


def _check_selection(spec: dict, errs: Errs) -> None:
    """validateOneOfSelectorType, validateWorkloadSelector and the target references."""
    set_ = sum(1 for f in ("selector", "targetRef") if f in spec) + (1 if spec.get("targetRefs") else 0)
    if set_ > 1:
        errs.add("spec", "only one of targetRefs or workloadSelector can be set")
    if "selector" in spec:
        check_workload_selector(spec["selector"].get("matchLabels", {}), "spec.selector.matchLabels", errs)
    if "targetRef" in spec:
        _check_target_ref(spec["targetRef"], "spec.targetRef", errs)
    for i, ref in enumerate(spec.get("targetRefs", [])):
        _check_target_ref(ref, index("spec.targetRefs", i), errs)


def check_authorization_policy(obj: dict, errs: Errs) -> None:
    spec = obj.get("spec", {})
    action = spec.get("action", "ALLOW")
    _check_selection(spec, errs)
    rules = spec.get("rules")
    if action == "CUSTOM":
        if rules is None:
            errs.add("spec.rules", "CUSTOM action without `rules` is meaningless as it will never be triggered, "
                                   "add an empty rule `{}` if you want it be triggered for every request")
        elif not (spec.get("provider") or {}).get("name"):
            errs.add("spec.provider.name", "`provider.name` must not be empty")
        for i, rule in enumerate(rules or []):
            at = index("spec.rules", i)
            for j, frm in enumerate(rule.get("from", [])):
                for f in _CUSTOM_UNSUPPORTED_SOURCE:
                    if (frm.get("source") or {}).get(f):
                        errs.add(f"{index(at + '.from', j)}.source.{f}",
                                 f"From.{_cap(f)} is currently not supported with CUSTOM action")
            for j, when in enumerate(rule.get("when", [])):
                k = when.get("key", "")
                if k in ("source.namespace", "source.serviceAccount", "source.trustDomain", "source.principal") \
                        or k.startswith("request.auth."):
                    errs.add(f"{index(at + '.when', j)}.key", f"{k} is currently not supported with CUSTOM action")
    if "provider" in spec and action != "CUSTOM":
        errs.add("spec.provider", f"`provider` must not be with non CUSTOM action, found {action}")
    if action == "DENY" and rules is None:
        errs.add("spec.rules", "DENY action without `rules` is meaningless as it will never be triggered, "
                               "add an empty rule `{}` if you want it be triggered for every request")
    for i, rule in enumerate(rules or []):
        _check_rule(rule, index("spec.rules", i), i, errs)


def _check_rule(rule: dict, at: str, i: int, errs: Errs) -> None:
    if "from" in rule and not rule["from"]:
        errs.add(f"{at}.from", f"`from` must not be empty, found at rule {i}")
    for j, frm in enumerate(rule.get("from", [])):
        fat = index(f"{at}.from", j)
        src = frm.get("source")
        if src is None:
            errs.add(f"{fat}.source", f"`from.source` must not be nil, found at rule {i}")
            continue
        sat = f"{fat}.source"
        if any(src.get(f) for f in ("principals", "notPrincipals", "namespaces", "notNamespaces")) and \
                any(src.get(f) for f in ("serviceAccounts", "notServiceAccounts")):
            errs.add(sat, f"cannot set serviceAccounts with namespaces or principals, found at rule {i}")
        if not any(src.get(f) for f in _SOURCE_FIELDS):
            errs.add(sat, f"`from.source` must not be empty, found at rule {i}")
        for f in ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"):
            for k, v in enumerate(src.get(f, [])):
                for m in ip_errors([v]) if v else []:
                    errs.add(index(f"{sat}.{f}", k), m)
        for f in _SOURCE_FIELDS:
            values = src.get(f, [])
            if f in ("serviceAccounts", "notServiceAccounts"):
                errs.add(f"{sat}.{f}", service_account_error(_cap(f), values))
            elif f in ("trustDomains", "notTrustDomains"):
                errs.add(f"{sat}.{f}", trust_domain_error(_cap(f), values))
            else:
                errs.add(f"{sat}.{f}", empty_value_error(_cap(f), values))
    if "to" in rule and not rule["to"]:
        errs.add(f"{at}.to", f"`to` must not be empty, found at rule {i}")
    for j, to in enumerate(rule.get("to", [])):
        tat = index(f"{at}.to", j)
        op = to.get("operation")
        if op is None:
            errs.add(f"{tat}.operation", f"`to.operation` must not be nil, found at rule {i}")
            continue
        oat = f"{tat}.operation"
        if not any(op.get(f) for f in _OPERATION_FIELDS):
            errs.add(oat, f"`to.operation` must not be empty, found at rule {i}")
        for f in ("ports", "notPorts"):
            for k, p in enumerate(op.get(f, [])):
                for m in port_errors([p]) if p else []:
                    errs.add(index(f"{oat}.{f}", k), m)
        for f in _OPERATION_FIELDS:
            errs.add(f"{oat}.{f}", empty_value_error(_cap(f), op.get(f, [])))
        for f in ("paths", "notPaths"):
            errs.add(f"{oat}.{f}", path_template_error(_cap(f), op.get(f, [])))
    for j, cond in enumerate(rule.get("when", [])):
        wat = index(f"{at}.when", j)
        key = cond.get("key", "")
        if key == "":
            errs.add(f"{wat}.key", "`key` must not be empty")
            continue
        values, not_values = cond.get("values", []), cond.get("notValues", [])
        if not values and not not_values:
            errs.add(wat, f"at least one of `values` or `notValues` must be set for key {key}")
            continue
        if (e := attribute_error(key, values)) is not None:
            errs.add(f"{wat}.values", f"invalid `value` for `key` {key}: {e}")
        if (e := attribute_error(key, not_values)) is not None:
            errs.add(f"{wat}.notValues", f"invalid `notValue` for `key` {key}: {e}")


def jwks_error(text: str) -> str | None:
    """What jwk.Parse rejects: not JSON, or neither a key (`kty`) nor a set of keys (`keys`)."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        return f"jwks parse error: failed to unmarshal JWK set: {e}"
    keys = doc.get("keys") if isinstance(doc, dict) and "keys" in doc else [doc]
    if not isinstance(keys, list):
        return "jwks parse error: failed to unmarshal JWK set: keys must be a list"
    for k in keys:
        if not isinstance(k, dict) or not isinstance(k.get("kty"), str):
            return 'jwks parse error: failed to parse key: missing "kty" field'
        if k["kty"] not in ("RSA", "EC", "OKP", "oct"):
            return f'jwks parse error: failed to parse key: invalid key type from JSON ({k["kty"]})'
    return None


def jwks_uri_error(uri: str) -> str | None:
    """security.ParseJwksURI plus the CRD's scheme rule."""
    try:
        u = urlsplit(uri)
        _ = u.port
    except ValueError as e:
        return f"jwksUri {uri!r}: {e}"
    if u.scheme not in ("http", "https"):
        return f'URI scheme "{u.scheme}" is not supported'
    if not u.hostname:
        return f"jwksUri {uri!r} has no host"
    return None


def check_request_authentication(obj: dict, errs: Errs) -> None:
    spec = obj.get("spec", {})
    _check_selection(spec, errs)
    for i, rule in enumerate(spec.get("jwtRules", [])):
        at = index("spec.jwtRules", i)
        for k, aud in enumerate(rule.get("audiences", [])):
            if aud == "":
                errs.add(index(f"{at}.audiences", k), "audience must be non-empty string")
        uri = rule.get("jwksUri", rule.get("jwks_uri", ""))
        if not rule.get("issuer") and not uri:
            errs.add(f"{at}.issuer", "issuer or jwksUri must be non-empty string")
        if uri:
            errs.add(f"{at}.jwksUri" if "jwksUri" in rule else f"{at}.jwks_uri", jwks_uri_error(uri))
        if rule.get("jwks"):
            errs.add(f"{at}.jwks", jwks_error(rule["jwks"]))
        for k, loc in enumerate(rule.get("fromHeaders", [])):
            if not loc.get("name"):
                errs.add(f"{index(at + '.fromHeaders', k)}.name", "location header name must be non-empty string")
        for k, p in enumerate(rule.get("fromParams", [])):
            if p == "":
                errs.add(index(f"{at}.fromParams", k), "location query must be non-empty string")
        for k, c in enumerate(rule.get("fromCookies", [])):
            if c == "":
                errs.add(index(f"{at}.fromCookies", k), "cookie name must be non-empty string")
        for k, ch in enumerate(rule.get("outputClaimToHeaders", [])):
            cat = index(f"{at}.outputClaimToHeaders", k)
            if not ch.get("claim") or not ch.get("header"):
                errs.add(cat, "outputClaimToHeaders header and claim value must be non-empty string")
            elif not _STRICT_HEADER_RE.match(ch["header"]):
                errs.add(f"{cat}.header", f"header name {ch['header']} is not a valid header name")
        for k, c in enumerate(rule.get("spaceDelimitedClaims", [])):
            if c == "":
                errs.add(index(f"{at}.spaceDelimitedClaims", k), "Invalid value: \"\": should be at least 1 chars long")
        if "outputPayloadToHeader" in rule and rule["outputPayloadToHeader"] and \
                not _STRICT_HEADER_RE.match(rule["outputPayloadToHeader"]):
            errs.add(f"{at}.outputPayloadToHeader", f"header name {rule['outputPayloadToHeader']} is not a valid header name")


def security_warnings(obj: dict) -> list[FieldError]:
    """Istio's validation warnings for these kinds (accepted, but probably not what was meant)."""
    kind, spec = obj.get("kind"), obj.get("spec")
    if kind not in ("AuthorizationPolicy", "RequestAuthentication") or not isinstance(spec, dict):
        return []
    out = []
    if "selector" in spec and not (spec["selector"] or {}).get("matchLabels"):
        out.append(FieldError("spec.selector", "workload selector specified without labels"))
    if kind != "AuthorizationPolicy" or spec.get("action") != "DENY":
        return out
    for i, rule in enumerate(spec.get("rules") or []):
        srcs = [f.get("source") or {} for f in rule.get("from") or []]
        ops = [t.get("operation") or {} for t in rule.get("to") or []]
        tcp_from = any(any(src.get(f) is not None for f in _TCP_SOURCE_FIELDS) for src in srcs)
        tcp_to = any(op.get("ports") is not None or op.get("notPorts") is not None for op in ops)
        if (srcs and not ops and not tcp_from) or (ops and not tcp_to):
            out.append(FieldError(index("spec.rules", i),
                                  "configured AuthorizationPolicy will deny all traffic to TCP ports under its scope "
                                  "due to the use of only HTTP attributes in a DENY rule; it is recommended to "
                                  "explicitly specify the port"))
    return out
