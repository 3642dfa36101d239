"""A small but real SDS server for tests, until the certauth service lands.

Envoy's `SecretDiscoveryService.StreamSecrets` (state of the world, gRPC) on one or more unix sockets — the
path a sidecar bootstrap's `sds-grpc` cluster names (`./etc/istio/proxy/SDS`, relative to Envoy's working
directory). It serves Istio's two secret names:

  default   the workload's certificate chain and key: a SPIFFE certificate
            (`spiffe://cluster.local/ns/default/sa/default` unless told otherwise) signed by a test CA
  ROOTCA    a validation context trusting that CA

The certificates are made with `cryptography` when the server is created (EC P-256, valid for a day).

Protocol, per stream (xDS SotW, as Envoy's GrpcMux speaks it):
- a request whose `response_nonce` is not the last nonce sent on the stream is stale and ignored;
- a request carrying `error_detail` is a NACK of that nonce: recorded, nothing resent;
- otherwise it ACKs the last response (or is the first request); a response goes out only when the
  subscribed names changed (first request, or a new set of names), with a fresh nonce and the version of
  the secret set; resources only for names the server knows.

    with SdsServer([pod.work_dir / "etc/istio/proxy/SDS"]) as sds:
        ... start Envoy ...
        sds.wait_acked("default", "ROOTCA")
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"
DEFAULT_SPIFFE_ID = "spiffe://cluster.local/ns/default/sa/default"

log = logging.getLogger("tests.sds_fixture")


# --- certificates ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FixtureCA:
    """A self-signed root and one workload certificate it signed, all PEM."""

    root_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    spiffe_id: str
    ca_key_pem: bytes = b""  # the root's key, so `issue` can sign more workload certificates under it


def make_ca(spiffe_id: str = DEFAULT_SPIFFE_ID, trust_domain: str = "cluster.local") -> FixtureCA:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                         x509.NameAttribute(NameOID.COMMON_NAME, "Mizzen test root CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_pem, key_pem = _leaf(ca_name, ca_key, spiffe_id)
    pem = serialization.Encoding.PEM
    return FixtureCA(
        root_pem=ca_cert.public_bytes(pem),
        cert_pem=cert_pem,
        key_pem=key_pem,
        spiffe_id=spiffe_id,
        ca_key_pem=ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def issue(ca: FixtureCA, spiffe_id: str) -> FixtureCA:
    """A workload certificate for another identity under the same root (e.g. a second client's service account,
    for AuthorizationPolicy principals)."""
    root = x509.load_pem_x509_certificate(ca.root_pem)
    ca_key = serialization.load_pem_private_key(ca.ca_key_pem, None)
    cert_pem, key_pem = _leaf(root.subject, ca_key, spiffe_id)  # type: ignore[arg-type]
    return FixtureCA(ca.root_pem, cert_pem, key_pem, spiffe_id, ca.ca_key_pem)


def _leaf(ca_name: x509.Name, ca_key: ec.EllipticCurvePrivateKey, spiffe_id: str) -> tuple[bytes, bytes]:
    now = datetime.datetime.now(datetime.UTC)
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    key = ec.generate_private_key(ec.SECP256R1())
    # As Istio's workload certificates: empty subject, so the URI SAN is the identity and marked critical.
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([])).issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return cert.public_bytes(pem), key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption())


def secrets_for(ca: FixtureCA) -> dict[str, secret_pb2.Secret]:
    """Istio's SDS resources: `default` (chain + key) and `ROOTCA` (trusted CA)."""
    return {
        WORKLOAD_SECRET: secret_pb2.Secret(name=WORKLOAD_SECRET, tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=ca.cert_pem),
            private_key=base_pb2.DataSource(inline_bytes=ca.key_pem))),
        ROOT_SECRET: secret_pb2.Secret(name=ROOT_SECRET, validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=ca.root_pem))),
    }


# --- the server --------------------------------------------------------------------------------------------


@dataclass
class SdsEvent:
    """One request Envoy sent: kind is REQUEST (first on a stream / new names), ACK, NACK or STALE."""

    stream: int
    node: str
    kind: str
    names: tuple[str, ...]
    version: str
    nonce: str
    error: str = ""


