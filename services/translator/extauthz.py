"""AuthorizationPolicy action CUSTOM → a shadow RBAC filter plus Envoy's ext_authz, as istiod's
pilot/pkg/security/authz/builder (builder.go, extauthz.go).

Per provider: an RBAC filter whose *shadow* rules (action DENY) hold the CUSTOM rules, named
`istio-ext-authz-<provider>-ns[…]-policy[…]-rule[…]` with stat prefix `istio_ext_authz_`; when one matches,
Envoy writes `istio_ext_authz_shadow_effective_policy_id` into the RBAC filter's dynamic metadata. The ext_authz
filter after it runs only when that id starts with `istio-ext-authz-<provider>` (`filter_enabled_metadata`), so
only requests a CUSTOM rule names are sent to the provider. These filters go before the DENY/ALLOW RBAC filters.

Providers come from MeshConfig `extensionProviders` (push_context reads the root namespace's `istio`
ConfigMap). An unknown or unusable provider, or more than one provider on a workload (istiod's default without
PILOT_ENABLE_MULTIPLE_CUSTOM_AUTHZ_PROVIDERS), turns the CUSTOM rules into DENY rules named
`…-deny-due-to-bad-CUSTOM-action` and is reported on `push.errors`. On TCP chains only gRPC providers apply
(network ext_authz); an HTTP provider is skipped there, as istiod does.
"""

from __future__ import annotations

from envoy.config.core.v3 import config_source_pb2, grpc_service_pb2, http_uri_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2 as http_pb
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.ext_authz.v3 import ext_authz_pb2 as net_pb
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from envoy.type.matcher.v3 import metadata_pb2, string_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import duration_pb2

from mizzen.services.mesh.duration import DurationError, parse_duration

from . import authz, pb

HTTP_EXT_AUTHZ = "envoy.filters.http.ext_authz"
NETWORK_EXT_AUTHZ = "envoy.filters.network.ext_authz"
MATCH_PREFIX = "istio-ext-authz"
STAT_PREFIX = "istio_ext_authz_"
SHADOW_EFFECTIVE_POLICY_ID = "shadow_effective_policy_id"
BAD_SUFFIX = "-deny-due-to-bad-CUSTOM-action"
DEFAULT_TIMEOUT = 600.0  # timeoutOrDefault


class ProviderError(ValueError):
    pass


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def lookup_cluster(push, service: str, port: int) -> tuple[str, str]:
    """model.LookupCluster: `ns/host` or a host that exactly one namespace has → (hostname, outbound cluster)."""
    if not service:
        raise ProviderError("service must not be empty")
    if service.count("/") == 1:
        ns, name = service.split("/")
        svc = (push.services_by_host.get(name) or {}).get(ns)
        if svc is not None:
            return svc.hostname, f"outbound|{port}||{svc.hostname}"
    else:
        by_ns = push.services_by_host.get(service) or {}
        if len(by_ns) == 1:
            svc = next(iter(by_ns.values()))
            return svc.hostname, f"outbound|{port}||{svc.hostname}"
        if len(by_ns) > 1:
            raise ProviderError(f"found {service} in multiple namespaces {sorted(by_ns)}, specify the namespace "
                                "explicitly in the format of <Namespace>/<Hostname>")
    raise ProviderError(f"could not find service {service} in Istio service registry")


def _headers(values) -> string_pb2.ListStringMatcher | None:
    """generateHeaders: `*x` suffix, `x*` prefix, else exact; all case-insensitive."""
    if not values:
        return None
    out = string_pb2.ListStringMatcher()
    for h in values:
        if h.startswith("*"):
            out.patterns.add(suffix=h[1:], ignore_case=True)
        elif h.endswith("*"):
            out.patterns.add(prefix=h[:-1], ignore_case=True)
        else:
            out.patterns.add(exact=h, ignore_case=True)
    return out


def _enabled_metadata(filter_name: str, provider: str) -> metadata_pb2.MetadataMatcher:
    m = metadata_pb2.MetadataMatcher(filter=filter_name)
    m.path.add(key=STAT_PREFIX + SHADOW_EFFECTIVE_POLICY_ID)
    m.value.string_match.prefix = f"{MATCH_PREFIX}-{provider}"
    return m


def _body(cfg: dict | None) -> http_pb.BufferSettings | None:
    if not cfg:
        return None
    return http_pb.BufferSettings(max_request_bytes=int(cfg.get("maxRequestBytes") or 0),
                                  allow_partial_message=bool(cfg.get("allowPartialMessage")),
                                  pack_as_bytes=bool(cfg.get("packAsBytes")))


