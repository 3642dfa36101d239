"""Build a workload key and its CSR for a SPIFFE identity, as pilot-agent does inside the pod: the CSR carries
the public key and the SPIFFE URI SAN and nothing else (no subject). ECDSA P-256 by default; RSA 2048 as an
option (Istio's default, about 40 ms a key here against 0.01 ms for P-256)."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .ca import spiffe_id


@dataclass(frozen=True)
class KeyAndCSR:
    key_pem: str  # PKCS#8 PEM private key: keep it in the pod, hand it to Envoy over SDS only
    csr_pem: str
    identity: str


def make_csr(key, identity: str) -> str:
    """A PEM CSR for `key` whose only content is the URI SAN `identity`."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def new_key_and_csr(identity: str | None = None, *, trust_domain: str = "cluster.local",
                    namespace: str | None = None, service_account: str | None = None,
                    key_type: str = "ec") -> KeyAndCSR:
    """A fresh key and CSR for `identity`, or for spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>."""
    if identity is None:
        if not namespace or not service_account:
            raise ValueError("give identity, or namespace and service_account")
        identity = spiffe_id(trust_domain, namespace, service_account)
    if key_type == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    elif key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise ValueError(f"key type {key_type!r}: want 'ec' or 'rsa'")
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return KeyAndCSR(key_pem=key_pem, csr_pem=make_csr(key, identity), identity=identity)