class _Servicer(sds_pb2_grpc.SecretDiscoveryServiceServicer):
    def __init__(self, server: SdsServer):
        self.server = server

    def StreamSecrets(self, request_iterator: Iterable[discovery_pb2.DiscoveryRequest],  # noqa: N802 - gRPC name
                      context: grpc.ServicerContext) -> Iterator[discovery_pb2.DiscoveryResponse]:
        stream = self.server._next_stream()
        node = ""
        last_nonce = ""  # the nonce of the last response on this stream
        answered: tuple[str, ...] | None = None  # the names that response answered
        for req in request_iterator:
            node = node or req.node.id
            names = tuple(sorted(req.resource_names))
            if req.type_url and req.type_url != SECRET_TYPE:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"SDS serves {SECRET_TYPE}, not {req.type_url}")
            if last_nonce and req.response_nonce != last_nonce:
                self.server._record(SdsEvent(stream, node, "STALE", names, req.version_info, req.response_nonce))
                continue
            if req.HasField("error_detail"):
                self.server._record(SdsEvent(stream, node, "NACK", names, req.version_info, req.response_nonce,
                                             req.error_detail.message))
                if names == answered:
                    continue  # the same request again would be rejected again
            elif last_nonce:
                self.server._record(SdsEvent(stream, node, "ACK", names, req.version_info, req.response_nonce))
                if names == answered:
                    continue
            else:
                self.server._record(SdsEvent(stream, node, "REQUEST", names, req.version_info, ""))
            resp = self.server._response(names)
            if resp is None:
                continue  # nothing known under those names: Envoy keeps waiting
            last_nonce, answered = resp.nonce, names
            yield resp

    def FetchSecrets(self, request: discovery_pb2.DiscoveryRequest,  # noqa: N802 - gRPC name
                     context: grpc.ServicerContext) -> discovery_pb2.DiscoveryResponse:
        resp = self.server._response(tuple(sorted(request.resource_names)))
        if resp is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no secret named {list(request.resource_names)}")
        return resp


class SdsServer:
    """StreamSecrets/FetchSecrets on unix sockets (created mode 0666: Envoy runs as another uid)."""

    def __init__(self, sockets: Iterable[Path] = (), ca: FixtureCA | None = None):
        self.ca = ca or make_ca()
        self.secrets = secrets_for(self.ca)
        self.version = hashlib.sha256(b"".join(s.SerializeToString(deterministic=True)
                                               for s in self.secrets.values())).hexdigest()[:12]
        self.events: list[SdsEvent] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._streams = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="sds"))
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(_Servicer(self), self._server)
        self.sockets: list[Path] = []
        self._started = False
        for path in sockets:
            self.add_socket(path)

    def add_socket(self, path: Path) -> Path:
        """Listen on one more socket (before start(): gRPC binds all ports at start)."""
        if self._started:
            raise RuntimeError("add sockets before start()")
        path = Path(path).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        if self._server.add_insecure_port(f"unix:{path}") == 0:
            raise OSError(f"cannot listen on unix:{path}")
        self.sockets.append(path)
        return path

    def start(self) -> SdsServer:
        self._server.start()
        self._started = True
        for path in self.sockets:
            os.chmod(path, 0o666)
        return self

    def stop(self) -> None:
        self._server.stop(grace=0).wait(5)
        for path in self.sockets:
            path.unlink(missing_ok=True)

    def __enter__(self) -> SdsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # what Envoy did
    def acked(self, name: str, node: str | None = None) -> bool:
        """Whether some stream (of `node`, when given) ACKed the current version of secret `name`."""
        with self._lock:
            return any(e.kind == "ACK" and name in e.names and e.version == self.version
                       and (node is None or e.node == node) for e in self.events)

    def nacks(self) -> list[SdsEvent]:
        with self._lock:
            return [e for e in self.events if e.kind == "NACK"]

    def wait_acked(self, *names: str, node: str | None = None, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                missing = [n for n in names if not any(
                    e.kind == "ACK" and n in e.names and e.version == self.version
                    and (node is None or e.node == node) for e in self.events)]
                nacks = [e for e in self.events if e.kind == "NACK"]
                if nacks:
                    raise AssertionError(f"Envoy rejected secrets: {nacks}")
                if not missing:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no ACK of {missing} (node {node}) within {timeout}s; events: {self.events}")
                self._changed.wait(left)

    # internals
    def _next_stream(self) -> int:
        with self._lock:
            self._streams += 1
            return self._streams

    def _record(self, event: SdsEvent) -> None:
        log.debug("sds %s", event)
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def _response(self, names: tuple[str, ...]) -> discovery_pb2.DiscoveryResponse | None:
        known = [self.secrets[n] for n in names if n in self.secrets]
        if not known:
            return None
        resp = discovery_pb2.DiscoveryResponse(version_info=self.version, type_url=SECRET_TYPE,
                                               nonce=uuid.uuid4().hex)
        for secret in known:
            resp.resources.add().Pack(secret)
        return resp
