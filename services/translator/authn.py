"""RequestAuthentication → Envoy's `envoy.filters.http.jwt_authn`, as istiod's pilot/pkg/security/authn
(policy_applier.go convertToEnvoyJwtConfig).

Every JWT rule of the RequestAuthentications selecting a workload becomes one provider `origins-<i>` (rules sorted
by issuer). A request with a token that no provider accepts gets 401; a request without a token passes (the
`allow_missing` requirement) and is left to AuthorizationPolicy (`requestPrincipals`), which reads the verified
claims from the filter's dynamic metadata (`payload_in_metadata: payload`). `jwks` is sent inline; `jwksUri` is
fetched by Envoy through the mesh cluster of its host and port (`outbound|<port>||<host>`). When no service
serves that host, Envoy could not fetch the keys: the provider then gets a key set nobody holds, so every token
is refused, as istiod's fallback does.

Pure: nothing here does I/O.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from envoy.config.core.v3 import http_uri_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb
from google.protobuf import empty_pb2

from mizzen.services.mesh.duration import parse_duration

from . import pb

JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD = "payload"
DEFAULT_TIMEOUT = 5.0
JWKS_CACHE_SECONDS = 5 * 60
# A well-formed RSA public key whose private half nobody has: tokens checked against it always fail.
UNREACHABLE_JWKS = ('{"keys":[{"kty":"EC","crv":"P-256","kid":"mizzen-unreachable-jwks",'
                    '"x":"52FHV-n2GrN2CM1o3LbbArWUJaVpNCDmuDChRmkZhqI","y":"5afLEJHam3Vlnq_OK2IXMb8arF8lxo7ZgVuXu7YUuTE"}]}')
SPACE_DELIMITED_DEFAULTS = ("permission", "scope")


def jwks_cluster(push, uri: str) -> str | None:
    """model.LookupCluster: the outbound cluster of the jwksUri's host and port, when a service serves it."""
    u = urlsplit(uri)
    port = u.port or (443 if u.scheme == "https" else 80)
    host = u.hostname or ""
    for svc in (push.services_by_host.get(host) or {}).values():
        if any(p.port == port for p in svc.ports):
            return f"outbound|{port}||{host}"
    return None


def _provider(push, rule: dict, clear_route_cache: bool) -> jwt_pb2.JwtProvider:
    p = jwt_pb2.JwtProvider(
        issuer=rule.get("issuer", ""),
        audiences=list(rule.get("audiences") or []),
        forward=bool(rule.get("forwardOriginalToken", False)),
        forward_payload_header=rule.get("outputPayloadToHeader", ""),
        payload_in_metadata=JWT_PAYLOAD,
        clear_route_cache=clear_route_cache,
    )
    p.normalize_payload_in_metadata.space_delimited_claims.extend(
        sorted(set(rule.get("spaceDelimitedClaims") or []) | set(SPACE_DELIMITED_DEFAULTS))
        if rule.get("spaceDelimitedClaims") else SPACE_DELIMITED_DEFAULTS)
    for ch in rule.get("outputClaimToHeaders") or []:
        p.claim_to_headers.add(header_name=ch["header"], claim_name=ch["claim"])
    for h in rule.get("fromHeaders") or []:
        p.from_headers.add(name=h["name"], value_prefix=h.get("prefix", ""))
    p.from_params.extend(rule.get("fromParams") or [])
    p.from_cookies.extend(rule.get("fromCookies") or [])
    timeout = DEFAULT_TIMEOUT
    if rule.get("timeout"):
        timeout = parse_duration(rule["timeout"])
    uri = rule.get("jwksUri") or rule.get("jwks_uri") or ""
    if uri:
        cluster = jwks_cluster(push, uri)
        if cluster is None:
            push.report(f"RequestAuthentication issuer {rule.get('issuer', '')!r}",
                        LookupError(f"no service serves jwksUri {uri}: every token of this issuer is refused"))
            p.local_jwks.inline_string = UNREACHABLE_JWKS
        else:
            r = p.remote_jwks
            r.http_uri.CopyFrom(http_uri_pb2.HttpUri(uri=uri, cluster=cluster, timeout=pb.duration(timeout)))
            r.cache_duration.CopyFrom(pb.duration(JWKS_CACHE_SECONDS))
    else:
        p.local_jwks.inline_string = rule.get("jwks", "") or UNREACHABLE_JWKS
    return p


def _requirement(name: str) -> jwt_pb2.JwtRequirement:
    return jwt_pb2.JwtRequirement(provider_name=name)


def jwt_filter(push, policies: list, clear_route_cache: bool = False) -> hcm_pb.HttpFilter | None:
    """The jwt_authn filter for the RequestAuthentications of one workload (None when they have no rules)."""
    rules = [r for cfg in policies for r in (cfg.spec.get("jwtRules") or [])]
    if not rules:
        return None
    rules.sort(key=lambda r: r.get("issuer", ""))
    cfg = jwt_pb2.JwtAuthentication(bypass_cors_preflight=True)
    inner, outer = [], []
    for i, rule in enumerate(rules):
        name = f"origins-{i}"
        cfg.providers[name].CopyFrom(_provider(push, rule, clear_route_cache))
        if rule.get("presence") == "REQUIRED":
            req = _requirement(name)  # the token must be there (Envoy's or-lists need two entries)
        else:
            req = jwt_pb2.JwtRequirement()
            req.requires_any.requirements.extend(
                [_requirement(name), jwt_pb2.JwtRequirement(allow_missing=empty_pb2.Empty())])
        inner.append(req)
        outer.append(_requirement(name))
    r = cfg.rules.add(match=rc.RouteMatch(prefix="/"))
    if len(inner) == 1:
        r.requires.CopyFrom(inner[0])
    else:
        # {P1, P2, …, AND(OR(P1, allow_missing), OR(P2, allow_missing), …)}: a token present must be valid for
        # its issuer; the outer OR lets providers that share a location each accept their own tokens.
        all_ = jwt_pb2.JwtRequirement()
        all_.requires_all.requirements.extend(inner)
        r.requires.requires_any.requirements.extend([*outer, all_])
    return hcm_pb.HttpFilter(name=JWT_FILTER, typed_config=pb.pack(cfg))

