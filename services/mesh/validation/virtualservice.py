"""VirtualService rules, after Istio's `ValidateVirtualService` (`pkg/config/validation/virtualservice.go`).

Weights follow the Istio 1.7 rule the seed was written against: with more than one destination the weights must
add up to 100 (`total destination weight %v != 100`); current Istio only rejects a total of 0.
"""

from __future__ import annotations

import re

from .common import (
    Errs,
    base64_error,
    check_export_to,
    check_istio_labels,
    cors_header_name_error,
    fqdn_error,
    fractional_percent_error,
    go_float,
    header_match_name_error,
    header_op_name_error,
    header_set_name_error,
    header_value_error,
    host_matches,
    host_subset_of,
    ip_subnet_error,
    is_authority_header,
    is_dns1123_label,
    is_ip,
    is_jwt_claim_header,
    percent_error,
    port_error,
    regex_error,
    string_match_errors,
    wildcard_domain_error,
)
from .schema import child, duration_nanos, index, key

MESH = "mesh"

_CORS_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE", "*"}

# Envoy's `x-envoy-retry-on` and `x-envoy-retry-grpc-on` policies.
_RETRY_ON = {
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "retriable-4xx", "refused-stream",
    "retriable-status-codes", "retriable-headers", "envoy-ratelimited", "http3-post-connect-failure",
    "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable",
}

# The status codes Go's `net/http.StatusText` knows: a retryOn entry may be one of them.
_HTTP_STATUS_CODES = {
    100, 101, 102, 103, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305, 307, 308,
    400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417, 418, 421, 422, 423,
    424, 425, 426, 428, 429, 431, 451, 500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511,
}

GRPC_STATUS_NAMES = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
}

_MAX_DIRECT_RESPONSE_BYTES = 1024 * 1024
_OUTBOUND_SNI_FORMAT = "outbound_.<PORT>_._.<HOSTNAME>"


def check_virtual_service(obj: dict, errs: Errs) -> None:
    spec = obj.get("spec", {})
    namespace = obj["metadata"]["namespace"]
    hosts: list[str] = spec.get("hosts", [])
    gateways: list[str] = spec.get("gateways", [])
    http = spec.get("http", [])
    tls = spec.get("tls", [])
    tcp = spec.get("tcp", [])

    is_delegate = not hosts
    if is_delegate:
        if gateways:
            errs.add("spec.gateways", "delegate virtual service must have no gateways specified")
        if tls:
            errs.add("spec.tls", "delegate virtual service must have no tls route specified")
        if tcp:
            errs.add("spec.tcp", "delegate virtual service must have no tcp route specified")

    applies_to_gateway = bool(gateways) and MESH not in gateways
    applies_to_mesh = not applies_to_gateway
    if gateways:
        check_gateway_names(gateways, "spec.gateways", errs)

    if not applies_to_gateway:
        _check_jwt_claim_routes(http, gateways, errs)

    _check_hosts(spec, hosts, applies_to_gateway, applies_to_mesh, errs)

    if not http and not tcp and not tls:
        errs.add("spec", "http, tcp or tls must be provided in virtual service")
    for i, route in enumerate(http):
        check_http_route(route, index("spec.http", i), is_delegate, errs)
    for i, route in enumerate(tls):
        _check_tls_route(route, index("spec.tls", i), spec, errs)
    for i, route in enumerate(tcp):
        _check_tcp_route(route, index("spec.tcp", i), errs)

    check_export_to(spec.get("exportTo", []), namespace, "spec.exportTo", errs)


def _check_jwt_claim_routes(http: list[dict], gateways: list[str], errs: Errs) -> None:
    shown = "[" + " ".join(gateways) + "]"
    for i, route in enumerate(http):
        for j, match in enumerate(route.get("match", [])):
            for field in ("headers", "withoutHeaders"):
                for name in match.get(field, {}):
                    if is_jwt_claim_header(name):
                        errs.add(key(f"spec.http[{i}].match[{j}].{field}", name),
                                 f"JWT claim based routing (key: {name}) is only supported for gateway, "
                                 f"found no gateways: {shown}")


