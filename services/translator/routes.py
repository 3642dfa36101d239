"""RDS: RouteConfigurations, as istiod 1.7's httproute.go and route/route.go build them.

Sidecar outbound routes are named after the listener (`"80"`, or `"<fqdn>:80"` for a sniffed port bound to a
service VIP); their virtual hosts come from the visible services and mesh-bound VirtualServices, with 1.7's
domain lists (every host form with and without `:port`). Inbound and gateway route configs live here too.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import previous_priorities_config_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2

from . import incremental, pb, protocol
from .clusters import parse_subset_key, subset_key
from .model import PASSTHROUGH, UNSPECIFIED_IP, Config, Service, host_matches, is_ip
from .push_context import MALFORMED, MESH_GATEWAY, ProxyView, PushContext, duration

RouteConfiguration = route_pb2.RouteConfiguration
ALLOW_ANY = "allow_any"
BLOCK_ALL = "block_all"
DEFAULT_ROUTE_NAME = "default"
INBOUND_VHOST_PREFIX = "inbound|http|"
REGEX_PROGRAM_SIZE = 1024
HTTP_STATUS_CODES = frozenset(
    [100, 101, 102, 103] + list(range(200, 209)) + [226] + list(range(300, 309)) + list(range(400, 419))
    + [421, 422, 423, 424, 425, 426, 428, 429, 431, 451] + list(range(500, 509)) + [510, 511])

_ZERO = pb.duration(0)
_PREVIOUS_HOSTS = pb.pack(previous_hosts_pb2.PreviousHostsPredicate())
_PREVIOUS_PRIORITIES = pb.pack(previous_priorities_config_pb2.PreviousPrioritiesConfig(update_frequency=2))


# ---------------------------------------------------------------------------------------------- matchers
def regex_matcher(regex: str) -> regex_pb2.RegexMatcher:
    """1.7 shape: `safe_regex {google_re2 {max_program_size 1024}, regex}` (istioctl prints it in MATCH)."""
    m = regex_pb2.RegexMatcher(regex=regex)
    m.google_re2.max_program_size.value = REGEX_PROGRAM_SIZE
    return m


def string_matcher(sm: dict) -> string_pb2.StringMatcher | None:
    if "exact" in sm:
        return string_pb2.StringMatcher(exact=sm["exact"])
    if "prefix" in sm:
        return string_pb2.StringMatcher(prefix=sm["prefix"])
    if "regex" in sm:
        return string_pb2.StringMatcher(safe_regex=regex_matcher(sm["regex"]))
    return None


def header_matcher(name: str, sm: dict | None) -> rc.HeaderMatcher:
    out = rc.HeaderMatcher(name=name)
    # An empty match, or the regex "*", means "header present".
    if not sm or sm.get("regex") == "*" or string_matcher(sm) is None:
        out.present_match = True
        return out
    out.string_match.CopyFrom(string_matcher(sm))
    return out


def translate_match(m: dict | None) -> rc.RouteMatch:
    out = rc.RouteMatch(prefix="/")
    if m is None:
        return out
    headers = []
    for name, sm in (m.get("headers") or {}).items():
        headers.append(header_matcher(name, sm))
    for name, sm in (m.get("withoutHeaders") or {}).items():
        h = header_matcher(name, sm)
        h.invert_match = True
        headers.append(h)
    headers.sort(key=lambda h: h.name)
    which, value = _path_specifier(m)
    if which == "path":
        out.path = value
    elif which == "prefix":
        out.prefix = value
    else:
        out.safe_regex.CopyFrom(regex_matcher(value))
    out.case_sensitive.value = not m.get("ignoreUriCase", False)
    for key, header in (("method", ":method"), ("authority", ":authority"), ("scheme", ":scheme")):
        if m.get(key):
            headers.append(header_matcher(header, m[key]))
    out.headers.extend(headers)
    for name, sm in (m.get("queryParams") or {}).items():
        q = out.query_parameters.add(name=name)
        smm = string_matcher(sm or {}) if sm and sm.get("regex") != "*" else None
        if smm is None:
            q.present_match = True
        else:
            q.string_match.CopyFrom(smm)
    return out


def _path_specifier(m: dict | None) -> tuple[str, str]:
    """The RouteMatch path_specifier of a VirtualService match: (`path` | `prefix` | `safe_regex`, its text)."""
    uri = m.get("uri") if m is not None else None
    if uri:
        if "exact" in uri:
            return "path", uri["exact"]
        if "prefix" in uri:
            return "prefix", uri["prefix"]
        if "regex" in uri:
            return "safe_regex", uri["regex"]
    return "prefix", "/"


def is_catch_all_match(m: dict) -> bool:
    uri = m.get("uri") or {}
    catch_all = uri.get("prefix") == "/" or uri.get("regex") == "*"
    return catch_all and not m.get("headers") and not m.get("queryParams")


# ---------------------------------------------------------------------------------------------- actions
_DEFAULT_RETRY = rc.RetryPolicy(
    retry_on="connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
    retriable_status_codes=[503], host_selection_retry_max_attempts=5)
_DEFAULT_RETRY.num_retries.value = 2
_DEFAULT_RETRY.retry_host_predicate.add(name="envoy.retry_host_predicates.previous_hosts",
                                        typed_config=_PREVIOUS_HOSTS)


def retry_policy(retries: dict | None) -> rc.RetryPolicy | None:
    """A route's retry policy; with no `retries`, Istio ≤1.27's default: 2 retries on connect-failure,
    refused-stream, unavailable, cancelled, 503."""
    out = rc.RetryPolicy()
    return out if set_retry_policy(out, retries) else None


def set_retry_policy(out: rc.RetryPolicy, retries: dict | None) -> bool:
    """Writes a VirtualService `retries` block onto `out` (a route's own field: no policy built and copied in);
    False, leaving `out` untouched, when it asks for no retries."""
    if retries is None:
        out.CopyFrom(_DEFAULT_RETRY)
        return True
    attempts = int(retries.get("attempts") or 0)
    if attempts <= 0:
        return False
    out.CopyFrom(_DEFAULT_RETRY)
    out.num_retries.value = attempts
    retry_on = retries.get("retryOn")
    if retry_on:
        words, codes = [], []
        for part in retry_on.split(","):
            part = part.strip()
            if not part:
                continue
            if part.isdigit() and int(part) in HTTP_STATUS_CODES:
                codes.append(int(part))
            else:
                words.append(part)
        out.retry_on = ",".join(words)
        del out.retriable_status_codes[:]
        out.retriable_status_codes.extend(codes)
    ptt = duration(retries.get("perTryTimeout"))
    if ptt is not None:
        pb.set_duration(out.per_try_timeout, ptt)
    remote = retries.get("retryRemoteLocalities")
    if remote is True or (isinstance(remote, dict) and remote.get("value")):
        out.retry_priority.name = "envoy.retry_priorities.previous_priorities"
        out.retry_priority.typed_config.CopyFrom(_PREVIOUS_PRIORITIES)
    return True


def set_timeout(action: rc.RouteAction, timeout: float) -> None:
    """Istio's setTimeout. Once a route has `max_stream_duration`, Envoy's router uses the "new" timeouts and
    no longer enforces `timeout` itself, so a non-zero timeout must also be the stream's max duration (else
    the route never times out); `grpc_timeout_header_max` caps a gRPC client's own deadline at the same value.
    Zero means no timeout: only the gRPC header cap (0 = the client's deadline, unbounded) is written."""
    pb.set_duration(action.timeout, timeout)
    pb.set_duration(action.max_stream_duration.grpc_timeout_header_max, timeout)
    if timeout:
        pb.set_duration(action.max_stream_duration.max_stream_duration, timeout)


def _header_ops(headers: dict | None) -> tuple[list, list, list, list]:
    """(request adds, request removes, response adds, response removes); each add list sorted by key."""
    req = (headers or {}).get("request") or {}
    resp = (headers or {}).get("response") or {}

    def adds(section: dict) -> list[base_pb2.HeaderValueOption]:
        out = []
        for key, action in (("set", base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD),
                            ("add", base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD)):
            for k, v in sorted((section.get(key) or {}).items()):
                if k.startswith(":") or k.lower() == "host":
                    continue
                out.append(base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=str(v)),
                                                      append_action=action))
        return out

    return adds(req), list(req.get("remove") or []), adds(resp), list(resp.get("remove") or [])


