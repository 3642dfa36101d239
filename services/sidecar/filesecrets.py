"""File-mounted certificates served over the agent's SDS: `file-cert:<chain>~<key>` and `file-root:<ca>`.

The translator names these secrets, as istiod does, for a DestinationRule `tls` with clientCertificate /
privateKey / caCertificates paths and for a Gateway server with serverCertificate / privateKey /
caCertificates paths. The agent reads the files when a stream first asks for such a name:

- `file-cert:<chain>~<key>` → `tls_certificate` (chain and key inline); the chain must hold at least one PEM
  certificate, the key must be a PEM private key and match the chain's first certificate;
- `file-root:<ca>` → `validation_context.trusted_ca` (the file's certificates, inline: other PEM blocks and
  text are left out); every certificate block must parse.

A name that is malformed or whose files are missing or invalid is not served (Envoy keeps waiting for it, as
with istio-agent, whose SDS returns an error for it): the error names the resource and the file, is logged
once per distinct error and kept in `errors` (shown on `/debug/certs`). The agent keeps polling, so the
secret goes out as soon as the files are right.

Every `--file-poll` seconds the watched files are read again; a changed, valid content is `set()` in the
store, which pushes it on the open SDS streams (SotW and delta) — Envoy uses it for new handshakes, nothing
reconnects. A rotation caught half-way (a new chain beside the old key) fails the key check and keeps the
previous secret until the next poll. Contents, keys above all, never reach a log line or an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from .sds import SecretStore

CERT_PREFIX = "file-cert:"
ROOT_PREFIX = "file-root:"
SEPARATOR = "~"
DEFAULT_POLL_SECONDS = 5.0

log = logging.getLogger("mizzen.agent.files")


class FileSecretError(Exception):
    """A file secret that cannot be served; the message names the resource and the file, never its content."""


@dataclass(frozen=True)
class FileRef:
    """What a `file-cert:` / `file-root:` name points at (key is None for a root)."""

    name: str
    chain: Path
    key: Path | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.chain,) if self.key is None else (self.chain, self.key)


def is_file_secret(name: str) -> bool:
    return name.startswith((CERT_PREFIX, ROOT_PREFIX))


def parse_name(name: str) -> FileRef:
    """`file-cert:<chain>~<key>` or `file-root:<ca>` (as istio-agent: exactly two paths, exactly one)."""
    if name.startswith(CERT_PREFIX):
        parts = name[len(CERT_PREFIX):].split(SEPARATOR)
        if len(parts) != 2 or not all(parts):
            raise FileSecretError(f"SDS resource {name!r}: want file-cert:<certificate file>~<key file>")
        return FileRef(name, Path(parts[0]), Path(parts[1]))
    if name.startswith(ROOT_PREFIX):
        path = name[len(ROOT_PREFIX):]
        if not path or SEPARATOR in path:
            raise FileSecretError(f"SDS resource {name!r}: want file-root:<CA certificates file>")
        return FileRef(name, Path(path))
    raise FileSecretError(f"SDS resource {name!r} is not a file secret")


def _read(ref: FileRef, path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FileSecretError(f"SDS resource {ref.name!r}: cannot read {what} file {path}: "
                              f"{e.strerror or type(e).__name__}") from None
    if not data.strip():
        raise FileSecretError(f"SDS resource {ref.name!r}: {what} file {path} is empty")
    return data


def _certificates(ref: FileRef, path: Path, data: bytes, what: str) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise FileSecretError(f"SDS resource {ref.name!r}: {what} file {path} holds no PEM certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise FileSecretError(f"SDS resource {ref.name!r}: {what} file {path} holds an invalid PEM "
                              "certificate") from None


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def load(ref: FileRef) -> secret_pb2.Secret:
    """Read and check the files; the Secret Envoy gets (raises FileSecretError)."""
    chain = _read(ref, ref.chain, "certificate" if ref.key else "CA certificates")
    if ref.key is None:
        # only the certificates (as istio-agent): other PEM blocks or text in a bundle never reach Envoy
        roots = b"".join(c.public_bytes(serialization.Encoding.PEM)
                         for c in _certificates(ref, ref.chain, chain, "CA certificates"))
        return secret_pb2.Secret(name=ref.name, validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=roots)))
    leaf = _certificates(ref, ref.chain, chain, "certificate")[0]
    key_pem = _read(ref, ref.key, "private key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        # cryptography's message says nothing of the key's bytes, but ours is all the user needs
        raise FileSecretError(f"SDS resource {ref.name!r}: private key file {ref.key} holds no valid "
                              "unencrypted PEM private key") from None
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise FileSecretError(f"SDS resource {ref.name!r}: private key file {ref.key} does not match the "
                              f"first certificate of {ref.chain}")
    return secret_pb2.Secret(name=ref.name, tls_certificate=common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(inline_bytes=chain),
        private_key=base_pb2.DataSource(inline_bytes=key_pem)))


class FileSecrets:
    """The file secrets Envoy asked for: loaded on first request, re-read every `poll_seconds`."""

    def __init__(self, store: SecretStore, poll_seconds: float = DEFAULT_POLL_SECONDS) -> None:
        self.store = store
        self.poll_seconds = poll_seconds
        self.watched: dict[str, FileRef | None] = {}  # None: a malformed name (never loadable)
        self.errors: dict[str, str] = {}  # name → why it is not served (or not updated) now
        self.loads = 0  # secrets set() from files that changed the store (first loads and rotations)

    def want(self, names: Iterable[str]) -> None:
        """Called with the names a stream subscribes to: load the file secrets not yet watched."""
        for name in names:
            if not is_file_secret(name) or name in self.watched:
                continue
            try:
                self.watched[name] = parse_name(name)
            except FileSecretError as e:
                self.watched[name] = None
                self._fail(name, str(e))
                continue
            log.info("watching %s (every %.1fs)", name, self.poll_seconds)
            self.refresh(name)

    def refresh(self, name: str) -> bool:
        """Re-read one watched secret; returns whether the store changed."""
        ref = self.watched.get(name)
        if ref is None:
            return False
        try:
            secret = load(ref)
        except FileSecretError as e:
            self._fail(name, str(e) + ("; still serving the previous version" if self.store.get(name) else ""))
            return False
        if self.errors.pop(name, None) is not None:
            log.info("%s: files are valid again", name)
        version = self.store.set(secret)
        if version is None:
            return False
        self.loads += 1
        log.info("%s: loaded from %s, version %s", name, ", ".join(map(str, ref.files)), version)
        return True

    def _fail(self, name: str, message: str) -> None:
        if self.errors.get(name) != message:  # once per distinct error, not once per poll
            log.error("%s", message)
        self.errors[name] = message

    def poll(self) -> int:
        """Re-read every watched secret; returns how many changed."""
        return sum(self.refresh(n) for n in list(self.watched))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_seconds)
            if not stop.is_set():
                self.poll()