def _check_hosts(spec: dict, hosts: list[str], to_gateway: bool, to_mesh: bool, errs: Errs) -> None:
    sni = _has_sni_hosts(spec)
    all_valid = True
    for i, host in enumerate(hosts):
        at = index("spec.hosts", i)
        err = gateway_bound_domain_error(sni, host) if to_gateway else wildcard_domain_error(host)
        if err:
            if not is_ip(host):
                errs.add(at, err)
                all_valid = False
        elif to_mesh and host == "*":
            errs.add(at, "wildcard host * is not allowed for virtual services bound to the mesh gateway")
            all_valid = False
    if all_valid:
        for i in range(len(hosts)):
            for j in range(i + 1, len(hosts)):
                if host_matches(hosts[i], hosts[j]):
                    errs.add(index("spec.hosts", j), f"duplicate hosts in virtual service: {hosts[i]} & {hosts[j]}")


def _has_sni_hosts(spec: dict) -> bool:
    return any(m.get("sniHosts") for r in spec.get("tls", []) for m in r.get("match", []))


def gateway_bound_domain_error(sni: bool, domain: str) -> str | None:
    """`ValidateWildcardDomainForVirtualServiceBoundToGateway`: also allows AUTO_PASSTHROUGH's SNI names."""
    if sni and domain.startswith("outbound_") and 0 < len(domain) <= 255:
        parts = domain.split("_")
        if len(parts) < 4:
            return f"domain name {domain} invalid, should follow '{_OUTBOUND_SNI_FORMAT}' format"
        port, hostname = parts[1].strip("."), parts[3].strip(".")
        if parts[0] != "outbound":
            return f'domain name "{domain}" invalid (label "{parts[0]}" invalid)'
        if not re.search(r"[0-9]", port):
            return f'domain name "{domain}" invalid (label "{port}" invalid). should follow {_OUTBOUND_SNI_FORMAT} format'
        if not re.search(r"[a-zA-Z]", hostname):
            return (f'domain name "{domain}" invalid (label "{hostname}" invalid). '
                    f"should follow {_OUTBOUND_SNI_FORMAT} format")
        return None
    return wildcard_domain_error(domain)


def check_gateway_names(names: list[str], path: str, errs: Errs) -> None:
    """`validateGatewayNames`: `mesh`, `<namespace>/<name>`, or the legacy `name` / `name.namespace` forms."""
    for i, name in enumerate(names):
        at = index(path, i)
        ns, slash, gw = name.partition("/")
        if not slash:
            errs.add(at, fqdn_error(name))
            continue
        if not ns or not gw:
            errs.add(at, "config namespace and gateway name cannot be empty")
        if not is_dns1123_label(ns):
            errs.add(at, f'invalid value for namespace: "{ns}"')
        if not is_dns1123_label(gw):
            errs.add(at, f'invalid value for gateway name: "{gw}"')


# ---- HTTP ------------------------------------------------------------------------------------------------------