def _add_header_ops(msg, headers: dict | None) -> None:
    """Writes a VirtualService `headers` block onto a Route or ClusterWeight (most rules have none)."""
    if not headers:
        return
    req_add, req_rm, resp_add, resp_rm = _header_ops(headers)
    _copy_header_ops(msg, req_add, req_rm, resp_add, resp_rm)


def _copy_header_ops(msg, req_add, req_rm, resp_add, resp_rm) -> None:
    for field, values in ((msg.request_headers_to_add, req_add), (msg.request_headers_to_remove, req_rm),
                          (msg.response_headers_to_add, resp_add), (msg.response_headers_to_remove, resp_rm)):
        if values:
            field.extend(values)


_ACTION_BASES: dict[tuple[str, str], rc.RouteAction] = {}


def _action_base(retries: dict | None, timeout) -> rc.RouteAction:
    """A VirtualService route's action with its retry policy and timeouts written, built once per distinct
    `retries` and `timeout` (repr keeps dict order: equal text, equal content): one copy instead of the fields."""
    key = (repr(retries), repr(timeout))
    base = _ACTION_BASES.get(key)
    if base is None:
        base = rc.RouteAction()
        set_retry_policy(base.retry_policy, retries)
        set_timeout(base, duration(timeout, 0.0) or 0.0)
        if len(_ACTION_BASES) > 10_000:
            _ACTION_BASES.clear()
        _ACTION_BASES[key] = base
    return base


