"""Mizzen workload tokens: compact JWS (JWT) signed with Ed25519 (`alg: EdDSA`, RFC 8037).

The asymmetric key lets every other service (the xds_gateway, an agent) verify a token with the public key
alone. Claims, shaped like a Kubernetes projected service-account token:

    iss  "mizzen"                                  sub  "system:serviceaccount:<ns>:<sa>"
    aud  ["istio-ca"] (the audience istiod checks)  iat, exp (seconds since the epoch)
    kubernetes.io/namespace, kubernetes.io/serviceaccount (also `namespace`, `service_account`)

Files under `<data-dir>/ca/`: `token-key.pem` (PKCS#8, 0600) and `token-public.pem` (every public key that
verifies tokens, PEM, concatenated: a retired signing key can stay there until its tokens expire).
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .ca import ca_dir, locked, write_private, write_public

ISSUER = "mizzen"
DEFAULT_AUDIENCE = "istio-ca"
DEFAULT_TTL = 24 * 3600
KEY_FILE = "token-key.pem"
PUBLIC_FILE = "token-public.pem"
LEEWAY = 60  # seconds of clock skew tolerated on iat/exp


class TokenError(Exception):
    """The token is missing, malformed, tampered with, expired, for another audience or from an unknown key."""


@dataclass(frozen=True)
class Claims:
    issuer: str
    subject: str
    audience: tuple[str, ...]
    issued_at: int
    expires_at: int
    namespace: str
    service_account: str

    def spiffe_id(self, trust_domain: str) -> str:
        return f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not text or len(text) % 4 == 1 or any(c in text for c in "=+/"):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# ---- key files ------------------------------------------------------------------------------------------------

def ensure_key(data_dir: Path | str) -> ed25519.Ed25519PrivateKey:
    """The token signing key, created once (under the CA lock, so replicas and `mizzen token` agree)."""
    d = ca_dir(data_dir)
    path = d / KEY_FILE
    if not path.exists():
        with locked(d):
            if not path.exists():
                key = ed25519.Ed25519PrivateKey.generate()
                write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
                pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
                old = (d / PUBLIC_FILE).read_bytes() if (d / PUBLIC_FILE).exists() else b""
                write_public(d / PUBLIC_FILE, pub + old)
    return load_key(path)


def load_key(path: Path | str) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise TokenError(f"{path}: not an unencrypted PEM private key ({type(e).__name__})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise TokenError(f"{path}: token keys are Ed25519, found {type(key).__name__}")
    return key


def parse_public_keys(pem_text: bytes | str, where: str = "public keys") -> list[ed25519.Ed25519PublicKey]:
    data = pem_text.encode() if isinstance(pem_text, str) else pem_text
    keys = []
    marker = b"-----END PUBLIC KEY-----"
    for block in data.split(marker):
        if b"-----BEGIN PUBLIC KEY-----" not in block:
            continue
        try:
            key = serialization.load_pem_public_key(block.strip() + b"\n" + marker + b"\n")
        except ValueError as e:
            raise TokenError(f"{where}: a PEM public key does not parse ({e})") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise TokenError(f"{where}: token keys are Ed25519, found {type(key).__name__}")
        keys.append(key)
    return keys


def load_public_keys(data_dir: Path | str) -> list[ed25519.Ed25519PublicKey]:
    """Every public key that verifies tokens, from `<data-dir>/ca/token-public.pem`."""
    path = ca_dir(data_dir) / PUBLIC_FILE
    if not path.exists():
        raise TokenError(f"{path}: no token public keys (has certauth or `mizzen token` run with this data dir?)")
    return parse_public_keys(path.read_bytes(), str(path))


def public_keys_pem(keys: list[ed25519.Ed25519PublicKey]) -> list[str]:
    return [k.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
            for k in keys]


# ---- issue and verify -----------------------------------------------------------------------------------------

def issue(data_dir_or_key: Path | str | ed25519.Ed25519PrivateKey, namespace: str, service_account: str,
          ttl_seconds: int = DEFAULT_TTL, audience: str | list[str] = DEFAULT_AUDIENCE,
          now: float | None = None) -> str:
    """A signed token for namespace/service account; `data_dir_or_key` is a data dir (key made on first use)
    or the private key itself."""
    if not namespace or not service_account or ":" in namespace or ":" in service_account:
        raise TokenError(f"namespace {namespace!r} / service account {service_account!r}: must be non-empty "
                         "and contain no ':'")
    if ttl_seconds <= 0:
        raise TokenError(f"ttl {ttl_seconds}s: must be positive")
    key = (data_dir_or_key if isinstance(data_dir_or_key, ed25519.Ed25519PrivateKey)
           else ensure_key(data_dir_or_key))
    iat = int(time.time() if now is None else now)
    header = {"alg": "EdDSA", "typ": "JWT", "kid": key_id(key.public_key())}
    claims = {
        "iss": ISSUER,
        "sub": f"system:serviceaccount:{namespace}:{service_account}",
        "aud": [audience] if isinstance(audience, str) else list(audience),
        "iat": iat,
        "exp": iat + int(ttl_seconds),
        "kubernetes.io/namespace": namespace,
        "kubernetes.io/serviceaccount": service_account,
        "namespace": namespace,
        "service_account": service_account,
    }
    signing_input = _b64(orjson.dumps(header)) + "." + _b64(orjson.dumps(claims))
    return signing_input + "." + _b64(key.sign(signing_input.encode()))


def verify(token: str, public_keys: list[ed25519.Ed25519PublicKey], audience: str = DEFAULT_AUDIENCE,
           now: float | None = None) -> Claims:
    """Check signature, audience, expiry and subject; returns the claims or raises TokenError (whose message
    never contains the token)."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise TokenError("token is not a compact JWS (want header.payload.signature)")
    try:
        header = orjson.loads(_unb64(parts[0]))
        payload = _unb64(parts[1])
        signature = _unb64(parts[2])
    except ValueError:
        raise TokenError("token is not valid base64url JSON") from None
    if not isinstance(header, dict) or header.get("alg") != "EdDSA":
        raise TokenError("token algorithm must be EdDSA")
    signing_input = (parts[0] + "." + parts[1]).encode()
    kid = header.get("kid")
    candidates = [k for k in public_keys if key_id(k) == kid] or list(public_keys)
    for k in candidates:
        try:
            k.verify(signature, signing_input)
            break
        except InvalidSignature:
            continue
    else:
        raise TokenError("token signature does not verify with any trusted token key")
    try:
        c = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise TokenError("token payload is not JSON") from None
    if not isinstance(c, dict):
        raise TokenError("token payload is not a JSON object")
    if c.get("iss") != ISSUER:
        raise TokenError(f"token issuer {c.get('iss')!r} is not {ISSUER!r}")
    t = time.time() if now is None else now
    exp, iat = c.get("exp"), c.get("iat")
    if not isinstance(exp, int) or not isinstance(iat, int):
        raise TokenError("token lacks integer iat/exp claims")
    if t > exp + LEEWAY:
        raise TokenError(f"token expired at {exp} (now {int(t)})")
    if iat > t + LEEWAY:
        raise TokenError("token issued in the future")
    aud = c.get("aud")
    auds = (aud,) if isinstance(aud, str) else tuple(a for a in aud if isinstance(a, str)) if isinstance(aud, list) else ()
    if audience not in auds:
        raise TokenError(f"token audience {list(auds)} does not include {audience!r}")
    sub = c.get("sub")
    ns, sa = c.get("kubernetes.io/namespace"), c.get("kubernetes.io/serviceaccount")
    if not (isinstance(ns, str) and isinstance(sa, str) and ns and sa
            and sub == f"system:serviceaccount:{ns}:{sa}"):
        raise TokenError("token subject is not system:serviceaccount:<namespace>:<service account>")
    return Claims(issuer=str(c.get("iss", "")), subject=sub, audience=auds, issued_at=iat, expires_at=exp,
                  namespace=ns, service_account=sa)