def check_http_route(route: dict, path: str, in_delegate_vs: bool, errs: Errs) -> None:
    _check_route_conflicts(route, path, in_delegate_vs, errs)
    _check_matches(route.get("match", []), child(path, "match"), errs)
    check_header_operations(route.get("headers", {}), child(path, "headers"), errs)
    if "corsPolicy" in route:
        _check_cors(route["corsPolicy"], child(path, "corsPolicy"), errs)
    if "fault" in route:
        _check_fault(route["fault"], child(path, "fault"), errs)
    for legacy in ("mirrorPercent", "mirror_percent"):
        if route.get(legacy, 0) > 100:
            errs.add(child(path, legacy), f"mirror_percent must have a max value of 100 (it has {route[legacy]})")
    if "mirrorPercentage" in route:
        value = route["mirrorPercentage"].get("value", 0.0)
        at = child(path, "mirrorPercentage.value")
        if value > 100:
            errs.add(at, f"mirror_percentage must have a max value of 100 (it has {go_float(value)})")
        if value < 0:
            errs.add(at, f"mirror_percentage must have a min value of 0 (it has {go_float(value)})")
    if "mirror" in route:
        check_destination(route["mirror"], child(path, "mirror"), errs)
    for i, mirror in enumerate(route.get("mirrors", [])):
        at = index(child(path, "mirrors"), i)
        check_destination(mirror["destination"], child(at, "destination"), errs)
        value = mirror.get("percentage", {}).get("value", 0.0)
        if value > 100:
            errs.add(child(at, "percentage.value"), f"mirror percentage must have a max value of 100 (it has {go_float(value)})")
        if value < 0:
            errs.add(child(at, "percentage.value"), f"mirror percentage must have a min value of 0 (it has {go_float(value)})")
    if "redirect" in route:
        _check_redirect(route["redirect"], route.get("match", []), child(path, "redirect"), errs)
    if "directResponse" in route:
        _check_direct_response(route["directResponse"], child(path, "directResponse"), errs)
    if "retries" in route:
        check_retries(route["retries"], child(path, "retries"), errs)
    if "rewrite" in route:
        _check_rewrite(route["rewrite"], child(path, "rewrite"), errs)
    _check_authority_rewrite(route, path, errs)
    if "delegate" in route and not route["delegate"].get("name"):
        # Istio leaves this to the lookup; Mizzen rejects it up front since no delegate can ever match.
        errs.add(child(path, "delegate.name"), "delegate name is required")
    check_weighted_destinations(route.get("route", []), child(path, "route"), errs, with_headers=True)


def _check_route_conflicts(route: dict, path: str, in_delegate_vs: bool, errs: Errs) -> None:
    name = route.get("name", "")
    has_route = bool(route.get("route"))
    if not in_delegate_vs and "delegate" in route:
        # A root VirtualService's rule hands the request to a delegate: it may not route it itself.
        if "redirect" in route:
            errs.add(child(path, "redirect"), f"root HTTP route {name} must not specify redirect")
        if "route" in route:
            errs.add(child(path, "route"), f"root HTTP route {name} must not specify route")
        return
    if in_delegate_vs and "delegate" in route:
        errs.add(child(path, "delegate"), "delegate HTTP route cannot contain delegate")
    if "redirect" in route:
        if has_route:
            errs.add(child(path, "redirect"), "HTTP route cannot contain both route and redirect")
        if "fault" in route:
            errs.add(child(path, "fault"), "HTTP route cannot contain both fault and redirect")
        if "rewrite" in route:
            errs.add(child(path, "rewrite"), "HTTP route rule cannot contain both rewrite and redirect")
        if "directResponse" in route:
            errs.add(child(path, "directResponse"), "HTTP route rule cannot contain both direct_response and redirect")
    elif "directResponse" in route:
        if has_route:
            errs.add(child(path, "directResponse"), "HTTP route cannot contain both route and direct_response")
        if "fault" in route:
            errs.add(child(path, "fault"), "HTTP route cannot contain both fault and direct_response")
        if "rewrite" in route:
            errs.add(child(path, "rewrite"), "HTTP route rule cannot contain both rewrite and direct_response")
    elif not has_route:
        errs.add(path, "HTTP route, redirect or direct_response is required")
    if "mirror" in route and route.get("mirrors"):
        errs.add(child(path, "mirrors"), "HTTP route cannot contain both mirror and mirrors")


def _check_matches(matches: list[dict], path: str, errs: Errs) -> None:
    for j, m in enumerate(matches):
        at = index(path, j)
        for field in ("headers", "withoutHeaders"):
            for name, sm in m.get(field, {}).items():
                hp = key(child(at, field), name)
                errs.add(hp, header_match_name_error(name))
                # In withoutHeaders, regex "*" means "header present", not an RE2 regex.
                if field == "withoutHeaders" and sm.get("regex") == "*":
                    continue
                errs.add_all(hp, string_match_errors(sm, field))
        if "uri" in m:
            errs.add_all(child(at, "uri"), string_match_errors(m["uri"], "uri", allow_empty_prefix=True))
        for field in ("scheme", "method", "authority"):
            if field in m:
                errs.add_all(child(at, field), string_match_errors(m[field], field))
        for name, sm in m.get("queryParams", {}).items():
            errs.add_all(key(child(at, "queryParams"), name), string_match_errors(sm, "queryParams"))
        if m.get("port", 0) != 0:
            errs.add(child(at, "port"), port_error(m["port"]))
        check_istio_labels(m.get("sourceLabels", {}), child(at, "sourceLabels"), errs)
        check_gateway_names(m.get("gateways", []), child(at, "gateways"), errs)
        ns = m.get("sourceNamespace", "")
        if ns and not is_dns1123_label(ns):
            errs.add(child(at, "sourceNamespace"), f"sourceNamespace match {ns} is invalid")