def _fractional(pct: float) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(numerator=int(round(pct * 10000)),
                                         denominator=percent_pb2.FractionalPercent.MILLION)


def _percent_value(p) -> float | None:
    if p is None:
        return None
    if isinstance(p, dict):
        return float(p.get("value") or 0)
    return float(p)


def translate_fault(fault: dict) -> fault_pb2.HTTPFault | None:
    out = fault_pb2.HTTPFault()
    delay = fault.get("delay")
    if delay and delay.get("fixedDelay"):
        d = out.delay
        pct = _percent_value(delay.get("percentage"))
        if pct is not None:
            d.percentage.CopyFrom(_fractional(pct))
        else:
            d.percentage.CopyFrom(percent_pb2.FractionalPercent(numerator=int(delay.get("percent") or 0)))
        pb.set_duration(d.fixed_delay, duration(delay["fixedDelay"], 0) or 0)
    abort = fault.get("abort")
    if abort and (abort.get("httpStatus") or abort.get("grpcStatus")):
        a = out.abort
        pct = _percent_value(abort.get("percentage"))
        if pct is not None:
            a.percentage.CopyFrom(_fractional(pct))
        if abort.get("httpStatus"):
            a.http_status = int(abort["httpStatus"])
        else:
            a.grpc_status = _GRPC_CODES.get(str(abort["grpcStatus"]).upper(), 2)
    if not out.HasField("delay") and not out.HasField("abort"):
        return None
    return out


_GRPC_CODES = {n: i for i, n in enumerate(
    ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
     "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
     "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"])}


def translate_cors(cors: dict) -> cors_pb2.CorsPolicy:
    out = cors_pb2.CorsPolicy()
    for sm in cors.get("allowOrigins") or []:
        m = string_matcher(sm)
        if m is not None:
            out.allow_origin_string_match.append(m)
    for origin in cors.get("allowOrigin") or []:  # deprecated exact list
        out.allow_origin_string_match.append(string_pb2.StringMatcher(exact=origin))
    out.filter_enabled.default_value.numerator = 100
    out.filter_enabled.default_value.denominator = percent_pb2.FractionalPercent.HUNDRED
    if "allowCredentials" in cors:
        ac = cors["allowCredentials"]
        out.allow_credentials.value = bool(ac.get("value") if isinstance(ac, dict) else ac)
    out.allow_headers = ",".join(cors.get("allowHeaders") or [])
    out.allow_methods = ",".join(cors.get("allowMethods") or [])
    out.expose_headers = ",".join(cors.get("exposeHeaders") or [])
    if cors.get("maxAge"):
        out.max_age = str(int(duration(cors["maxAge"], 0) or 0))
    return out


def hash_policy(ch: dict | None) -> rc.RouteAction.HashPolicy | None:
    if not ch:
        return None
    if ch.get("httpHeaderName"):
        return rc.RouteAction.HashPolicy(header=rc.RouteAction.HashPolicy.Header(header_name=ch["httpHeaderName"]))
    if ch.get("httpCookie"):
        c = ch["httpCookie"]
        hp = rc.RouteAction.HashPolicy()
        hp.cookie.name = c.get("name", "")
        hp.cookie.path = c.get("path", "")
        ttl = duration(c.get("ttl"))
        if ttl is not None:
            pb.set_duration(hp.cookie.ttl, ttl)
        return hp
    if ch.get("useSourceIp"):
        hp = rc.RouteAction.HashPolicy()
        hp.connection_properties.source_ip = True
        return hp
    if ch.get("httpQueryParameterName"):
        hp = rc.RouteAction.HashPolicy()
        hp.query_parameter.name = ch["httpQueryParameterName"]
        return hp
    return None


