"""certauth's shell: the gRPC (TLS) server for istio.v1.auth.IstioCertificateService and
mizzen.v1.TrustBundleService, the health/metrics HTTP port, and the poll that lets every replica follow
root rotation and plug-in file changes without a restart.

The signing path is the CA core (ca.py) plus token checks (tokens.py); this file maps their refusals to gRPC
codes, exactly as istiod's `security/pkg/pki/error` does: authentication → UNAUTHENTICATED, a CSR that does not
parse / verify and a TTL above the maximum → INVALID_ARGUMENT, an identity the caller does not hold →
PERMISSION_DENIED, anything else → INTERNAL. Messages name the reason, never a token or a key.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry, Counter, Gauge

from mizzen.services.mesh.grpcserver import admission_options
from mizzen.services.mesh.proto_gen.istio.v1.auth import ca_pb2
from mizzen.services.mesh.proto_gen.mizzen.v1 import trust_pb2
from mizzen.services.mesh.service import health_routes, serve_http

from . import ca, tokens

log = logging.getLogger("certauth")

CA_SERVICE = "istio.v1.auth.IstioCertificateService"
TRUST_SERVICE = "mizzen.v1.TrustBundleService"
TOKEN_CACHE_MAX = 100_000


@dataclass
class Options:
    host: str = "127.0.0.1"
    port: int = 8060
    http_host: str = "127.0.0.1"
    http_port: int = 8061
    data_dir: Path = Path.home() / ".mizzen"
    plugin_dir: Path | None = None
    trust_domain: str = ca.DEFAULT_TRUST_DOMAIN
    key_type: str = "ec"
    default_ttl: int = ca.DEFAULT_WORKLOAD_TTL
    max_ttl: int = ca.MAX_WORKLOAD_TTL
    dns_names: list[str] = field(default_factory=lambda: ["localhost", "certauth.istio-system.svc",
                                                          "istiod.istio-system.svc"])
    ip_sans: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1"])
    reload_interval: float = 2.0
    audience: str = tokens.DEFAULT_AUDIENCE
    serving_ttl: int = 24 * 3600
    grace: float = 3.0
    reuse_port: bool = False


def load_authority(opts: Options) -> tuple[ca.Authority, tuple]:
    if opts.plugin_dir is not None:
        version = ca.plugin_version(opts.plugin_dir)
        return ca.load_plugin(opts.plugin_dir, opts.trust_domain, opts.default_ttl, opts.max_ttl), version
    version = ca.store_version(opts.data_dir)
    return ca.load_self_signed(opts.data_dir, opts.default_ttl, opts.max_ttl), version


def _file_version(path: Path) -> tuple:
    try:
        st = path.stat()
    except FileNotFoundError:
        return ()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class CertAuth:
    """The service state: the current Authority (swapped whole on reload), token keys, the serving cert."""

    def __init__(self, opts: Options, registry: CollectorRegistry) -> None:
        self.opts = opts
        if opts.plugin_dir is None:
            ca.ensure_self_signed(opts.data_dir, opts.trust_domain, opts.key_type)
        tokens.ensure_key(opts.data_dir)
        self.authority, self._version = load_authority(opts)
        self._token_file = ca.ca_dir(opts.data_dir) / tokens.PUBLIC_FILE
        self._token_version = _file_version(self._token_file)
        self.token_keys = tokens.load_public_keys(opts.data_dir)
        self._token_cache: dict[str, tokens.Claims] = {}
        self._serving_key = ec.generate_private_key(ec.SECP256R1())
        self._serving: tuple[bytes, bytes] = self._issue_serving()
        self._serving_fresh = True  # the fetcher hands a new config to gRPC once per change
        self.requests = Counter("certauth_csr_requests", "CreateCertificate calls by result", ["result"],
                                registry=registry)
        self.reloads = Counter("certauth_ca_reloads", "CA state reloads (rotation, plug-in file changes)",
                               registry=registry)
        self.roots_gauge = Gauge("certauth_trusted_roots", "roots in the trust bundle", registry=registry)
        self.roots_gauge.set(len(self.authority.trusted_roots))
        self._results = {k: self.requests.labels(k) for k in
                         ("signed", "unauthenticated", "permission_denied", "invalid_argument", "internal")}
        self._serving_signer = ca.fingerprint(self.authority.signer_cert)

    # ---- the serving certificate ----
    def _issue_serving(self) -> tuple[bytes, bytes]:
        a = self.authority
        leaf = a.issue(self._serving_key.public_key(), dns=self.opts.dns_names, ips=self.opts.ip_sans,
                       ttl=self.opts.serving_ttl)
        chain = "".join([leaf] + a.tail_pems).encode()
        key = self._serving_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())
        cert = x509.load_pem_x509_certificate(leaf.encode())
        self._serving_not_before = cert.not_valid_before_utc
        self._serving_expiry = cert.not_valid_after_utc
        return key, chain

    def serving_config(self):
        """gRPC's dynamic credentials callback (called per TLS handshake): a new config only when it changed."""
        if not self._serving_fresh:
            return None
        self._serving_fresh = False
        key, chain = self._serving
        return grpc.ssl_server_certificate_configuration([(key, chain)])

    def credentials(self) -> grpc.ServerCredentials:
        key, chain = self._serving
        self._serving_fresh = False
        initial = grpc.ssl_server_certificate_configuration([(key, chain)])
        return grpc.dynamic_ssl_server_credentials(initial, self.serving_config,
                                                   require_client_authentication=False)

    # ---- reload (rotation, plug-in changes, token keys) ----
    def reload_if_changed(self) -> bool:
        changed = False
        version = (ca.plugin_version(self.opts.plugin_dir) if self.opts.plugin_dir is not None
                   else ca.store_version(self.opts.data_dir))
        if version != self._version:
            try:
                authority, self._version = load_authority(self.opts)
            except (ca.CAError, OSError) as e:
                # half-written plug-in files: keep signing with what we have, try again next tick
                log.warning("CA files changed but do not load; keeping the current CA", extra={"reason": str(e)})
            else:
                self.authority = authority
                self.reloads.inc()
                self.roots_gauge.set(len(authority.trusted_roots))
                changed = True
                log.info("CA reloaded", extra={"signing_root": ca.fingerprint(authority.signing_root),
                                               "trusted_roots": [ca.fingerprint(r) for r in authority.trusted_roots]})
        tv = _file_version(self._token_file)
        if tv != self._token_version:
            try:
                self.token_keys = tokens.load_public_keys(self.opts.data_dir)
                self._token_version = tv
                self._token_cache.clear()
                log.info("token public keys reloaded", extra={"keys": len(self.token_keys)})
            except (tokens.TokenError, OSError) as e:
                log.warning("token public keys do not load; keeping the current ones", extra={"reason": str(e)})
        # a new signer, or half the serving cert's life gone: a new serving cert for the next handshakes
        signer = ca.fingerprint(self.authority.signer_cert)
        half = self._serving_not_before + (self._serving_expiry - self._serving_not_before) / 2
        if signer != self._serving_signer or ca.utcnow() >= half:
            self._serving = self._issue_serving()
            self._serving_signer = signer
            self._serving_fresh = True
        return changed

    # ---- authentication ----
    def authenticate(self, metadata) -> tokens.Claims:
        header = None
        for k, v in metadata or ():
            if k == "authorization":
                header = v
                break
        if not header:
            raise tokens.TokenError("no authorization metadata (want 'Bearer <token>')")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise tokens.TokenError("authorization metadata is not 'Bearer <token>'")
        token = token.strip()
        claims = self._token_cache.get(token)
        if claims is None:
            claims = tokens.verify(token, self.token_keys, self.opts.audience)
            if len(self._token_cache) >= TOKEN_CACHE_MAX:
                self._token_cache.clear()
            self._token_cache[token] = claims
        elif tokens.time.time() > claims.expires_at + tokens.LEEWAY:
            self._token_cache.pop(token, None)
            raise tokens.TokenError(f"token expired at {claims.expires_at}")
        return claims

    # ---- RPCs ----
    async def create_certificate(self, request: ca_pb2.IstioCertificateRequest, context) -> ca_pb2.IstioCertificateResponse:
        try:
            claims = self.authenticate(context.invocation_metadata())
        except tokens.TokenError as e:
            self._results["unauthenticated"].inc()
            log.info("CSR refused", extra={"code": "UNAUTHENTICATED", "reason": str(e), "peer": context.peer()})
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"request authenticate failure: {e}")
        authority = self.authority
        identity = claims.spiffe_id(authority.trust_domain)
        try:
            chain = authority.sign_csr(request.csr, identity, request.validity_duration or None)
        except ca.Forbidden as e:
            self._results["permission_denied"].inc()
            log.info("CSR refused", extra={"code": "PERMISSION_DENIED", "identity": identity, "reason": str(e)})
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except ca.InvalidRequest as e:
            self._results["invalid_argument"].inc()
            log.info("CSR refused", extra={"code": "INVALID_ARGUMENT", "identity": identity, "reason": str(e)})
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:  # never echo internals (could name key files); log the type only
            self._results["internal"].inc()
            log.error("signing failed", extra={"identity": identity, "error": type(e).__name__})
            await context.abort(grpc.StatusCode.INTERNAL, "certificate signing failed")
        self._results["signed"].inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("signed", extra={"identity": identity})
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)

    async def get_trust_bundle(self, request, context) -> trust_pb2.TrustBundle:
        a = self.authority
        return trust_pb2.TrustBundle(root_certs=a.roots_pem, trust_domain=a.trust_domain,
                                     token_public_keys=tokens.public_keys_pem(self.token_keys),
                                     signing_root_sha256=ca.fingerprint(a.signing_root))

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        return [
            grpc.method_handlers_generic_handler(CA_SERVICE, {
                "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                    self.create_certificate,
                    request_deserializer=ca_pb2.IstioCertificateRequest.FromString,
                    response_serializer=ca_pb2.IstioCertificateResponse.SerializeToString)}),
            grpc.method_handlers_generic_handler(TRUST_SERVICE, {
                "GetTrustBundle": grpc.unary_unary_rpc_method_handler(
                    self.get_trust_bundle,
                    request_deserializer=trust_pb2.GetTrustBundleRequest.FromString,
                    response_serializer=trust_pb2.TrustBundle.SerializeToString)}),
        ]