def check_header_operations(headers: dict, path: str, errs: Errs) -> None:
    request = headers.get("request", {})
    response = headers.get("response", {})
    for op in ("add", "set"):
        for name, value in request.get(op, {}).items():
            at = key(child(path, f"request.{op}"), name)
            errs.add(at, header_set_name_error(name))
            errs.add(at, header_value_error(value))
        for name, value in response.get(op, {}).items():
            at = key(child(path, f"response.{op}"), name)
            errs.add(at, header_op_name_error(name))
            errs.add(at, header_value_error(value))
    for side, ops in (("request", request), ("response", response)):
        for i, name in enumerate(ops.get("remove", [])):
            errs.add(index(child(path, f"{side}.remove"), i), header_op_name_error(name))


def _check_cors(cors: dict, path: str, errs: Errs) -> None:
    for i, origin in enumerate(cors.get("allowOrigins", [])):
        at = index(child(path, "allowOrigins"), i)
        value = origin.get("exact") or origin.get("prefix") or origin.get("regex") or ""
        if not value:
            errs.add(at, f"'{value}' is not a valid match type for CORS allow origins")
        elif "regex" in origin:
            errs.add(at, regex_error(origin["regex"], "corsPolicy.allowOrigins"))
    for i, method in enumerate(cors.get("allowMethods", [])):
        if method not in _CORS_METHODS:
            errs.add(index(child(path, "allowMethods"), i), f'"{method}" is not a supported HTTP method')
    for field in ("allowHeaders", "exposeHeaders"):
        for i, name in enumerate(cors.get(field, [])):
            errs.add(index(child(path, field), i), cors_header_name_error(name))
    if "maxAge" in cors and duration_nanos(cors["maxAge"]) % 1_000_000_000:
        errs.add(child(path, "maxAge"), "max_age duration is accurate only to seconds precision")


def _check_fault(fault: dict, path: str, errs: Errs) -> None:
    if "abort" not in fault and "delay" not in fault:
        errs.add(path, "HTTP fault injection must have an abort and/or a delay")
    if "abort" in fault:
        abort, at = fault["abort"], child(path, "abort")
        if "percentage" in abort:
            errs.add(child(at, "percentage.value"), fractional_percent_error(abort["percentage"].get("value", 0.0)))
        if "grpcStatus" in abort and abort["grpcStatus"] not in GRPC_STATUS_NAMES:
            errs.add(child(at, "grpcStatus"),
                     f'gRPC status "{abort["grpcStatus"]}" is not supported. See '
                     "https://github.com/grpc/grpc/blob/master/doc/statuscodes.md for a list of supported codes, "
                     "for example 'NOT_FOUND'")
        if "http2Error" in abort:
            errs.add(child(at, "http2Error"), "HTTP/2 abort fault injection not supported yet")
        if "httpStatus" in abort:
            errs.add(child(at, "httpStatus"), http_status_error(abort["httpStatus"]))
        if not any(k in abort for k in ("httpStatus", "grpcStatus", "http2Error")):
            # Istio only warns; Envoy's abort needs an error type, so Mizzen rejects the rule.
            errs.add(at, "abort must specify httpStatus or grpcStatus")
    if "delay" in fault:
        delay, at = fault["delay"], child(path, "delay")
        if "percentage" in delay:
            errs.add(child(at, "percentage.value"), fractional_percent_error(delay["percentage"].get("value", 0.0)))
        if "percent" in delay:
            errs.add(child(at, "percent"), percent_error(delay["percent"]))
        if "exponentialDelay" in delay:
            errs.add(child(at, "exponentialDelay"), "exponentialDelay not supported yet")
        elif "fixedDelay" not in delay:
            # Istio accepts an empty delay that Envoy then rejects; Mizzen says so here.
            errs.add(at, "delay must specify fixedDelay")


