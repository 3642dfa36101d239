"""Mesh config input, Istio's way: the ConfigMap `istio` in the root namespace, key `mesh`, holds MeshConfig YAML.

`check_mesh_yaml` validates the fields Mizzen reads (today `extensionProviders` with the ext_authz providers;
other MeshConfig fields are accepted unread) and names each bad field from `data[mesh]`, e.g.
`data[mesh].extensionProviders[0].envoyExtAuthzHttp.port`. `extension_providers` returns the providers of a
checked document, normalised for the translator. Shared by the registry's validation and the translator.
"""

from __future__ import annotations

import re

import yaml

from .duration import DurationError, parse_duration
from .errors import FieldError

MESH_CONFIGMAP = "istio"  # istiod's default --meshConfig ConfigMap name
MESH_KEY = "mesh"
ROOT = f"data[{MESH_KEY}]"

_HTTP_FIELDS = {
    "service": str, "port": int, "timeout": str, "pathPrefix": str, "failOpen": bool, "statusOnError": str,
    "includeRequestHeadersInCheck": list, "includeHeadersInCheck": list, "includeAdditionalHeadersInCheck": dict,
    "includeRequestBodyInCheck": dict, "headersToUpstreamOnAllow": list, "headersToDownstreamOnDeny": list,
    "headersToDownstreamOnAllow": list,
}
_GRPC_FIELDS = {"service": str, "port": int, "timeout": str, "failOpen": bool, "statusOnError": str,
                "includeRequestBodyInCheck": dict}
_BODY_FIELDS = {"maxRequestBytes": int, "allowPartialMessage": bool, "packAsBytes": bool}
_WILDCARD_CHECKED = ("includeRequestHeadersInCheck", "includeHeadersInCheck", "headersToUpstreamOnAllow",
                     "headersToDownstreamOnDeny", "headersToDownstreamOnAllow")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# envoy.type.v3.StatusCode values (what istiod's parseStatusOnError accepts)
_STATUS_CODES = frozenset([100, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305,
                           307, 308, 400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414,
                           415, 416, 417, 421, 422, 423, 424, 426, 428, 429, 431, 500, 501, 502, 503, 504, 505,
                           506, 507, 508, 510, 511])
_TYPE_NAMES = {str: "string", int: "integer", bool: "boolean", list: "list", dict: "object"}


def _type_ok(value: object, typ: type) -> bool:
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def load(text: object) -> tuple[dict, list[FieldError]]:
    """The MeshConfig dict of a `mesh` value, and its errors (empty when fine)."""
    if not isinstance(text, str):
        return {}, [FieldError(ROOT, "must be a string of MeshConfig YAML")]
    try:
        doc = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        return {}, [FieldError(ROOT, f"invalid MeshConfig YAML{where}: {getattr(e, 'problem', None) or e}")]
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        return {}, [FieldError(ROOT, "MeshConfig must be a mapping")]
    return doc, check(doc)


def _check_fields(obj: object, fields: dict[str, type], at: str, errs: list[FieldError]) -> bool:
    if not isinstance(obj, dict):
        errs.append(FieldError(at, "must be an object"))
        return False
    for k, v in obj.items():
        if k not in fields:
            errs.append(FieldError(f"{at}.{k}", f"unknown field {k!r}; known: {', '.join(sorted(fields))}"))
        elif v is not None and not _type_ok(v, fields[k]):
            errs.append(FieldError(f"{at}.{k}", f"must be a {_TYPE_NAMES[fields[k]]}, got {v!r}"))
    return True


