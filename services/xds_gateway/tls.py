"""xDS over TLS (the gateway's 15012, as istiod's): a serving certificate from certauth, renewed, and the
callers' workload tokens checked.

- The gateway's identity comes from its own token (`--token-file`, from `mizzen token --namespace istio-system
  --service-account xds-gateway`): it makes a key, gets it signed by certauth exactly as an agent does
  (`AgentCore`: renewal at half-life, trust-bundle following) and serves the chain through gRPC's dynamic
  server credentials, so a renewed certificate is used for the next handshake with no listener restart.
- Sidecars send `authorization: Bearer <token>` on the ADS stream (the agent's bootstrap puts it in the
  `xds-grpc` initial metadata); `TokenCheck.check()` verifies it against the token public keys certauth
  publishes in its trust bundle (re-read with the bundle). A stream on the TLS port without a valid token is
  refused with UNAUTHENTICATED; the plaintext port stays open for local tooling, as istiod's 15010.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc

log = logging.getLogger("mizzen.xds_gateway.tls")


@dataclass
class TlsOptions:
    port: int
    ca: str
    ca_root_cert: Path
    token_file: Path
    trust_domain: str = "cluster.local"
    ca_server_name: str | None = None
    root_poll_seconds: float = 30.0
    cert_ttl: int | None = None


@dataclass
class TokenCheck:
    public_keys: list = field(default_factory=list)
    audience: str = "istio-ca"

    def check(self, metadata: tuple | None) -> str | None:
        """None when the call carries a valid token, else the reason (never the token itself)."""
        from mizzen.services.certauth import tokens

        auth = ""
        for key, value in metadata or ():
            if key == "authorization":
                auth = value if isinstance(value, str) else value.decode()
        if not auth.startswith("Bearer "):
            return "no bearer token in the authorization metadata"
        if not self.public_keys:
            return "no token public keys loaded yet"
        try:
            tokens.verify(auth[len("Bearer "):].strip(), self.public_keys, self.audience)
        except tokens.TokenError as e:
            return str(e)
        return None


class ServingCert:
    """The gateway's certificate from certauth, kept fresh; hands gRPC the newest one on each handshake."""

    def __init__(self, opts: TlsOptions):
        from mizzen.services.sidecar.agent import AgentCore, CertauthSource, spiffe_id, split_pem

        self.opts = opts
        ns, sa = _token_subject(opts.token_file.read_text().strip())  # the identity the token names
        self.identity = spiffe_id(opts.trust_domain, ns, sa)
        self.source = CertauthSource(opts.ca, lambda: opts.token_file.read_text().strip(),
                                     split_pem(opts.ca_root_cert.read_text()), opts.ca_server_name)
        self.core = AgentCore(self.source, self.identity, validity_seconds=opts.cert_ttl,
                              root_poll_seconds=opts.root_poll_seconds)
        self.tokens = TokenCheck()
        self._served_version: str | None = None
        self._task: asyncio.Task | None = None

    async def start(self, stop: asyncio.Event) -> None:
        await self.core.start(stop)
        await self.refresh_token_keys()
        self._task = asyncio.create_task(self._run(stop))

    async def refresh_token_keys(self) -> None:
        from mizzen.services.certauth import client, tokens

        bundle = await client.get_bundle(self.opts.ca, root_certs_pem=self.source._trust(),
                                         server_name=self.opts.ca_server_name)
        keys = tokens.parse_public_keys("".join(bundle.token_public_keys), "certauth's token public keys")
        self.tokens.public_keys = keys

    async def _run(self, stop: asyncio.Event) -> None:
        async def keys_loop() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.opts.root_poll_seconds)
                try:
                    await self.refresh_token_keys()
                except Exception as e:  # noqa: BLE001 - keep the last keys
                    log.warning("token keys refresh failed: %s", e)

        await asyncio.gather(self.core.run(stop), keys_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def _config(self) -> grpc.ServerCertificateConfiguration:
        secret = self.core.store.get("default")
        tc = secret.tls_certificate
        return grpc.ssl_server_certificate_configuration(
            [(tc.private_key.inline_bytes, tc.certificate_chain.inline_bytes)])

    def credentials(self) -> grpc.ServerCredentials:
        self._served_version = self.core.store.version("default")

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # called by gRPC before handshakes: a new configuration only when the certificate was renewed
            version = self.core.store.version("default")
            if version == self._served_version:
                return None
            self._served_version = version
            return self._config()

        return grpc.dynamic_ssl_server_credentials(self._config(), fetch, require_client_authentication=False)


def _token_subject(token: str) -> tuple[str, str]:
    """(namespace, service account) a token names (unverified: certauth verifies it when it signs)."""
    import base64
    import json

    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return claims["namespace"], claims["service_account"]
    except (IndexError, KeyError, ValueError) as e:
        raise ValueError(f"--token-file: not a Mizzen workload token ({type(e).__name__})") from None


def is_tls(context: grpc.aio.ServicerContext) -> bool:
    with contextlib.suppress(Exception):
        return context.auth_context().get("transport_security_type") == [b"ssl"]
    return False
