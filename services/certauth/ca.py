"""The mesh CA's pure core: roots, the plug-in CA, workload certificates and root rotation, with `cryptography`.

Workload certificates follow istiod's template (istio `security/pkg/pki/util/generate_cert.go`): empty subject,
the SPIFFE URI as the only SAN (critical, because the subject is empty), digitalSignature + keyEncipherment,
serverAuth + clientAuth, CA=false, NotBefore = now - 2 min, NotAfter = now + TTL clamped to the signer's
NotAfter, a random serial below 2^128, and only the CSR's public key taken from the request.

Two sources of a CA:
- self-signed, kept under `<data-dir>/ca/`: one directory per root (`roots/<id>/cert.pem`, `key.pem` 0600) and
  `state.json` naming the trusted roots and the one that signs. Rotation edits `state.json` (add → activate →
  retire) under a file lock; every replica reloads when its mtime changes.
- plug-in, a directory laid out as Istio's `cacerts` secret: `ca-cert.pem` (the signing CA), `ca-key.pem`,
  `cert-chain.pem` (ca-cert → … → root) and `root-cert.pem` (the trust anchors; several certificates there
  are all trusted, which is how a plug-in root is rotated).

The service shell (server.py) only asks `Authority` to check and sign; nothing here does I/O on the hot path.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TRUST_DOMAIN = "cluster.local"
ROOT_TTL = dt.timedelta(days=3650)  # CITADEL_SELF_SIGNED_CA_CERT_TTL
CLOCK_SKEW = dt.timedelta(minutes=2)  # ClockSkewGracePeriod
DEFAULT_WORKLOAD_TTL = 24 * 3600  # DEFAULT_WORKLOAD_CERT_TTL
MAX_WORKLOAD_TTL = 90 * 24 * 3600  # MAX_WORKLOAD_CERT_TTL
KEY_TYPES = ("ec", "rsa")

PLUGIN_FILES = ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem")


class CAError(Exception):
    """The CA cannot be loaded or changed (bad files, a rotation step that does not apply)."""


class RequestError(Exception):
    """A signing request the CA refuses; `kind` maps to a gRPC status in the shell."""

    kind = "invalid"


class InvalidRequest(RequestError):
    """The CSR does not parse, its signature is broken, or the validity asked for is over the maximum."""

    kind = "invalid"


class Forbidden(RequestError):
    """The CSR asks for an identity (SAN) the caller does not hold."""

    kind = "forbidden"


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_certs(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CAError(f"{what}: not PEM certificates ({e})") from None
    if not certs:
        raise CAError(f"{what}: no certificate")
    return certs


def new_key(key_type: str = "ec") -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise CAError(f"key type {key_type!r}: want one of {', '.join(KEY_TYPES)}")


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _hash_for(key) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def make_root(key, trust_domain: str, name: str, ttl: dt.timedelta = ROOT_TTL) -> x509.Certificate:
    """A self-signed root as istiod makes it (Org = trust domain), CA=true, may sign certificates and CRLs."""
    now = utcnow()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(secrets.randbits(127) | 1)
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, _hash_for(key)))


# ---------------------------------------------------------------------------------------------------------------
# The signing authority: an immutable snapshot the server swaps whole when the files change.

_LEAF_KEY_USAGE = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                                encipher_only=False, decipher_only=False)
_LEAF_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
_EMPTY_NAME = x509.Name([])


@dataclass
class Authority:
    """One CA state: the signing certificate and key, the chain above it, and every trusted root."""

    trust_domain: str
    signer_cert: x509.Certificate
    signer_key: object
    chain_above: list[x509.Certificate]  # issuers of signer_cert up to and including the root (empty if self-signed)
    trusted_roots: list[x509.Certificate]  # the signing root first
    default_ttl: int = DEFAULT_WORKLOAD_TTL
    max_ttl: int = MAX_WORKLOAD_TTL
    source: str = ""
    _base: x509.CertificateBuilder = field(init=False, repr=False)
    tail_pems: list[str] = field(init=False, repr=False)  # what follows a leaf in a response: intermediates, root
    roots_pem: list[str] = field(init=False, repr=False)  # the trust bundle, PEM, signing root first
    _hash: hashes.HashAlgorithm | None = field(init=False, repr=False)
    _fast: _FastLeaf | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.signer_cert.not_valid_after_utc <= utcnow():
            raise CAError(f"{self.source}: the signing certificate expired at {self.signer_cert.not_valid_after_utc}")
        # Parts every leaf shares, built once: issuer, key usages, CA=false and the authority key id.
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.signer_cert.public_key())
        self._base = (x509.CertificateBuilder()
                      .issuer_name(self.signer_cert.subject)
                      .subject_name(_EMPTY_NAME)
                      .add_extension(_LEAF_KEY_USAGE, critical=True)
                      .add_extension(_LEAF_EKU, critical=False)
                      .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                      .add_extension(aki, critical=False))
        self._hash = _hash_for(self.signer_key)
        try:
            self._fast = _FastLeaf(self.signer_cert, self.signer_key, aki)
        except TypeError:  # e.g. an Ed25519 plug-in CA: the builder path
            self._fast = None
        # The response chain after the leaf: the signer (if it is not itself the root), intermediates, root last.
        tail = [] if self._self_signed(self.signer_cert) else [self.signer_cert]
        tail += [c for c in self.chain_above if c != self.signer_cert]
        if not tail:
            tail = [self.signer_cert]
        elif not self._self_signed(tail[-1]):
            issuer = next((r for r in self.trusted_roots if r.subject == tail[-1].issuer), None)
            if issuer is not None:
                tail.append(issuer)
        self.tail_pems = [pem(c) for c in tail]
        self.roots_pem = [pem(c) for c in self.trusted_roots]
        if self.signer_cert not in self.trusted_roots and self._self_signed(self.signer_cert):
            raise CAError(f"{self.source}: the signing root is not among the trusted roots")

    @staticmethod
    def _self_signed(cert: x509.Certificate) -> bool:
        return cert.issuer == cert.subject

    @property
    def signing_root(self) -> x509.Certificate:
        """The trust anchor new certificates chain to (the loaders put it first)."""
        return self.trusted_roots[0]

    def ttl_for(self, requested: int | None) -> int:
        """Istio's rule: 0/None → the default TTL; above the maximum → refused (not clamped)."""
        if requested is None or requested <= 0:
            return self.default_ttl
        if requested > self.max_ttl:
            raise InvalidRequest(f"requested TTL {requested}s is greater than the max allowed TTL {self.max_ttl}s")
        return requested

    def sign_csr(self, csr_pem: bytes | str, identity: str, requested_ttl: int | None = None) -> list[str]:
        """Check the CSR against the caller's SPIFFE identity and sign it; returns PEM certs, leaf first."""
        ttl = self.ttl_for(requested_ttl)
        csr, public_key = parse_csr_key(csr_pem)
        check_csr_identity(csr, identity)
        return [self.issue(public_key, uris=[identity], ttl=ttl)] + self.tail_pems

    def issue(self, public_key, *, uris: list[str] = (), dns: list[str] = (), ips: list[str] = (),
              ttl: int, serial: int | None = None, now: dt.datetime | None = None) -> str:
        """Sign a leaf for `public_key` with exactly these SANs; returns its PEM."""
        now = now or utcnow()
        not_before = (now - CLOCK_SKEW).replace(microsecond=0)
        not_after = min(now + dt.timedelta(seconds=ttl), self.signer_cert.not_valid_after_utc).replace(microsecond=0)
        serial = serial if serial is not None else secrets.randbits(127) | 1
        san = _san(uris, dns, ips)
        if self._fast is not None:
            return _der_to_pem(self._fast.certificate(public_key, serial, not_before, not_after, san))
        return self._builder_leaf(public_key, serial, not_before, not_after, san).public_bytes(
            serialization.Encoding.PEM).decode()

    def _builder_leaf(self, public_key, serial: int, not_before: dt.datetime, not_after: dt.datetime,
                      san: x509.SubjectAlternativeName) -> x509.Certificate:
        """The same leaf through cryptography's CertificateBuilder (the reference the fast path is tested
        against, and the path for signer keys the fast path does not handle)."""
        return (self._base.public_key(public_key).serial_number(serial)
                .not_valid_before(not_before).not_valid_after(not_after)
                .add_extension(san, critical=True)
                .sign(self.signer_key, self._hash))


