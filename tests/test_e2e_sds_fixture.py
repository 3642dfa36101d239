"""The SDS test fixture (tests/sds_fixture.py) speaks the xDS protocol correctly, and its certificates are
what Istio's are: checked with a plain gRPC client on its unix socket (the e2e tests then show real Envoys
ACK what it serves)."""

from __future__ import annotations

import queue
import threading

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

from tests.sds_fixture import DEFAULT_SPIFFE_ID, SECRET_TYPE, SdsServer, make_ca

NODE = "sidecar~10.0.0.1~app-1.default~default.svc.cluster.local"


class Stream:
    """A client StreamSecrets stream: send() requests, recv() responses (bounded waits)."""

    def __init__(self, channel: grpc.Channel):
        self._requests: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        calls = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets(iter(self._requests.get, None))
        self._reader = threading.Thread(target=self._read, args=(calls,), daemon=True)
        self._reader.start()

    def _read(self, calls) -> None:
        try:
            for resp in calls:
                self._responses.put(resp)
        except grpc.RpcError as e:
            self._responses.put(e)

    def send(self, names: list[str], nonce: str = "", version: str = "", error: str | None = None) -> None:
        req = discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, resource_names=names, response_nonce=nonce,
                                             version_info=version)
        if not nonce:
            req.node.id = NODE
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._requests.put(req)

    def recv(self) -> discovery_pb2.DiscoveryResponse:
        got = self._responses.get(timeout=10)
        if isinstance(got, Exception):
            raise got
        return got

    def close(self) -> None:
        self._requests.put(None)
        self._reader.join(5)


def names_of(resp: discovery_pb2.DiscoveryResponse) -> list[str]:
    out = []
    for any_msg in resp.resources:
        s = secret_pb2.Secret()
        assert any_msg.Unpack(s)
        out.append(s.name)
    return sorted(out)


@pytest.fixture
def sds(tmp_path):
    with SdsServer([tmp_path / "etc/istio/proxy/SDS"]) as server:
        channel = grpc.insecure_channel(f"unix:{server.sockets[0]}")
        try:
            yield server, channel
        finally:
            channel.close()


def test_acks_nacks_stale_nonces_and_subscription_changes(sds):
    server, channel = sds
    s = Stream(channel)
    try:
        s.send(["default"])
        r1 = s.recv()
        assert r1.type_url == SECRET_TYPE and r1.version_info == server.version and r1.nonce
        assert names_of(r1) == ["default"]
        s.send(["default"], nonce=r1.nonce, version=r1.version_info)  # ACK: nothing to send
        s.send(["ROOTCA"], nonce="not-the-last-nonce")  # stale: ignored, whatever it asks for
        s.send(["ROOTCA", "default"], nonce=r1.nonce, version=r1.version_info)  # new names on an ACK
        r2 = s.recv()  # had the ACK or the stale request been answered, this would be their answer
        assert names_of(r2) == ["ROOTCA", "default"] and r2.nonce != r1.nonce
        s.send(["ROOTCA", "default"], nonce=r2.nonce, version=r1.version_info, error="rejected")  # NACK
        s.send(["ROOTCA"], nonce=r2.nonce, version=r1.version_info)
        r3 = s.recv()  # not a resend after the NACK
        assert names_of(r3) == ["ROOTCA"]
        s.send(["ROOTCA", "unknown"], nonce=r3.nonce, version=r3.version_info)
        assert names_of(s.recv()) == ["ROOTCA"]  # only what the server knows
    finally:
        s.close()
    kinds = [(e.kind, e.names) for e in server.events]
    assert kinds == [("REQUEST", ("default",)), ("ACK", ("default",)), ("STALE", ("ROOTCA",)),
                     ("ACK", ("ROOTCA", "default")), ("NACK", ("ROOTCA", "default")), ("ACK", ("ROOTCA",)),
                     ("ACK", ("ROOTCA", "unknown"))]
    assert all(e.node == NODE for e in server.events)
    assert server.nacks()[0].error == "rejected"
    assert server.acked("default") and server.acked("ROOTCA", node=NODE)


def test_other_types_are_refused_and_fetch_answers(sds):
    server, channel = sds
    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
    bad = discovery_pb2.DiscoveryRequest(type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.StreamSecrets(iter([bad]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    resp = stub.FetchSecrets(discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, resource_names=["ROOTCA"]),
                             timeout=10)
    assert names_of(resp) == ["ROOTCA"] and resp.version_info == server.version
    with pytest.raises(grpc.RpcError) as err:
        stub.FetchSecrets(discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, resource_names=["nope"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_certificates_are_istio_shaped():
    ca = make_ca()
    root = x509.load_pem_x509_certificate(ca.root_pem)
    leaf = x509.load_pem_x509_certificate(ca.cert_pem)
    key = serialization.load_pem_private_key(ca.key_pem, None)
    leaf.verify_directly_issued_by(root)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [DEFAULT_SPIFFE_ID]
    assert len(leaf.subject) == 0  # the identity is the URI SAN alone, as in Istio's workload certificates
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()


def test_secrets_carry_the_pem_inline():
    server = SdsServer(ca=make_ca("spiffe://cluster.local/ns/shop/sa/cart"))
    default, root = server.secrets["default"], server.secrets["ROOTCA"]
    assert default.tls_certificate.certificate_chain == base_pb2.DataSource(inline_bytes=server.ca.cert_pem)
    assert default.tls_certificate.private_key.inline_bytes == server.ca.key_pem
    assert root.validation_context.trusted_ca.inline_bytes == server.ca.root_pem
    assert server.ca.spiffe_id == "spiffe://cluster.local/ns/shop/sa/cart"