def _port_level_hash(policy: dict | None, port: int | None) -> dict | None:
    if not policy or port is None:
        return None
    for pls in policy.get("portLevelSettings") or []:
        if int((pls.get("port") or {}).get("number") or 0) == port:
            return (pls.get("loadBalancer") or {}).get("consistentHash")
    return None


def destination_hash(push: PushContext, view: ProxyView, dest: dict, port: int | None) -> dict | None:
    """Consistent-hash key for a route destination: subset port-level → subset → DR port-level → DR."""
    svc = view.scope.services_by_host.get(dest.get("host", ""))
    if svc is None:
        return None
    dr = push.destination_rule(view.namespace, svc)
    if dr is None:
        return None
    tp = dr.spec.get("trafficPolicy") or {}
    dport = int((dest.get("port") or {}).get("number") or 0) or None
    ch = (tp.get("loadBalancer") or {}).get("consistentHash")
    pls = _port_level_hash(tp, dport)
    for subset in dr.spec.get("subsets") or []:
        if subset.get("name") == dest.get("subset"):
            stp = subset.get("trafficPolicy") or {}
            sp = _port_level_hash(stp, dport)
            if sp:
                return sp
            sh = (stp.get("loadBalancer") or {}).get("consistentHash")
            if sh:
                return sh
    return pls or ch


def destination_cluster(dest: dict, service: Service | None, listener_port: int) -> str:
    """Istio's GetDestinationCluster: explicit port, else the service's only port, else the listener port."""
    port = listener_port
    if dest.get("port") and (dest["port"].get("number")):
        port = int(dest["port"]["number"])
    elif service is not None and len(service.ports) == 1:
        port = service.ports[0].port
    return subset_key("outbound", dest.get("subset") or "", dest.get("host", ""), port)


def _operation(m: dict | None, cluster: str | None, vs_name: str, port: int) -> str:
    """A route's decorator: `<host>:<port><path>` of the route's one `cluster`, else `<vs>:<port><path>`; the
    path from the match as translate_match writes it (known here: no read back from the route)."""
    which, value = _path_specifier(m)
    path = value + "*" if which == "prefix" else value
    parsed = parse_subset_key(cluster) if cluster else None
    if parsed:
        return f"{parsed[2]}:{parsed[3]}{path}"
    return f"{vs_name}:{port}{path}"


def source_match(m: dict | None, view: ProxyView, gateways: set[str]) -> bool:
    if m is None:
        return True
    if m.get("gateways"):
        return any(g in gateways for g in m["gateways"])
    labels = m.get("sourceLabels") or {}
    if any(view.labels.get(k) != v for k, v in labels.items()):
        return False
    return not m.get("sourceNamespace") or m["sourceNamespace"] == view.namespace