def _san(uris, dns, ips) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    return x509.SubjectAlternativeName(names)


# ---- the fast leaf: DER assembled from cached parts ----------------------------------------------------------
# cryptography's CertificateBuilder costs ~60 us a leaf on top of the ~25 us ECDSA signature (builder copies,
# extension encoding, Rust object creation). Every leaf shares the issuer, the algorithm and four of its five
# extensions, so the TBSCertificate is assembled here from cached DER pieces and only the serial, validity,
# public key and SAN are encoded per call. tests/test_certauth_ca.py checks the TBS bytes are identical to the
# builder's for the same inputs.

def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(b),)) + b


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + _der_len(len(content)) + content


def _der_int(n: int) -> bytes:
    return _tlv(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def _der_time(t: dt.datetime) -> bytes:
    if 1950 <= t.year < 2050:  # RFC 5280: UTCTime through 2049, GeneralizedTime after
        return _tlv(0x17, t.strftime("%y%m%d%H%M%SZ").encode())
    return _tlv(0x18, t.strftime("%Y%m%d%H%M%SZ").encode())


def _extension(oid: bytes, critical: bool, value: bytes) -> bytes:
    return _tlv(0x30, _tlv(0x06, oid) + (b"\x01\x01\xff" if critical else b"") + _tlv(0x04, value))


_OID_KU, _OID_EKU, _OID_BC, _OID_AKI, _OID_SAN = (bytes.fromhex(h) for h in
                                                  ("551d0f", "551d25", "551d13", "551d23", "551d11"))
_ALG_ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
_ALG_RSA_SHA256 = bytes.fromhex("300d06092a864886f70d01010b0500")
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


class _FastLeaf:
    def __init__(self, signer_cert: x509.Certificate, signer_key, aki: x509.AuthorityKeyIdentifier) -> None:
        from cryptography.hazmat.primitives.asymmetric import padding

        if isinstance(signer_key, ec.EllipticCurvePrivateKey):
            self.alg = _ALG_ECDSA_SHA256
            algorithm = ec.ECDSA(hashes.SHA256())
            self.sign = lambda tbs: signer_key.sign(tbs, algorithm)
        elif isinstance(signer_key, rsa.RSAPrivateKey):
            self.alg = _ALG_RSA_SHA256
            pad, h = padding.PKCS1v15(), hashes.SHA256()
            self.sign = lambda tbs: signer_key.sign(tbs, pad, h)
        else:
            raise TypeError(type(signer_key).__name__)
        # version v3, then (after the serial) algorithm and issuer; then (after validity) the empty subject
        self.head = bytes.fromhex("a003020102")
        self.alg_issuer = self.alg + signer_cert.subject.public_bytes()
        self.subject = b"\x30\x00"
        # extensions in the builder's order: KeyUsage, ExtendedKeyUsage, BasicConstraints, AKI, then the SAN
        self.fixed_ext = (_extension(_OID_KU, True, _LEAF_KEY_USAGE.public_bytes())
                          + _extension(_OID_EKU, False, _LEAF_EKU.public_bytes())
                          + _extension(_OID_BC, True, x509.BasicConstraints(ca=False, path_length=None).public_bytes())
                          + _extension(_OID_AKI, False, aki.public_bytes()))

    def tbs(self, public_key, serial: int, not_before: dt.datetime, not_after: dt.datetime,
            san: x509.SubjectAlternativeName) -> bytes:
        exts = self.fixed_ext + _extension(_OID_SAN, True, san.public_bytes())
        body = b"".join((self.head, _der_int(serial), self.alg_issuer,
                         _tlv(0x30, _der_time(not_before) + _der_time(not_after)), self.subject,
                         public_key.public_bytes(serialization.Encoding.DER, _SPKI),
                         _tlv(0xA3, _tlv(0x30, exts))))
        return _tlv(0x30, body)

    def certificate(self, public_key, serial: int, not_before: dt.datetime, not_after: dt.datetime,
                    san: x509.SubjectAlternativeName) -> bytes:
        tbs = self.tbs(public_key, serial, not_before, not_after, san)
        return _tlv(0x30, tbs + self.alg + _tlv(0x03, b"\x00" + self.sign(tbs)))


def _der_to_pem(der: bytes) -> str:
    b = base64.b64encode(der).decode()
    return ("-----BEGIN CERTIFICATE-----\n" + "\n".join(b[i:i + 64] for i in range(0, len(b), 64))
            + "\n-----END CERTIFICATE-----\n")


def parse_csr(csr_pem: bytes | str) -> x509.CertificateSigningRequest:
    return parse_csr_key(csr_pem)[0]


def parse_csr_key(csr_pem: bytes | str) -> tuple[x509.CertificateSigningRequest, object]:
    """The parsed CSR and its public key, after the proof-of-possession (signature) and key-size checks."""
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    if not data.strip():
        raise InvalidRequest("csr: empty")
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in data:
        raise InvalidRequest("csr: no PEM 'CERTIFICATE REQUEST' block")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as e:
        reason = str(e).split(" See https://")[0].strip().rstrip(".")
        raise InvalidRequest(f"csr: does not parse as a PKCS#10 certificate request ({reason})") from None
    try:
        ok = csr.is_signature_valid
    except Exception as e:  # unsupported algorithms raise instead of returning False
        raise InvalidRequest(f"csr: signature cannot be checked ({e})") from None
    if not ok:
        raise InvalidRequest("csr: signature is invalid (the request was altered or not signed by its key)")
    key = csr.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise InvalidRequest(f"csr: RSA key of {key.key_size} bits; at least 2048 required")
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise InvalidRequest(f"csr: unsupported public key type {type(key).__name__}")
    return csr, key


def check_csr_identity(csr: x509.CertificateSigningRequest, identity: str) -> None:
    """A CSR may carry no SAN (the CA stamps the caller's identity) or exactly the caller's SPIFFE URI."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    except ValueError as e:
        raise InvalidRequest(f"csr: extensions do not parse ({e})") from None
    names = list(san)
    for n in names:
        if not (isinstance(n, x509.UniformResourceIdentifier) and n.value == identity):
            raise Forbidden(f"csr: SAN {_describe(n)} is not the caller's identity {identity}")


def _describe(name: x509.GeneralName) -> str:
    kind = {x509.UniformResourceIdentifier: "URI", x509.DNSName: "DNS", x509.IPAddress: "IP",
            x509.RFC822Name: "email"}.get(type(name), type(name).__name__)
    return f"{kind}:{name.value}"


# ---------------------------------------------------------------------------------------------------------------
# Files: the self-signed store under <data-dir>/ca and the plug-in directory.


def ca_dir(data_dir: Path | str) -> Path:
    return Path(data_dir) / "ca"


def write_private(path: Path, data: bytes) -> None:
    """Write a secret atomically with mode 0600 from the first byte (never world-readable, even briefly)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on the CA directory: two replicas (or a replica and `mizzen ca rotate`) never create
    two roots or interleave state writes."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@dataclass
class StoreState:
    signing: str
    trusted: list[str]
    trust_domain: str

    def to_json(self) -> bytes:
        return json.dumps({"signing": self.signing, "trusted": self.trusted, "trust_domain": self.trust_domain},
                          indent=2).encode() + b"\n"


def _read_state(d: Path) -> StoreState | None:
    p = d / "state.json"
    if not p.exists():
        return None
    try:
        raw = json.loads(p.read_text())
        return StoreState(signing=str(raw["signing"]), trusted=[str(x) for x in raw["trusted"]],
                          trust_domain=str(raw.get("trust_domain", DEFAULT_TRUST_DOMAIN)))
    except (ValueError, KeyError, TypeError) as e:
        raise CAError(f"{p}: not a CA state file ({e})") from None


def _write_state(d: Path, state: StoreState) -> None:
    write_public(d / "state.json", state.to_json())
    roots = [load_certs((d / "roots" / rid / "cert.pem").read_bytes(), f"root {rid}")[0]
             for rid in [state.signing] + [r for r in state.trusted if r != state.signing]]
    write_public(d / "trust-bundle.pem", "".join(pem(c) for c in roots).encode())


def _new_root_id(d: Path) -> str:
    existing = [p.name for p in (d / "roots").glob("root-*")] if (d / "roots").exists() else []
    n = 1 + max((int(x.split("-")[1]) for x in existing if x.split("-")[1].isdigit()), default=0)
    return f"root-{n}"


def _create_root(d: Path, trust_domain: str, key_type: str) -> str:
    rid = _new_root_id(d)
    key = new_key(key_type)
    cert = make_root(key, trust_domain, f"Mizzen mesh root CA {rid}")
    rd = d / "roots" / rid
    rd.mkdir(parents=True, mode=0o700)
    write_private(rd / "key.pem", key_pem(key))
    write_public(rd / "cert.pem", pem(cert).encode())
    return rid


def ensure_self_signed(data_dir: Path | str, trust_domain: str = DEFAULT_TRUST_DOMAIN, key_type: str = "ec") -> None:
    """Create the root once; later calls (restarts, other replicas) keep it."""
    d = ca_dir(data_dir)
    with locked(d):
        state = _read_state(d)
        if state is None:
            rid = _create_root(d, trust_domain, key_type)
            _write_state(d, StoreState(signing=rid, trusted=[rid], trust_domain=trust_domain))
        elif state.trust_domain != trust_domain:
            raise CAError(f"{d / 'state.json'}: the stored CA is for trust domain {state.trust_domain!r}, "
                          f"not {trust_domain!r}")


def store_version(data_dir: Path | str) -> tuple:
    """What the replicas poll: change it and they reload."""
    p = ca_dir(data_dir) / "state.json"
    st = p.stat()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _load_private_key(path: Path):
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise CAError(f"{path}: not an unencrypted PEM private key ({type(e).__name__})") from None


def load_self_signed(data_dir: Path | str, default_ttl: int = DEFAULT_WORKLOAD_TTL,
                     max_ttl: int = MAX_WORKLOAD_TTL) -> Authority:
    d = ca_dir(data_dir)
    state = _read_state(d)
    if state is None:
        raise CAError(f"{d}: no CA here (state.json missing)")
    if state.signing not in state.trusted:
        raise CAError(f"{d / 'state.json'}: signing root {state.signing} is not trusted")
    certs = {rid: load_certs((d / "roots" / rid / "cert.pem").read_bytes(), f"{d}/roots/{rid}/cert.pem")[0]
             for rid in state.trusted}
    key = _load_private_key(d / "roots" / state.signing / "key.pem")
    signer = certs[state.signing]
    _check_pair(signer, key, str(d / "roots" / state.signing))
    ordered = [signer] + [c for rid, c in certs.items() if rid != state.signing]
    return Authority(trust_domain=state.trust_domain, signer_cert=signer, signer_key=key, chain_above=[],
                     trusted_roots=ordered, default_ttl=default_ttl, max_ttl=max_ttl, source=str(d))


def _check_pair(cert: x509.Certificate, key, where: str) -> None:
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (cert.public_key().public_bytes(serialization.Encoding.DER, pub)
            != key.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise CAError(f"{where}: the private key does not match the certificate")


def plugin_version(plugin_dir: Path | str) -> tuple:
    out = []
    for name in PLUGIN_FILES:
        p = Path(plugin_dir) / name
        with contextlib.suppress(FileNotFoundError):
            st = p.stat()
            out.append((name, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def load_plugin(plugin_dir: Path | str, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                default_ttl: int = DEFAULT_WORKLOAD_TTL, max_ttl: int = MAX_WORKLOAD_TTL) -> Authority:
    """Istio's plug-in layout; the signing cert must be a CA, match its key and chain to a trusted root."""
    d = Path(plugin_dir)
    for name in ("ca-cert.pem", "ca-key.pem", "root-cert.pem"):
        if not (d / name).exists():
            raise CAError(f"{d}: plug-in CA needs {name}")
    signer = load_certs((d / "ca-cert.pem").read_bytes(), str(d / "ca-cert.pem"))[0]
    key = _load_private_key(d / "ca-key.pem")
    _check_pair(signer, key, str(d / "ca-key.pem"))
    try:
        bc = signer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CAError(f"{d / 'ca-cert.pem'}: not a CA certificate (BasicConstraints CA=true missing)")
    roots = load_certs((d / "root-cert.pem").read_bytes(), str(d / "root-cert.pem"))
    chain = (load_certs((d / "cert-chain.pem").read_bytes(), str(d / "cert-chain.pem"))
             if (d / "cert-chain.pem").exists() else [signer])
    if chain[0] != signer:
        raise CAError(f"{d / 'cert-chain.pem'}: must start with ca-cert.pem")
    # every link must be signed by the next, and the top must be (or be issued by) a trusted root
    for child, parent in zip(chain, chain[1:], strict=False):
        _verify_issued(child, parent, str(d / "cert-chain.pem"))
    top = chain[-1]
    anchor = next((r for r in roots if r == top), None) or next((r for r in roots if r.subject == top.issuer), None)
    if anchor is None:
        raise CAError(f"{d}: cert-chain.pem does not end at a certificate of root-cert.pem")
    if anchor != top:
        _verify_issued(top, anchor, str(d / "root-cert.pem"))
    ordered = [anchor] + [r for r in roots if r != anchor]
    return Authority(trust_domain=trust_domain, signer_cert=signer, signer_key=key, chain_above=chain[1:],
                     trusted_roots=ordered, default_ttl=default_ttl, max_ttl=max_ttl, source=str(d))


def _verify_issued(child: x509.Certificate, parent: x509.Certificate, where: str) -> None:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, Exception) as e:
        raise CAError(f"{where}: {child.subject.rfc4514_string()} is not issued by "
                      f"{parent.subject.rfc4514_string()} ({e})") from None


# ---------------------------------------------------------------------------------------------------------------
# Root rotation of the self-signed store: add → activate → retire. Each step is one atomic state write.


@dataclass
class RootInfo:
    id: str
    sha256: str
    not_after: dt.datetime
    key_type: str
    signing: bool
    trusted: bool


def roots_status(data_dir: Path | str) -> list[RootInfo]:
    d = ca_dir(data_dir)
    state = _read_state(d)
    if state is None:
        raise CAError(f"{d}: no CA here (state.json missing)")
    out = []
    for rd in sorted((d / "roots").iterdir(), key=lambda p: int(p.name.split("-")[1])):
        cert = load_certs((rd / "cert.pem").read_bytes(), str(rd / "cert.pem"))[0]
        kt = "rsa" if isinstance(cert.public_key(), rsa.RSAPublicKey) else "ec"
        out.append(RootInfo(rd.name, fingerprint(cert), cert.not_valid_after_utc, kt,
                            rd.name == state.signing, rd.name in state.trusted))
    return out


def rotate_add(data_dir: Path | str, key_type: str = "ec") -> str:
    """Phase 1: a new root, trusted by everyone; the old one still signs."""
    d = ca_dir(data_dir)
    with locked(d):
        state = _read_state(d)
        if state is None:
            raise CAError(f"{d}: no CA here to rotate (start certauth once, or run `mizzen ca root`)")
        rid = _create_root(d, state.trust_domain, key_type)
        state.trusted.append(rid)
        _write_state(d, state)
        return rid


def rotate_activate(data_dir: Path | str, root_id: str | None = None) -> str:
    """Phase 2: new certificates are signed by the newest trusted root (or `root_id`)."""
    d = ca_dir(data_dir)
    with locked(d):
        state = _read_state(d)
        if state is None:
            raise CAError(f"{d}: no CA here")
        target = root_id or state.trusted[-1]
        if target not in state.trusted:
            raise CAError(f"root {target!r} is not trusted (trusted: {', '.join(state.trusted)}); add it first")
        state.signing = target
        _write_state(d, state)
        return target


def rotate_retire(data_dir: Path | str, root_id: str | None = None) -> list[str]:
    """Phase 3: stop trusting `root_id`, or every root except the signing one; returns the retired ids."""
    d = ca_dir(data_dir)
    with locked(d):
        state = _read_state(d)
        if state is None:
            raise CAError(f"{d}: no CA here")
        if root_id is not None:
            if root_id == state.signing:
                raise CAError(f"root {root_id!r} still signs; activate another root first")
            if root_id not in state.trusted:
                raise CAError(f"root {root_id!r} is not trusted (trusted: {', '.join(state.trusted)})")
            retired = [root_id]
        else:
            retired = [r for r in state.trusted if r != state.signing]
        state.trusted = [r for r in state.trusted if r not in retired]
        _write_state(d, state)
        return retired


def parse_ttl(text: str) -> int:
    """Seconds from `3600`, a Go duration (`24h`, `90m`, `1h30m`) or days (`90d`); positive, whole seconds."""
    from mizzen.services.mesh.duration import parse_duration

    s = str(text).strip()
    try:
        if s.isdigit():
            value = float(s)
        elif s.endswith("d") and s[:-1].replace(".", "", 1).isdigit():
            value = float(s[:-1]) * 86400
        else:
            value = parse_duration(s)
    except ValueError:
        raise ValueError(f"duration {text!r}: want seconds, a Go duration like 24h or days like 90d") from None
    if value < 1:
        raise ValueError(f"duration {text!r}: must be at least 1s")
    return int(value)