async def run_certauth(opts: Options, stop: asyncio.Event) -> None:
    registry = CollectorRegistry()
    svc = CertAuth(opts, registry)
    # SO_REUSEPORT only when asked: by default a second certauth on a taken port fails instead of silently
    # sharing the port with an unrelated CA
    # admission_options: 10,000 agents renewing at once queue for the CA instead of being cancelled
    server = grpc.aio.server(options=admission_options() + [("grpc.so_reuseport", 1 if opts.reuse_port else 0),
                                                            ("grpc.max_receive_message_length", 1 << 20)])
    server.add_generic_rpc_handlers(svc.handlers())
    try:
        bound = server.add_secure_port(f"{opts.host}:{opts.port}", svc.credentials())
    except RuntimeError:
        bound = 0
    if not bound:
        raise ca.CAError(f"cannot listen on {opts.host}:{opts.port} (in use?)")
    await server.start()
    app = web.Application()
    health_routes(app, lambda: True, registry)
    runner = await serve_http(app, opts.http_host, opts.http_port)
    a = svc.authority
    log.info("certauth serving", extra={
        "address": f"{opts.host}:{bound}", "http": f"{opts.http_host}:{opts.http_port}",
        "trust_domain": a.trust_domain, "ca": "plug-in" if opts.plugin_dir else "self-signed", "source": a.source,
        "signing_root": ca.fingerprint(a.signing_root), "trusted_roots": len(a.trusted_roots)})

    async def poll() -> None:
        while True:
            await asyncio.sleep(opts.reload_interval)
            try:
                svc.reload_if_changed()
            except Exception as e:
                log.warning("reload check failed", extra={"error": f"{type(e).__name__}: {e}"})

    poller = asyncio.create_task(poll())
    try:
        await stop.wait()
    finally:
        log.info("certauth stopping")
        poller.cancel()
        await server.stop(opts.grace)
        await runner.cleanup()