def translate_route(push: PushContext, view: ProxyView, vs: Config, rule: dict, m: dict | None, port: int,
                    registry: dict[str, Service], gateways: set[str]) -> rc.Route | None:
    if not source_match(m, view, gateways):
        return None
    if m is not None and m.get("port") and int(m["port"]) != port:
        return None
    out = rc.Route(match=translate_match(m))
    out.metadata.CopyFrom(pb.istio_metadata({"config": vs.meta_path}))
    name = rule.get("name") or ""
    if m is not None and m.get("name"):
        name = f"{name}.{m['name']}"
    out.name = name
    _add_header_ops(out, rule.get("headers"))
    cluster = None  # the route action's one cluster, if it has one
    redirect = rule.get("redirect")
    if redirect is not None:
        code = int(redirect.get("redirectCode") or 0)
        codes = {0: rc.RedirectAction.MOVED_PERMANENTLY, 301: rc.RedirectAction.MOVED_PERMANENTLY,
                 302: rc.RedirectAction.FOUND, 303: rc.RedirectAction.SEE_OTHER,
                 307: rc.RedirectAction.TEMPORARY_REDIRECT, 308: rc.RedirectAction.PERMANENT_REDIRECT}
        if code not in codes:
            return None
        r = out.redirect
        r.response_code = codes[code]
        if redirect.get("authority"):
            r.host_redirect = redirect["authority"]
        if redirect.get("uri"):
            r.path_redirect = redirect["uri"]
        if redirect.get("scheme"):
            r.scheme_redirect = redirect["scheme"]
        if redirect.get("port"):
            r.port_redirect = int(redirect["port"])
    elif rule.get("directResponse") is not None:
        dr_ = rule["directResponse"]
        out.direct_response.status = int(dr_.get("status") or 200)
        body = dr_.get("body") or {}
        if body.get("string") is not None:
            out.direct_response.body.inline_string = body["string"]
        elif body.get("bytes") is not None:
            import base64

            out.direct_response.body.inline_bytes = base64.b64decode(body["bytes"])
    else:
        action = out.route
        action.CopyFrom(_action_base(rule.get("retries"), rule.get("timeout")))
        rewrite = rule.get("rewrite")
        if rewrite:
            if rewrite.get("uri"):
                action.prefix_rewrite = rewrite["uri"]
            if rewrite.get("uriRegexRewrite"):
                rr = rewrite["uriRegexRewrite"]
                action.regex_rewrite.pattern.CopyFrom(regex_matcher(rr.get("match", "")))
                action.regex_rewrite.substitution = rr.get("rewrite", "")
            if rewrite.get("authority"):
                action.host_rewrite_literal = rewrite["authority"]
        mirrors = []
        if rule.get("mirror"):
            pct = _percent_value(rule.get("mirrorPercentage"))
            if pct is None and rule.get("mirrorPercent") is not None:
                pct = float(_percent_value(rule["mirrorPercent"]) or 0)
            mirrors.append((rule["mirror"], pct))
        for mm in rule.get("mirrors") or []:
            mirrors.append((mm.get("destination") or {}, _percent_value(mm.get("percentage"))))
        for dest, pct in mirrors:
            if pct is not None and pct <= 0:
                continue
            mp = action.request_mirror_policies.add(
                cluster=destination_cluster(dest, registry.get(dest.get("host", "")), port))
            if pct is None:
                mp.runtime_fraction.default_value.numerator = 100
            else:
                mp.runtime_fraction.default_value.CopyFrom(_fractional(pct))
            mp.trace_sampled.value = False
        weighted = 0
        first: tuple[str, dict | None] = ("", None)  # the first weighted destination's cluster and headers
        destinations = rule.get("route") or []
        for d in destinations:
            weight = int(d.get("weight") or 0)
            if weight == 0:
                if len(destinations) == 1:
                    weight = 100
                else:
                    continue
            dest = d.get("destination") or {}
            name = destination_cluster(dest, registry.get(dest.get("host", "")), port)
            # added in place (no message built and copied in); a lone one is replaced by `cluster` below
            cw = action.weighted_clusters.clusters.add(name=name, weight={"value": weight})
            _add_header_ops(cw, d.get("headers"))
            if not weighted:
                first = (name, d.get("headers"))
            weighted += 1
            hp = hash_policy(destination_hash(push, view, dest, port))
            if hp is not None:
                action.hash_policy.append(hp)
        if weighted == 1:
            cluster = action.cluster = first[0]  # the oneof: clears weighted_clusters
            _add_header_ops(out, first[1])  # a lone destination's header ops go on the route
        elif not weighted:
            action.cluster = pb.BLACKHOLE_CLUSTER
        if rule.get("corsPolicy"):
            out.typed_per_filter_config[pb.HTTP_CORS].Pack(translate_cors(rule["corsPolicy"]), deterministic=True)
    out.decorator.operation = _operation(m, cluster, vs.name, port)
    if rule.get("fault"):
        f = translate_fault(rule["fault"])
        if f is not None:
            out.typed_per_filter_config[pb.HTTP_FAULT].Pack(f, deterministic=True)
    return out


def routes_for_virtual_service(push: PushContext, view: ProxyView, vs: Config, registry: dict[str, Service],
                               port: int, gateways: set[str]) -> list[rc.Route]:
    """Istio's BuildHTTPRoutesForVirtualService; a VirtualService we cannot read yields no routes."""
    try:
        return _routes_for_virtual_service(push, view, vs, registry, port, gateways)
    except MALFORMED as e:
        push.report(f"VirtualService {vs.namespace}/{vs.name}", e)
        return []


def _routes_for_virtual_service(push: PushContext, view: ProxyView, vs: Config, registry: dict[str, Service],
                                port: int, gateways: set[str]) -> list[rc.Route]:
    """One route per match; a catch-all match ends the list."""
    out: list[rc.Route] = []
    for rule in vs.spec.get("http") or []:
        matches = rule.get("match") or []
        if not matches:
            r = translate_route(push, view, vs, rule, None, port, registry, gateways)
            if r is not None:
                out.append(r)
            break
        catch_all = next((m for m in matches if is_catch_all_match(m)), None)
        if catch_all is not None:
            r = translate_route(push, view, vs, rule, catch_all, port, registry, gateways)
            if r is not None:
                out.append(r)
                break
        for m in matches:
            r = translate_route(push, view, vs, rule, m, port, registry, gateways)
            if r is not None:
                out.append(r)
    return out


