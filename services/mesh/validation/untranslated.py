"""Fields of today's Istio API that Mizzen accepts but does not translate yet.

Such a field is valid (istio/api defines it, and the schema checks its shape), but Envoy would not see its
effect; `apply` stores the resource and warns, naming each field, so nobody mistakes it for working.
A pattern is a dotted field path with list indices left out; it matches wherever it ends a field's path
under `spec` (so `tls.caCrl` covers a DestinationRule's top-level, port-level and subset policies alike).
"""

from __future__ import annotations

import re

from ..errors import FieldError

UNTRANSLATED: dict[str, tuple[str, ...]] = {
    "VirtualService": (
        "http.match.statPrefix", "http.redirect.derivePort", "http.retries.retryIgnorePreviousHosts",
        "http.retries.backoff", "http.fault.delay.exponentialDelay", "http.fault.abort.http2Error",
        "http.corsPolicy.unmatchedPreflights", "tcp.match.sourceSubnet",
    ),
    "DestinationRule": (
        "loadBalancer.consistentHash.httpCookie.attributes", "loadBalancer.zoneAwareLbSetting",
        "loadBalancer.warmupDurationSecs", "loadBalancer.warmup", "connectionPool.tcp.maxConnectionDuration",
        "outlierDetection.outlierDetectionHttpErrorCodes", "tls.insecureSkipVerify", "tls.caCrl",
        "trafficPolicy.tunnel", "trafficPolicy.proxyProtocol", "trafficPolicy.retryBudget",
    ),
    "Gateway": (
        "servers.tls.caCrl", "servers.tls.credentialNames", "servers.tls.caCertCredentialName",
        "servers.tls.tlsCertificates", "servers.tls.verifyCertificateSpki", "servers.tls.verifyCertificateHash",
        "servers.tls.insecureSkipVerify",
    ),
    "Sidecar": (
        "ingress.tls.caCrl", "ingress.tls.credentialNames", "ingress.tls.caCertCredentialName",
        "ingress.tls.tlsCertificates", "ingress.tls.verifyCertificateSpki", "ingress.tls.verifyCertificateHash",
        "ingress.tls.insecureSkipVerify", "connectionPool.tcp.maxConnectionDuration", "inboundConnectionPool",
    ),
}

_INDEX = re.compile(r"\[[^\]]*\]")


def _paths(value: object, path: str):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, f"{path}[{i}]")


def untranslated_fields(obj: dict) -> list[FieldError]:
    """A warning for each field of `obj` that Mizzen accepts without translating it (outermost only)."""
    patterns = UNTRANSLATED.get(obj.get("kind", ""), ())
    spec = obj.get("spec")
    if not patterns or not isinstance(spec, dict):
        return []
    out: list[FieldError] = []
    for path in _paths(spec, "spec"):
        if any(path.startswith(w.path + ".") or path.startswith(w.path + "[") for w in out):
            continue  # inside a field already named
        bare = _INDEX.sub("", path)
        if any(bare.endswith("." + p) for p in patterns):
            out.append(FieldError(path, "accepted but not translated by Mizzen yet: Envoy will not apply it"))
    return out
