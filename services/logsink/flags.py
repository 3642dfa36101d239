"""Envoy response flags: the short codes `%RESPONSE_FLAGS%` prints (`UF,URX`) and their long names
(`%RESPONSE_FLAGS_LONG%`), as Envoy's `source/common/stream_info/utility.h` defines them."""

from __future__ import annotations

# short → long, in Envoy's declaration order.
LONG_NAMES: dict[str, str] = {
    "LH": "FailedLocalHealthCheck",
    "UH": "NoHealthyUpstream",
    "UT": "UpstreamRequestTimeout",
    "LR": "LocalReset",
    "UR": "UpstreamRemoteReset",
    "UF": "UpstreamConnectionFailure",
    "UC": "UpstreamConnectionTermination",
    "UO": "UpstreamOverflow",
    "NR": "NoRouteFound",
    "DI": "DelayInjected",
    "FI": "FaultInjected",
    "RL": "RateLimited",
    "UAEX": "UnauthorizedExternalService",
    "RLSE": "RateLimitServiceError",
    "DC": "DownstreamConnectionTermination",
    "URX": "UpstreamRetryLimitExceeded",
    "SI": "StreamIdleTimeout",
    "IH": "InvalidEnvoyRequestHeaders",
    "DPE": "DownstreamProtocolError",
    "UMSDR": "UpstreamMaxStreamDurationReached",
    "RFCF": "ResponseFromCacheFilter",
    "NFCF": "NoFilterConfigFound",
    "DT": "DurationTimeout",
    "UPE": "UpstreamProtocolError",
    "NC": "NoClusterFound",
    "OM": "OverloadManagerTerminated",
    "DF": "DnsResolutionFailed",
    "DO": "DropOverload",
    "DR": "DownstreamRemoteReset",
}
SHORT_NAMES: dict[str, str] = {v: k for k, v in LONG_NAMES.items()}

# Flags that only describe what happened (fault-injection delay, a cache hit) rather than a failure.
INFORMATIONAL = frozenset({"DI", "RFCF"})

# The field names of envoy.data.accesslog.v3.ResponseFlags (gRPC access log) → short flag.
ALS_FIELDS: dict[str, str] = {
    "failed_local_healthcheck": "LH",
    "no_healthy_upstream": "UH",
    "upstream_request_timeout": "UT",
    "local_reset": "LR",
    "upstream_remote_reset": "UR",
    "upstream_connection_failure": "UF",
    "upstream_connection_termination": "UC",
    "upstream_overflow": "UO",
    "no_route_found": "NR",
    "delay_injected": "DI",
    "fault_injected": "FI",
    "rate_limited": "RL",
    "rate_limit_service_error": "RLSE",
    "downstream_connection_termination": "DC",
    "upstream_retry_limit_exceeded": "URX",
    "stream_idle_timeout": "SI",
    "invalid_envoy_request_headers": "IH",
    "downstream_protocol_error": "DPE",
    "upstream_max_stream_duration_reached": "UMSDR",
    "response_from_cache_filter": "RFCF",
    "no_filter_config_found": "NFCF",
    "duration_timeout": "DT",
    "upstream_protocol_error": "UPE",
    "no_cluster_found": "NC",
    "overload_manager": "OM",
    "dns_resolution_failure": "DF",
    "downstream_remote_reset": "DR",
}

_cache: dict[str, tuple[str, ...]] = {}


class FlagError(ValueError):
    pass


def _token_ok(tok: str) -> bool:
    # Custom filters may register more flags at runtime; Envoy requires them to be upper-case letters.
    return 0 < len(tok) <= 16 and tok.isascii() and tok.isalpha() and tok.isupper()


def parse_flags(value: str) -> tuple[str, ...]:
    """`"UF,URX"` → `("UF", "URX")`; `"-"`/`""` → `()`. Long names (`UpstreamConnectionFailure`) are accepted
    and mapped to their short form; unknown upper-case tokens are kept (custom flags). Raises FlagError."""
    hit = _cache.get(value)
    if hit is not None:
        return hit
    if value in ("-", ""):
        out: tuple[str, ...] = ()
    else:
        toks = []
        for raw in value.split(","):
            tok = raw.strip()
            short = SHORT_NAMES.get(tok)
            if short is not None:
                toks.append(short)
            elif _token_ok(tok):
                toks.append(tok)
            else:
                raise FlagError(f"not an Envoy response flag: {tok!r}")
        out = tuple(toks)
    if len(_cache) < 4096:
        _cache[value] = out
    return out


def long_name(flag: str) -> str:
    """The PascalCase long name; a custom flag Envoy does not define keeps its short form."""
    return LONG_NAMES.get(flag, flag)


def is_failure(flags: tuple[str, ...]) -> bool:
    return any(f not in INFORMATIONAL for f in flags)