def _is_catch_all_route(r: rc.Route) -> bool:
    """istiod's IsCatchAllRoute: `/` prefix (or `.*` regex) with no header, query or metadata match."""
    m = r.match
    which = m.WhichOneof("path_specifier")
    path = (which == "prefix" and m.prefix == "/") or (which == "path_separated_prefix" and
                                                        m.path_separated_prefix == "/") \
        or (which == "safe_regex" and m.safe_regex.regex == ".*")
    return path and not m.headers and not m.query_parameters and not m.dynamic_metadata


def _catch_all_routes_last(vhost: rc.VirtualHost) -> None:
    """istiod's SortVHostRoutes (gateways only): stable, catch-all routes after all others."""
    routes = list(vhost.routes)
    ordered = [r for r in routes if not _is_catch_all_route(r)] + [r for r in routes if _is_catch_all_route(r)]
    if ordered != routes:
        del vhost.routes[:]
        vhost.routes.extend(ordered)


def default_route(cluster: str, operation: str, retry: bool = True) -> rc.Route:
    r = rc.Route()
    r.CopyFrom(_DEFAULT_ROUTES[retry])  # one copy instead of building the common part field by field
    r.decorator.operation = operation
    r.route.cluster = cluster
    return r


def _default_route_base(retry: bool) -> rc.Route:
    r = rc.Route(name=DEFAULT_ROUTE_NAME, match=rc.RouteMatch(prefix="/"))
    a = r.route
    a.timeout.CopyFrom(_ZERO)
    a.max_stream_duration.grpc_timeout_header_max.CopyFrom(_ZERO)
    if retry:
        a.retry_policy.CopyFrom(_DEFAULT_RETRY)
    return r


_DEFAULT_ROUTES = {retry: _default_route_base(retry) for retry in (False, True)}