def _common(push, p: dict) -> tuple[str, str, duration_pb2.Duration, http_status_pb2.HttpStatus | None]:
    port = p.get("port") or 0
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ProviderError(f"port must be in the range [1, 65535], found: {port}")
    hostname, cluster = lookup_cluster(push, str(p.get("service") or ""), port)
    try:
        timeout = parse_duration(p["timeout"]) if p.get("timeout") else DEFAULT_TIMEOUT
    except DurationError as e:
        raise ProviderError(str(e)) from None
    status = None
    if p.get("statusOnError"):
        status = http_status_pb2.HttpStatus(code=int(p["statusOnError"]))
    return hostname, cluster, _duration(timeout), status


def build_provider(push, p: dict) -> tuple[http_pb.ExtAuthz, net_pb.ExtAuthz | None]:
    """buildExtAuthzHTTP / buildExtAuthzGRPC: (HTTP filter config, TCP filter config or None)."""
    hostname, cluster, timeout, status = _common(push, p)
    fail_open = bool(p.get("failOpen"))
    if p["type"] == "grpc":
        grpc = grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=cluster, authority=hostname),
            timeout=timeout)
        http = http_pb.ExtAuthz(failure_mode_allow=fail_open, grpc_service=grpc,
                                transport_api_version=config_source_pb2.V3)
        if status is not None:
            http.status_on_error.CopyFrom(status)
        body = _body(p.get("includeRequestBodyInCheck"))
        if body is not None:
            http.with_request_body.CopyFrom(body)
        tcp = net_pb.ExtAuthz(stat_prefix=authz.TCP_STAT_PREFIX, failure_mode_allow=fail_open, grpc_service=grpc,
                              transport_api_version=config_source_pb2.V3)
        return http, tcp
    service = http_pb.HttpService(
        path_prefix=p.get("pathPrefix") or "",
        server_uri=http_uri_pb2.HttpUri(uri=f"http://{hostname}", cluster=cluster, timeout=timeout))
    extra = p.get("includeAdditionalHeadersInCheck") or {}
    for k in sorted(extra):
        service.authorization_request.headers_to_add.add(key=k, value=str(extra[k]))
    if p.get("headersToUpstreamOnAllow") or p.get("headersToDownstreamOnDeny") or p.get("headersToDownstreamOnAllow"):
        resp = service.authorization_response
        resp.SetInParent()
        for field, src in (("allowed_upstream_headers", "headersToUpstreamOnAllow"),
                           ("allowed_client_headers", "headersToDownstreamOnDeny"),
                           ("allowed_client_headers_on_success", "headersToDownstreamOnAllow")):
            m = _headers(p.get(src))
            if m is not None:
                getattr(resp, field).CopyFrom(m)
    http = http_pb.ExtAuthz(failure_mode_allow=fail_open, http_service=service, transport_api_version=config_source_pb2.V3)
    if status is not None:
        http.status_on_error.CopyFrom(status)
    allowed = _headers(p.get("includeRequestHeadersInCheck")) or _headers(p.get("includeHeadersInCheck"))
    if allowed is not None:
        http.allowed_headers.CopyFrom(allowed)
    body = _body(p.get("includeRequestBodyInCheck"))
    if body is not None:
        http.with_request_body.CopyFrom(body)
    return http, None


def _provider_name(cfg) -> str:
    return str((cfg.spec.get("provider") or {}).get("name") or "")


def _provider_rules(policies: list, tcp: bool) -> dict[str, tuple[rbac_pb2.RBAC, rbac_pb2.RBAC]]:
    """builder.build with IsCustomBuilder: provider → (enforced rules, dry-run rules), action DENY."""
    out: dict[str, tuple[rbac_pb2.RBAC, rbac_pb2.RBAC]] = {}
    for cfg in policies:
        provider = _provider_name(cfg)
        rules, shadow = out.setdefault(provider, (rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY),
                                                  rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)))
        target = shadow if authz.is_dry_run(cfg) else rules
        prefix = f"{MATCH_PREFIX}-{provider}-" if provider else f"{MATCH_PREFIX}-"
        spec_rules = cfg.spec.get("rules") or []
        for i, rule in enumerate(spec_rules):
            p = authz.rule_policy(rule or {}, tcp, rbac_pb2.RBAC.DENY, cfg.namespace)
            if p is not None:
                target.policies[prefix + authz.policy_name(cfg.namespace, cfg.name, i)].CopyFrom(p)
        if not spec_rules:
            target.policies[prefix + authz.policy_name(cfg.namespace, cfg.name, 0)].CopyFrom(authz._match_never())
    return out


def _bad_deny(rules: rbac_pb2.RBAC) -> rbac_pb2.RBAC:
    out = rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)
    for k, v in rules.policies.items():
        out.policies[k + BAD_SUFFIX].CopyFrom(v)
    return out


