"""Kubernetes Secrets as the mesh uses them: gateway credentials (`credentialName`), in Istio's key layouts.

Values leave the registry only inside the Envoy Secrets the translator builds for gateways; anything that shows
an object to a person or a client (the registry's API, `mizzen get`) shows it through `redact`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

REDACTED = "<redacted>"  # not base64: a redacted object written back is refused, never stored as data


def redact(obj: dict) -> dict:
    """A copy of a Secret with every value replaced (other kinds are returned as they are)."""
    if obj.get("kind") != "Secret":
        return obj
    out = dict(obj)
    for fld in ("data", "stringData"):
        if isinstance(obj.get(fld), dict):
            out[fld] = dict.fromkeys(obj[fld], REDACTED)
    return out


def values(obj: dict) -> dict[str, bytes]:
    """A Secret's decoded values (`stringData` wins over `data`, as the API server merges them)."""
    out = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    out.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
    return out


@dataclass(frozen=True)
class Credential:
    """A TLS credential: certificate chain and key for a server (either may be empty), and a CA to verify peers."""

    cert: bytes = b""
    key: bytes = b""
    ca: bytes = b""


# Istio's layouts (pilot/pkg/credentials/kube/secrets.go): kubernetes.io/tls keys, or a generic secret's keys.
_CERT_KEYS, _KEY_KEYS, _CA_KEYS = ("tls.crt", "cert"), ("tls.key", "key"), ("ca.crt", "cacert")


def credential(obj: dict) -> Credential:
    vals = values(obj)

    def first(keys: tuple[str, ...]) -> bytes:
        return next((vals[k] for k in keys if vals.get(k)), b"")

    return Credential(first(_CERT_KEYS), first(_KEY_KEYS), first(_CA_KEYS))
