"""Calling certauth: what an agent (and `mizzen ca sign`/`ca root`) uses.

    chain = await create_certificate("127.0.0.1:8060", csr_pem=csr, token=tok, root_certs_pem=roots)
    roots = await trust_bundle("127.0.0.1:8060", root_certs_pem=roots)

Both speak gRPC over TLS, verifying certauth's serving certificate against `root_certs_pem` (the trust bundle;
several PEM roots may be concatenated). `server_name` overrides the name checked against the certificate
(default: the host of `address`; the serving cert carries 127.0.0.1, ::1 and localhost).

The module functions keep one channel per (event loop, address, roots, server_name), so an agent renewing its
certificate reuses the TLS connection; a changed root bundle opens a new channel. `CertAuthClient` is the
explicit form (one connection per instance). Refusals raise `CertAuthError(code, message)` with the gRPC code
name (`UNAUTHENTICATED`, `PERMISSION_DENIED`, `INVALID_ARGUMENT`, `UNAVAILABLE`, …).
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass

import grpc

from mizzen.services.mesh.proto_gen.istio.v1.auth import ca_pb2
from mizzen.services.mesh.proto_gen.mizzen.v1 import trust_pb2

CREATE_CERTIFICATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
GET_TRUST_BUNDLE = "/mizzen.v1.TrustBundleService/GetTrustBundle"


class CertAuthError(Exception):
    """certauth refused the call (or could not be reached); `code` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Bundle:
    roots: list[str]
    trust_domain: str
    token_public_keys: list[str]
    signing_root_sha256: str


def _as_bytes(pem: str | bytes) -> bytes:
    return pem.encode() if isinstance(pem, str) else pem


class CertAuthClient:
    """One TLS channel to certauth."""

    def __init__(self, address: str, *, root_certs_pem: str | bytes, server_name: str | None = None) -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=_as_bytes(root_certs_pem))
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        self.address = address
        self.channel = grpc.aio.secure_channel(address, creds, options=options)
        self._create = self.channel.unary_unary(
            CREATE_CERTIFICATE, request_serializer=ca_pb2.IstioCertificateRequest.SerializeToString,
            response_deserializer=ca_pb2.IstioCertificateResponse.FromString)
        self._bundle = self.channel.unary_unary(
            GET_TRUST_BUNDLE, request_serializer=trust_pb2.GetTrustBundleRequest.SerializeToString,
            response_deserializer=trust_pb2.TrustBundle.FromString)

    async def create_certificate(self, *, csr_pem: str, token: str, validity_seconds: int | None = None,
                                 timeout: float = 30.0) -> list[str]:
        req = ca_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=int(validity_seconds or 0))
        try:
            resp = await self._create(req, metadata=(("authorization", f"Bearer {token}"),), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise CertAuthError(e.code().name, e.details() or "") from None
        return list(resp.cert_chain)

    async def bundle(self, timeout: float = 30.0) -> Bundle:
        try:
            resp = await self._bundle(trust_pb2.GetTrustBundleRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise CertAuthError(e.code().name, e.details() or "") from None
        return Bundle(list(resp.root_certs), resp.trust_domain, list(resp.token_public_keys),
                      resp.signing_root_sha256)

    async def trust_bundle(self, timeout: float = 30.0) -> list[str]:
        return (await self.bundle(timeout)).roots

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; with `grace`, calls in flight get that long to finish."""
        await self.channel.close(grace)

    async def __aenter__(self) -> CertAuthClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


# (address, server_name) → (roots, client), per event loop (grpc.aio channels belong to one loop)
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, tuple[bytes, CertAuthClient]]] = \
    weakref.WeakKeyDictionary()


_closing: set[asyncio.Task] = set()  # strong references, so the closing tasks are not garbage-collected


def _client(address: str, root_certs_pem: str | bytes, server_name: str | None) -> CertAuthClient:
    loop = asyncio.get_running_loop()
    per_loop = _clients.setdefault(loop, {})
    key = (address, server_name)
    roots = _as_bytes(root_certs_pem)
    held = per_loop.get(key)
    if held is not None and held[0] == roots:
        return held[1]
    if held is not None:  # the bundle changed (root rotation): a new channel that trusts the new roots; calls
        # still running on the old one may finish (another coroutine of the same agent may be mid-call)
        task = loop.create_task(held[1].close(grace=30.0))
        _closing.add(task)
        task.add_done_callback(_closing.discard)
    client = CertAuthClient(address, root_certs_pem=roots, server_name=server_name)
    per_loop[key] = (roots, client)
    return client


async def create_certificate(address: str, *, csr_pem: str, token: str, root_certs_pem: str,
                             validity_seconds: int | None = None, server_name: str | None = None) -> list[str]:
    """Have certauth sign `csr_pem` for the identity in `token`; PEM certs, leaf first, root last."""
    return await _client(address, root_certs_pem, server_name).create_certificate(
        csr_pem=csr_pem, token=token, validity_seconds=validity_seconds)


async def trust_bundle(address: str, *, root_certs_pem: str, server_name: str | None = None) -> list[str]:
    """Every root certauth currently trusts (PEM, the signing root first)."""
    return await _client(address, root_certs_pem, server_name).trust_bundle()


async def get_bundle(address: str, *, root_certs_pem: str, server_name: str | None = None) -> Bundle:
    """The whole bundle: roots, trust domain, token public keys, the signing root's fingerprint."""
    return await _client(address, root_certs_pem, server_name).bundle()


async def close_all() -> None:
    """Close this loop's cached channels (call before the loop ends to avoid grpc warnings)."""
    per_loop = _clients.pop(asyncio.get_running_loop(), {})
    for _roots, client in per_loop.values():
        await client.close()