def http_status_error(status: int) -> str | None:
    if status < 200 or status > 600:
        return f"HTTP status {status} is not in range 200-599"
    return None


def _check_redirect(redirect: dict, matches: list[dict], path: str, errs: Errs) -> None:
    if redirect.get("uri") and redirect.get("prefixRewrite"):
        errs.add(path, "redirect may only specify one of uri or prefix_rewrite")
    if redirect.get("prefixRewrite"):
        for m in matches:
            if "uri" in m and "prefix" not in m["uri"]:
                errs.add(child(path, "prefixRewrite"),
                         "redirect prefix_rewrite requires all URI matches to use prefix match type")
                break
    if not any(redirect.get(f) for f in ("uri", "prefixRewrite", "authority", "scheme")) and not (
            "port" in redirect or "derivePort" in redirect):
        errs.add(path, "redirect must specify URI, authority, scheme, or port")
    code = redirect.get("redirectCode", 0)
    if code and not 300 <= code <= 399:
        errs.add(child(path, "redirectCode"), f"{code} is not a valid redirect code, must be 3xx")
    scheme = redirect.get("scheme", "")
    if scheme and scheme not in ("http", "https"):
        errs.add(child(path, "scheme"), 'invalid redirect scheme, must be "http" or "https"')
    if redirect.get("port", 0) > 0:
        errs.add(child(path, "port"), port_error(redirect["port"]))


def _check_direct_response(resp: dict, path: str, errs: Errs) -> None:
    body = resp.get("body", {})
    if "bytes" in body:
        errs.add(child(path, "body.bytes"), base64_error(body["bytes"]))
    size = len(body.get("string", "").encode()) + len(body.get("bytes", "")) * 3 // 4
    if size > _MAX_DIRECT_RESPONSE_BYTES:
        errs.add(child(path, "body"), "large direct_responses may impact control plane performance, must be less than 1MB")
    errs.add(child(path, "status"), http_status_error(resp["status"]))


def check_retries(retries: dict, path: str, errs: Errs) -> None:
    attempts = retries.get("attempts", 0)
    if attempts < 0:
        errs.add(child(path, "attempts"), "attempts cannot be negative")
    if attempts == 0 and ("perTryTimeout" in retries or retries.get("retryOn") or "retryRemoteLocalities" in retries):
        errs.add(path, "http retry policy configured when attempts are set to 0 (disabled)")
    retry_on = retries.get("retryOn", "")
    if retry_on:
        for policy in retry_on.split(","):
            code = int(policy) if re.fullmatch(r"[+-]?[0-9]+", policy) else 0
            if code not in _HTTP_STATUS_CODES and policy not in _RETRY_ON:
                errs.add(child(path, "retryOn"), f'"{policy}" is not a valid retryOn policy')


def _check_rewrite(rewrite: dict, path: str, errs: Errs) -> None:
    regex_rewrite = rewrite.get("uriRegexRewrite")
    if rewrite.get("uri") and regex_rewrite is not None:
        errs.add(path, "rewrite may only contain one of URI or UriRegexRewrite")
    elif not rewrite.get("uri") and regex_rewrite is None and not rewrite.get("authority"):
        errs.add(path, "rewrite must specify at least one of URI, UriRegexRewrite, or authority. "
                       "Only one of URI or UriRegexRewrite may be specified")
    if regex_rewrite is not None:
        at = child(path, "uriRegexRewrite")
        if not regex_rewrite.get("match") or not regex_rewrite.get("rewrite"):
            errs.add(at, "UriRegexRewrite requires both Rewrite and Match fields to be specified")
        else:
            errs.add(child(at, "match"), regex_error(regex_rewrite["match"], "HTTPRewrite.UriRegexRewrite.Match"))