def _check_provider(p: dict, http: bool, at: str, errs: list[FieldError]) -> None:
    """agent.ValidateExtensionProviderEnvoyExtAuthz* plus buildExtAuthz*'s checks (istiod drops such a provider
    at push time; we refuse it at apply, naming the field)."""
    if not _check_fields(p, _HTTP_FIELDS if http else _GRPC_FIELDS, at, errs):
        return
    if not p.get("service"):
        errs.append(FieldError(f"{at}.service", "service must not be empty"))
    port = p.get("port")
    if _type_ok(port, int) and not 1 <= port <= 65535 or port is None:
        errs.append(FieldError(f"{at}.port", f"port must be in the range [1, 65535], found: {port or 0}"))
    t = p.get("timeout")
    if isinstance(t, str):
        try:
            if parse_duration(t) <= 0:
                errs.append(FieldError(f"{at}.timeout", f"timeout must be positive, found: {t}"))
        except DurationError as e:
            errs.append(FieldError(f"{at}.timeout", str(e)))
    s = p.get("statusOnError")
    if isinstance(s, str) and s:
        if not s.isdigit():
            errs.append(FieldError(f"{at}.statusOnError", f'invalid statusOnError "{s}": not an integer'))
        elif int(s) not in _STATUS_CODES:
            errs.append(FieldError(f"{at}.statusOnError", f"unsupported statusOnError {s}"))
    if http:
        prefix = p.get("pathPrefix")
        if isinstance(prefix, str) and prefix and not prefix.startswith("/"):
            errs.append(FieldError(f"{at}.pathPrefix", f'pathPrefix must begin with `/`, found: "{prefix}"'))
        for f in _WILDCARD_CHECKED:
            for i, h in enumerate(p.get(f) or [] if isinstance(p.get(f), list) else []):
                if not isinstance(h, str) or not h:
                    errs.append(FieldError(f"{at}.{f}[{i}]", "must be a non-empty header name"))
                elif h == "*":
                    errs.append(FieldError(f"{at}.{f}[{i}]", 'a single wildcard ("*") is not supported, change '
                                           "it to either prefix or suffix match"))
        extra = p.get("includeAdditionalHeadersInCheck")
        if isinstance(extra, dict):
            for k, v in extra.items():
                if not isinstance(v, str):
                    errs.append(FieldError(f"{at}.includeAdditionalHeadersInCheck[{k}]", "must be a string"))
    body = p.get("includeRequestBodyInCheck")
    if body is not None:
        _check_fields(body, _BODY_FIELDS, f"{at}.includeRequestBodyInCheck", errs)


def check(doc: dict) -> list[FieldError]:
    errs: list[FieldError] = []
    providers = doc.get("extensionProviders")
    if providers is None:
        return errs
    at = f"{ROOT}.extensionProviders"
    if not isinstance(providers, list):
        return [FieldError(at, "must be a list")]
    seen: set[str] = set()
    for i, p in enumerate(providers):
        pat = f"{at}[{i}]"
        if not isinstance(p, dict):
            errs.append(FieldError(pat, "must be an object"))
            continue
        name = p.get("name")
        if not isinstance(name, str) or not name:
            errs.append(FieldError(f"{pat}.name", f"extension provider name must not be empty, found empty at "
                                   f"index: {i}"))
        elif name in seen:
            errs.append(FieldError(f"{pat}.name", f"extension provider name must be unique, found duplicate: {name}"))
        elif len(name) > 63 or not _NAME.fullmatch(name):
            errs.append(FieldError(f"{pat}.name", f'invalid provider name "{name}": only lowercase letters, digits '
                                   "and hyphens, at most 63, not starting or ending with a hyphen"))
        if isinstance(name, str):
            seen.add(name)
        kinds = [k for k in p if k != "name"]
        if len(kinds) != 1:
            errs.append(FieldError(pat, f"exactly one provider must be set, found {len(kinds)}: {kinds}"))
        for k in kinds:
            if k in ("envoyExtAuthzHttp", "envoyExtAuthzGrpc"):
                _check_provider(p[k], k == "envoyExtAuthzHttp", f"{pat}.{k}", errs)
            # other providers (tracing, access logging, …) are accepted unread
    return errs


def extension_providers(doc: dict) -> dict[str, dict]:
    """name → {"type": "http"|"grpc", **fields} for the ext_authz providers of a checked MeshConfig."""
    out: dict[str, dict] = {}
    for p in doc.get("extensionProviders") or []:
        for k, typ in (("envoyExtAuthzHttp", "http"), ("envoyExtAuthzGrpc", "grpc")):
            if isinstance(p, dict) and isinstance(p.get(k), dict) and p.get("name") not in out:
                out[p["name"]] = {"type": typ, **p[k]}
    return out