# ---------------------------------------------------------------------------------------------- domains
@lru_cache(maxsize=1024)
def _domain_suffixes(proxy_domain: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """For each suffix of the proxy's domain, longest first (the last k labels): the suffix, it with a leading
    dot, and its shorter forms at its inner dots, longest first (the alt-host variants)."""
    labels = proxy_domain.split(".")
    out = []
    for k in range(len(labels), 0, -1):
        shared = ".".join(labels[-k:])
        inner = tuple(shared[:i] for i in range(len(shared) - 1, 0, -1) if shared[i] == ".")
        out.append((shared, "." + shared, inner))
    return tuple(out)


def alt_hosts(hostname: str, port: int, proxy_domain: str) -> list[str]:
    """1.7 generateAltVirtualHosts: the unique part, then unique + each shorter shared suffix, with :port. The
    shared part is the longest run of trailing labels the hostname has in common with the proxy's domain."""
    for shared, dotted, inner in _domain_suffixes(proxy_domain):
        if hostname.endswith(dotted):
            uniq = hostname[:-len(dotted)]
        elif hostname == shared:
            uniq = ""
        else:
            continue
        if not shared:
            return []
        out = [uniq, f"{uniq}:{port}"]
        for prefix in inner:
            variant = f"{uniq}.{prefix}"
            out += [variant, f"{variant}:{port}"]
        return out
    return []


def vhost_domains(service: Service, port: int, proxy_domain: str) -> list[str]:
    domains = [service.hostname, f"{service.hostname}:{port}"]
    domains += alt_hosts(service.hostname, port, proxy_domain)
    if service.resolution == PASSTHROUGH and service.registry == "Kubernetes":
        domains += ["*." + d for d in domains]
    addr = service.address
    if addr and addr != UNSPECIFIED_IP and "/" not in addr:
        domains += [addr, f"{addr}:{port}"] if is_ip(addr) else []
    return domains


# ---------------------------------------------------------------------------------------------- sidecar RDS
def _catch_all_vhost(view: ProxyView) -> rc.VirtualHost:
    if view.scope.outbound_policy == "REGISTRY_ONLY":
        vh = rc.VirtualHost(name=BLOCK_ALL, domains=["*"], include_request_attempt_count=True)
        r = vh.routes.add(name=BLOCK_ALL, match=rc.RouteMatch(prefix="/"))
        r.direct_response.status = 502
        return vh
    cluster = pb.PASSTHROUGH_CLUSTER
    if view.scope.egress_proxy:
        cluster = destination_cluster(view.scope.egress_proxy, None, 0)
    vh = rc.VirtualHost(name=ALLOW_ANY, domains=["*"], include_request_attempt_count=True)
    r = vh.routes.add(name=ALLOW_ANY, match=rc.RouteMatch(prefix="/"))
    r.route.cluster = cluster
    r.route.timeout.CopyFrom(_ZERO)
    r.route.max_stream_duration.grpc_timeout_header_max.CopyFrom(_ZERO)
    return vh


def _is_http_or_sniffed(p) -> bool:
    return protocol.is_http(p.protocol) or protocol.is_auto(p.protocol)


def _default_service_route(push: PushContext, view: ProxyView, svc: Service, port: int) -> rc.Route:
    """The route of a service no VirtualService covers, with its DestinationRule's consistent hash."""
    r = default_route(subset_key("outbound", "", svc.hostname, port), f"{svc.hostname}:{port}/*")
    dr = push.destination_rule(view.namespace, svc)
    if dr is not None:
        tp = dr.spec.get("trafficPolicy") or {}
        ch = _port_level_hash(tp, port) if _port_level_hash(tp, port) else \
            (tp.get("loadBalancer") or {}).get("consistentHash")
        hp = hash_policy(ch)
        if hp is not None:
            r.route.hash_policy.append(hp)
    return r


class VirtualHostSpec(NamedTuple):
    """An outbound virtual host's parts: route configurations add the message in place (`add_virtual_host`), so
    its routes are copied once, not into a VirtualHost and then that into the configuration."""

    name: str
    domains: list[str]
    routes: list[rc.Route]


def add_virtual_host(rcfg: RouteConfiguration, spec: VirtualHostSpec) -> None:
    rcfg.virtual_hosts.add(name=spec.name, domains=spec.domains, routes=spec.routes,
                           include_request_attempt_count=True)


def outbound_virtual_hosts(push: PushContext, view: ProxyView, port: int) -> list[VirtualHostSpec]:
    """All virtual hosts of listener port `port` (Istio's buildSidecarOutboundVirtualHosts), memoised."""
    key = ("vhosts", view.key, port)
    hit = push.cache.get(key)
    if hit is not None:
        return hit
    listener = view.scope.listener_for_rds(port)
    if listener is None:
        push.cache[key] = []
        return []
    env = incremental.route_env(push, view)  # with the VirtualService, what a memoised route unit depends on
    registry: dict[str, Service] = {}
    for svc in listener.services:
        if svc.port_by_number(port) is not None and svc.hostname not in registry:
            registry[svc.hostname] = svc
    wrappers = []  # (vs hosts not in registry, services, routes)
    gateways = {MESH_GATEWAY}
    covered: set[str] = set()
    for vs in listener.virtual_services:
        hosts, services = [], []
        for h in vs.hosts:
            if not h.startswith("*"):
                if h in registry:
                    services.append(registry[h])
                else:
                    hosts.append(h)
            else:
                found = [s for name, s in registry.items() if host_matches(name, h)]
                if found:
                    services.extend(found)
                else:
                    hosts.append(h)
        services = [s for s in services if _is_http_or_sniffed(s.port_by_number(port))]
        if not services and port != 80:
            continue  # non-registry hosts only get vhosts on port 80 (istiod's "gross hack")
        unit_key = ("vs-routes", view.key, env, incremental.vs_key(push, vs), port)
        routes = incremental.unit(push, unit_key,
                                  lambda vs=vs: routes_for_virtual_service(push, view, vs, registry, port, gateways))
        if not routes:
            continue
        wrappers.append((hosts, services, routes))
        covered.update(s.hostname for s in services)
    for name, svc in registry.items():
        if name in covered or svc.resolution == "Alias":
            continue
        p = svc.port_by_number(port)
        if not _is_http_or_sniffed(p):
            continue
        unit_key = ("default-route", view.key, env, svc.hostname, svc.namespace, port)
        r = incremental.unit(push, unit_key, lambda svc=svc: _default_service_route(push, view, svc, port))
        wrappers.append(([], [svc], [r]))
    vhosts: list[VirtualHostSpec] = []
    names: set[str] = set()
    used_domains: set[str] = set()
    for hosts, services, routes in wrappers:
        for h in hosts:
            name = f"{h}:{port}"
            if name in names:
                continue
            names.add(name)
            domains = [d for d in (h, name) if d not in used_domains]
            used_domains.update(domains)
            vhosts.append(VirtualHostSpec(name, domains, routes))
        for svc in services:
            name = f"{svc.hostname}:{port}"
            if name in names:
                continue
            names.add(name)
            domains = [d for d in vhost_domains(svc, port, view.dns_domain) if d not in used_domains]
            used_domains.update(domains)
            vhosts.append(VirtualHostSpec(name, domains, routes))
    vhosts.sort(key=lambda v: v.name)  # names are unique
    push.cache[key] = vhosts
    return vhosts


def sidecar_route_config(push: PushContext, view: ProxyView, route_name: str) -> RouteConfiguration:
    """Route `"<port>"` (every vhost on the port + catch-all) or `"<fqdn>:<port>"` (that service's vhost)."""
    host, sep, port_text = route_name.rpartition(":")
    sniffed = bool(sep)
    try:
        port = int(port_text if sniffed else route_name)
    except ValueError:
        return RouteConfiguration(name=route_name, validate_clusters=pb.wrappers_pb2.BoolValue(value=False))
    vhosts = outbound_virtual_hosts(push, view, port)
    if sniffed:
        picked = [v for v in vhosts if route_name in v.domains]
        vhosts = picked or vhosts
    rcfg = RouteConfiguration(name=route_name)
    rcfg.validate_clusters.value = False
    for v in vhosts:
        add_virtual_host(rcfg, v)
    if not sniffed:
        rcfg.virtual_hosts.append(_catch_all_vhost(view))
    return rcfg


# ---------------------------------------------------------------------------------------------- inbound
def inbound_route_config(cluster_name: str, service_port: int, hostname: str) -> RouteConfiguration:
    """The inline route of an inbound HTTP chain: one `*` vhost, default route to the inbound cluster."""
    rcfg = RouteConfiguration(name=cluster_name)
    rcfg.validate_clusters.value = False
    vh = rcfg.virtual_hosts.add(name=f"{INBOUND_VHOST_PREFIX}{service_port}", domains=["*"])
    vh.routes.append(default_route(cluster_name, f"{hostname}:{service_port}/*", retry=False))
    return rcfg


# ---------------------------------------------------------------------------------------------- gateway RDS
def gateway_route_config(push: PushContext, view: ProxyView, route_name: str, servers: list[tuple[Config, dict]],
                         port: int) -> RouteConfiguration:
    """`http.<port>`: one vhost per VirtualService host that a server on the port exposes.

    VirtualServices sharing a host on the gateway are merged as istiod does: their routes in creation order (the
    oldest's first), then every catch-all route moved to the end so that one VirtualService's `/` cannot hide
    another's more specific routes. (On the mesh gateway the oldest VirtualService takes the host instead:
    outbound_virtual_hosts.)"""
    rcfg = RouteConfiguration(name=route_name)
    rcfg.validate_clusters.value = False
    vhosts: dict[str, rc.VirtualHost] = {}
    merged: set[tuple[str, str, str]] = set()  # (vhost, VirtualService namespace, name) already in
    registry = {s.hostname: s for s in view.scope.services}
    https_redirect = False
    for gw, server in servers:
        gw_name = f"{gw.namespace}/{gw.name}"
        if (server.get("tls") or {}).get("httpsRedirect"):
            https_redirect = True
        server_hosts = []
        for h in server.get("hosts") or []:
            ns, sep, dns = h.partition("/")
            server_hosts.append((ns if sep else "*", dns if sep else h))
        for vs in push.mesh_virtual_services(view.namespace, gw_name):
            matched = []
            for vh in vs.hosts:
                for ns, sh in server_hosts:
                    if ns not in ("*", ".", vs.namespace) and not (ns == "." and vs.namespace == gw.namespace):
                        continue
                    if host_matches(sh, vh):
                        # The more specific of the two names is the vhost host.
                        matched.append(vh if (not vh.startswith("*") or len(vh) >= len(sh)) else sh)
            if not matched:
                continue
            routes = routes_for_virtual_service(push, view, vs, registry, port, {gw_name})
            if not routes:
                continue
            for h in matched:
                name = f"{h}:{port}"
                if (name, vs.namespace, vs.name) in merged:
                    continue  # the same VirtualService through a second server on the port: its routes are in
                merged.add((name, vs.namespace, vs.name))
                vhost = vhosts.get(name)
                if vhost is None:
                    vhost = vhosts[name] = rc.VirtualHost(name=name, domains=[h, f"{h}:{port}"])
                # a second VirtualService for the host adds its routes after the older ones' (istiod's merge)
                vhost.routes.extend(routes)
                if https_redirect:
                    vhost.require_tls = rc.VirtualHost.ALL
    for vhost in vhosts.values():
        _catch_all_routes_last(vhost)
    if not vhosts:
        vh = rc.VirtualHost(name=f"blackhole:{port}", domains=["*"])
        if https_redirect:
            vh.require_tls = rc.VirtualHost.ALL
        vhosts[vh.name] = vh
    rcfg.virtual_hosts.extend(sorted(vhosts.values(), key=lambda v: v.name))
    return rcfg