def _check_authority_rewrite(route: dict, path: str, errs: Errs) -> None:
    current = route.get("rewrite", {}).get("authority", "")
    request = route.get("headers", {}).get("request", {})
    for op in ("set", "add"):
        for name, value in request.get(op, {}).items():
            if not is_authority_header(name):
                continue
            if current:
                errs.add(key(child(path, f"headers.request.{op}"), name),
                         f'authority header cannot be set multiple times: have "{current}", attempting to set "{value}"')
                return
            current = value


# ---- destinations ----------------------------------------------------------------------------------------------


def check_weighted_destinations(routes: list[dict], path: str, errs: Errs, with_headers: bool = False) -> None:
    total = 0
    for i, dest in enumerate(routes):
        at = index(path, i)
        if with_headers:
            check_header_operations(dest.get("headers", {}), child(at, "headers"), errs)
        check_destination(dest["destination"], child(at, "destination"), errs)
        weight = dest.get("weight", 0)
        if weight < 0:
            errs.add(child(at, "weight"), f"weight {weight} < 0")
        elif weight > 100:
            errs.add(child(at, "weight"), percent_error(weight))
        total += weight
    if len(routes) > 1 and total != 100:
        errs.add(path, f"total destination weight {total} != 100")


def check_destination(dest: dict, path: str, errs: Errs) -> None:
    host = dest.get("host", "")
    if host == "*":
        errs.add(child(path, "host"), f"invalid destination host {host}")
    else:
        errs.add(child(path, "host"), wildcard_domain_error(host))
    subset = dest.get("subset", "")
    if subset:
        errs.add(child(path, "subset"), subset_name_error(subset))
    if "port" in dest:
        errs.add(child(path, "port.number"), port_error(dest["port"].get("number", 0)))


def subset_name_error(name: str) -> str | None:
    if not name:
        return "subset name cannot be empty"
    if not is_dns1123_label(name):
        return f"subset name is invalid: {name}"
    return None


# ---- TLS and TCP -----------------------------------------------------------------------------------------------


def _check_tls_route(route: dict, path: str, spec: dict, errs: Errs) -> None:
    matches = route.get("match", [])
    if not matches:
        errs.add(child(path, "match"), "TLS route must have at least one match condition")
    gateways = spec.get("gateways", [])
    for j, m in enumerate(matches):
        at = index(child(path, "match"), j)
        sni_hosts = m.get("sniHosts", [])
        if not sni_hosts:
            errs.add(child(at, "sniHosts"), "TLS match must have at least one SNI host")
        for k, sni in enumerate(sni_hosts):
            errs.add(index(child(at, "sniHosts"), k), _sni_host_error(sni, spec, MESH not in gateways))
        _check_l4_match(m, at, errs)
    if not route.get("route"):
        errs.add(child(path, "route"), "TLS route is required")
    check_weighted_destinations(route.get("route", []), child(path, "route"), errs)


def _sni_host_error(sni: str, spec: dict, to_gateway: bool) -> str | None:
    err = gateway_bound_domain_error(True, sni) if to_gateway else wildcard_domain_error(sni)
    if err:
        # An IP as SNI goes against the spec but Istio only warns about it.
        return None if is_ip(sni) else err
    hosts = spec.get("hosts", [])
    if any(host_subset_of(sni, h) for h in hosts):
        return None
    return f'SNI host "{sni}" is not a compatible subset of any of the virtual service hosts: [{", ".join(hosts)}]'


def _check_tcp_route(route: dict, path: str, errs: Errs) -> None:
    for j, m in enumerate(route.get("match", [])):
        _check_l4_match(m, index(child(path, "match"), j), errs)
    if not route.get("route"):
        errs.add(child(path, "route"), "TCP route is required")
    check_weighted_destinations(route.get("route", []), child(path, "route"), errs)


def _check_l4_match(m: dict, path: str, errs: Errs) -> None:
    for k, subnet in enumerate(m.get("destinationSubnets", [])):
        errs.add(index(child(path, "destinationSubnets"), k), ip_subnet_error(subnet))
    if m.get("port", 0) != 0:
        errs.add(child(path, "port"), port_error(m["port"]))
    check_istio_labels(m.get("sourceLabels", {}), child(path, "sourceLabels"), errs)
    check_gateway_names(m.get("gateways", []), child(path, "gateways"), errs)