def _resolve(push, provider: str) -> tuple[http_pb.ExtAuthz, net_pb.ExtAuthz | None]:
    """getExtAuthz over processExtensionProvider, memoised per push (errors too)."""
    key = ("ext-authz-provider", provider)
    hit = push.cache.get(key)
    if hit is None:
        providers = push.mesh.extension_providers
        try:
            if not provider:
                raise ProviderError("no provider specified in authorization policy")
            if provider not in providers:
                raise ProviderError(f"available providers are {sorted(providers)} but found {provider!r}")
            hit = build_provider(push, providers[provider])
        except ProviderError as e:
            hit = e
        push.cache[key] = hit
    if isinstance(hit, ProviderError):
        raise hit
    return hit


def _report(push, policies: list, provider: str, err: Exception) -> None:
    for cfg in policies:
        if _provider_name(cfg) == provider:
            push.report(f"AuthorizationPolicy {cfg.namespace}/{cfg.name}",
                        ValueError(f"failed to process CUSTOM action for provider {provider}, will generate deny "
                                   f"configs: {err}"))


def _custom(policies: list) -> list:
    return [c for c in policies if (c.spec.get("action") or "ALLOW") == "CUSTOM"]


def _per_provider(push, policies: list, *, tcp: bool, many_error: str):
    """(provider, rules, dry-run rules, its resolved (HTTP, TCP) ext_authz configs) for each CUSTOM provider of
    `policies`; a provider that cannot be used is reported on its policies and comes with None: its traffic is
    denied. `many_error` (with `{providers}`) is istiod's text when a workload has more than one provider."""
    custom = _custom(policies)
    if not custom:
        return
    by_provider = _provider_rules(custom, tcp=tcp)
    many = len(by_provider) > 1
    for provider in sorted(by_provider):
        rules, shadow = by_provider[provider]
        try:
            if many:
                raise ProviderError(many_error.format(providers=sorted(by_provider)))
            resolved = _resolve(push, provider)
        except ProviderError as e:
            _report(push, custom, provider, e)
            resolved = None
        yield provider, rules, shadow, resolved


def http_filters(push, policies: list) -> list[hcm_pb.HttpFilter]:
    """builder.buildHTTP for the CUSTOM policies among `policies`: (RBAC, ext_authz) per provider."""
    out = []
    for provider, rules, shadow, resolved in _per_provider(
            push, policies, tcp=False, many_error="multiple CUSTOM authorization providers per workload requires "
                                                  "PILOT_ENABLE_MULTIPLE_CUSTOM_AUTHZ_PROVIDERS, found {providers}"):
        if resolved is None:
            out.append(hcm_pb.HttpFilter(name=authz.HTTP_RBAC,
                                         typed_config=pb.pack(http_rbac_pb2.RBAC(rules=_bad_deny(rules)))))
            continue
        r = http_rbac_pb2.RBAC(shadow_rules=rules, shadow_rules_stat_prefix=STAT_PREFIX)
        if shadow.policies:
            r.rules.CopyFrom(shadow)  # as istiod: dry-run CUSTOM rules are set as the filter's rules
        ext_http, _ = resolved
        ext = http_pb.ExtAuthz()
        ext.CopyFrom(ext_http)
        ext.filter_enabled_metadata.CopyFrom(_enabled_metadata(authz.HTTP_RBAC, provider))
        out.append(hcm_pb.HttpFilter(name=authz.HTTP_RBAC, typed_config=pb.pack(r)))
        out.append(hcm_pb.HttpFilter(name=HTTP_EXT_AUTHZ, typed_config=pb.pack(ext)))
    return out


def tcp_filters(push, policies: list) -> list[lc.Filter]:
    """builder.buildTCP for the CUSTOM policies: gRPC providers only (HTTP ones are skipped on TCP)."""
    out = []
    for provider, rules, shadow, resolved in _per_provider(
            push, policies, tcp=True, many_error="multiple CUSTOM authorization providers per workload"):
        if resolved is None:
            out.append(lc.Filter(name=authz.NETWORK_RBAC, typed_config=pb.pack(
                net_rbac_pb2.RBAC(rules=_bad_deny(rules), stat_prefix=authz.TCP_STAT_PREFIX))))
            continue
        _, ext_tcp = resolved
        if ext_tcp is None:
            continue  # an HTTP provider does not apply to TCP chains
        r = net_rbac_pb2.RBAC(shadow_rules=rules, stat_prefix=authz.TCP_STAT_PREFIX,
                              shadow_rules_stat_prefix=STAT_PREFIX)
        if shadow.policies:
            r.rules.CopyFrom(shadow)
        ext = net_pb.ExtAuthz()
        ext.CopyFrom(ext_tcp)
        ext.filter_enabled_metadata.CopyFrom(_enabled_metadata(authz.NETWORK_RBAC, provider))
        out.append(lc.Filter(name=authz.NETWORK_RBAC, typed_config=pb.pack(r)))
        out.append(lc.Filter(name=NETWORK_EXT_AUTHZ, typed_config=pb.pack(ext)))
    return out
