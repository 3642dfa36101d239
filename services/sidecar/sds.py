"""Envoy's Secret Discovery Service as the agent serves it to its own Envoy (grpc.aio, unix socket).

`SecretStore` holds the current secrets by name — Istio's `default` (the workload's chain and key) and
`ROOTCA` (the trusted roots) — each with its own version (`<RFC3339 time>/<counter>`, as pilot-agent). A
`set()` of a changed secret wakes every open stream that watches that name, and the stream sends it at
once: a renewal or a root change reaches Envoy on the connection it already has, nothing is dropped.

`SdsServicer` speaks both flavours of `envoy.service.secret.v3.SecretDiscoveryService`:

- `StreamSecrets` (state of the world): per stream the subscribed names of the last request; a request
  whose `response_nonce` is not the last nonce sent is stale and ignored; `error_detail` is a NACK
  (recorded, not answered with the same versions again); a response goes out when the subscribed names
  changed or a subscribed secret has a version this stream has not been sent; it carries every subscribed
  secret the store knows.
- `DeltaSecrets` (incremental): per stream the subscribed names (`resource_names_subscribe` /
  `_unsubscribe`) and the version each was last sent at (seeded from `initial_resource_versions` on a
  reconnect); a response carries only the secrets whose version moved.
- `FetchSecrets` (unary) answers the names asked for.

Names the store does not hold yet are simply not answered: Envoy waits (Istio's SDS config has no initial
fetch timeout), and the secret goes out as soon as it is `set()`. A `resolver` (the agent's file secrets,
`filesecrets.py`) is told every name a stream asks for, so it can load secrets on demand. The servicer records which versions Envoy
ACKed, so the agent (and tests) can tell when a secret is in use. Nothing here logs key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"

log = logging.getLogger("mizzen.agent.sds")


def workload_secret(chain_pem: bytes, key_pem: bytes) -> secret_pb2.Secret:
    """`default`: the whole chain (leaf … root) and the key, inline."""
    return secret_pb2.Secret(name=WORKLOAD_SECRET, tls_certificate=common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(inline_bytes=chain_pem),
        private_key=base_pb2.DataSource(inline_bytes=key_pem)))


def root_secret(roots_pem: bytes) -> secret_pb2.Secret:
    """`ROOTCA`: every trusted root (both during a root rotation's overlap)."""
    return secret_pb2.Secret(name=ROOT_SECRET, validation_context=common_pb2.CertificateValidationContext(
        trusted_ca=base_pb2.DataSource(inline_bytes=roots_pem)))


class Resolver(Protocol):
    """Loads secrets on demand into the store (file secrets); `errors` says why a name is not served."""

    errors: dict[str, str]

    def want(self, names: Iterable[str]) -> None: ...


@dataclass
class SdsEvent:
    """One request Envoy sent: kind REQUEST (first on a stream), ACK, NACK or STALE."""

    stream: int
    kind: str
    names: tuple[str, ...]
    versions: dict[str, str]
    error: str = ""


class SecretStore:
    """The secrets the agent serves, by name, each with a version; wakes the streams on a change."""

    def __init__(self) -> None:
        self._secrets: dict[str, secret_pb2.Secret] = {}
        self._versions: dict[str, str] = {}
        self._counter = 0
        self._watchers: set[asyncio.Event] = set()

    def set(self, secret: secret_pb2.Secret) -> str | None:
        """Store a secret under its name; returns its new version (None when it did not change)."""
        old = self._secrets.get(secret.name)
        if old is not None and old.SerializeToString(deterministic=True) == secret.SerializeToString(
                deterministic=True):
            return None
        self._counter += 1
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        version = f"{now}/{self._counter}"
        self._secrets[secret.name] = secret
        self._versions[secret.name] = version
        for w in self._watchers:
            w.set()
        return version

    def get(self, name: str) -> secret_pb2.Secret | None:
        return self._secrets.get(name)

    def version(self, name: str) -> str | None:
        return self._versions.get(name)

    def names(self) -> list[str]:
        return sorted(self._secrets)

    def watch(self) -> asyncio.Event:
        ev = asyncio.Event()
        self._watchers.add(ev)
        return ev

    def unwatch(self, ev: asyncio.Event) -> None:
        self._watchers.discard(ev)


@dataclass
class _Stream:
    id: int
    names: set[str] = field(default_factory=set)
    sent: dict[str, str] = field(default_factory=dict)  # name → version last sent on this stream
    nonce: str = ""  # of the last response
    nonce_versions: dict[str, str] = field(default_factory=dict)  # what that response carried
    names_changed: bool = False
    nacked: dict[str, str] = field(default_factory=dict)


class SdsServicer(sds_pb2_grpc.SecretDiscoveryServiceServicer):
    def __init__(self, store: SecretStore, history: int = 1000, resolver: Resolver | None = None) -> None:
        self.store = store
        self.resolver = resolver
        self.events: deque[SdsEvent] = deque(maxlen=history)
        self.acked: dict[str, str] = {}  # name → the latest version some stream ACKed
        self.streams = 0
        self.open_streams = 0
        self._acked_cond: asyncio.Condition | None = None

    # what Envoy did
    def is_acked(self, name: str) -> bool:
        """Whether Envoy ACKed the current version of `name`."""
        v = self.store.version(name)
        return v is not None and self.acked.get(name) == v

    async def wait_acked(self, *names: str, timeout: float = 30.0) -> None:
        cond = self._cond()
        async with cond:
            await asyncio.wait_for(cond.wait_for(lambda: all(self.is_acked(n) for n in names)), timeout)

    def _cond(self) -> asyncio.Condition:
        if self._acked_cond is None:
            self._acked_cond = asyncio.Condition()
        return self._acked_cond

    async def _record(self, ev: SdsEvent) -> None:
        self.events.append(ev)
        if ev.kind == "NACK":
            log.warning("sds: Envoy rejected %s: %s", ev.versions, ev.error)
        else:
            log.debug("sds %s", ev)
        if ev.kind == "ACK":
            self.acked.update(ev.versions)
            cond = self._cond()
            async with cond:
                cond.notify_all()

    def _want(self, names: Iterable[str]) -> None:
        if self.resolver is not None:
            self.resolver.want(names)

    def _next_stream(self) -> _Stream:
        self.streams += 1
        return _Stream(self.streams)

    # --- state of the world ---
    async def StreamSecrets(self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],  # noqa: N802
                            context: grpc.aio.ServicerContext) -> None:
        st = self._next_stream()
        wake = self.store.watch()

        async def read() -> None:
            async for req in request_iterator:
                if req.type_url and req.type_url != SECRET_TYPE:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"SDS serves {SECRET_TYPE}, not {req.type_url}")
                names = set(req.resource_names)
                if st.nonce and req.response_nonce != st.nonce:
                    await self._record(SdsEvent(st.id, "STALE", tuple(sorted(names)), {}))
                    continue
                if req.HasField("error_detail"):
                    st.nacked = dict(st.nonce_versions)
                    await self._record(SdsEvent(st.id, "NACK", tuple(sorted(names)), dict(st.nonce_versions),
                                                req.error_detail.message))
                elif st.nonce:
                    await self._record(SdsEvent(st.id, "ACK", tuple(sorted(names)), dict(st.nonce_versions)))
                else:
                    await self._record(SdsEvent(st.id, "REQUEST", tuple(sorted(names)), {}))
                if names != st.names:
                    st.names, st.names_changed = names, True
                    self._want(names)
                wake.set()

        async def respond() -> None:
            resp = self._sotw_response(st)
            if resp is not None:
                await context.write(resp)

        await self._serve(wake, read(), respond)

    async def _serve(self, wake: asyncio.Event, read: Coroutine[Any, Any, None],
                     respond: Callable[[], Awaitable[None]]) -> None:
        """One stream's life: `read` handles its requests and sets `wake`; after each wake (and once at the start)
        `respond` sends what changed. Ends when the reader does, raising what it raised."""
        self.open_streams += 1
        reader = asyncio.create_task(read)
        try:
            wake.set()
            while True:
                waiter = asyncio.create_task(wake.wait())
                done, _ = await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    waiter.cancel()
                    reader.result()
                    return
                wake.clear()
                await respond()
        finally:
            self.store.unwatch(wake)
            self.open_streams -= 1
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    def _sotw_response(self, st: _Stream) -> discovery_pb2.DiscoveryResponse | None:
        current = {n: v for n in sorted(st.names) if (v := self.store.version(n)) is not None}
        if not current:
            return None
        moved = any(st.sent.get(n) != v for n, v in current.items())
        if not (moved or st.names_changed):
            return None
        if not st.names_changed and current == st.nacked:
            return None  # the same versions would be rejected again
        st.names_changed = False
        resp = discovery_pb2.DiscoveryResponse(type_url=SECRET_TYPE, nonce=uuid.uuid4().hex,
                                               version_info=max(current.values(), key=_counter))
        for n in current:
            resp.resources.add().Pack(self.store.get(n))
        st.sent.update(current)
        st.nonce, st.nonce_versions = resp.nonce, current
        return resp

    # --- incremental ---
    async def DeltaSecrets(self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],  # noqa: N802
                           context: grpc.aio.ServicerContext) -> None:
        st = self._next_stream()
        wake = self.store.watch()
        sent_by_nonce: dict[str, dict[str, str]] = {}

        async def read() -> None:
            first = True
            async for req in request_iterator:
                if req.type_url and req.type_url != SECRET_TYPE:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"SDS serves {SECRET_TYPE}, not {req.type_url}")
                if first:
                    st.sent.update(req.initial_resource_versions)
                versions = sent_by_nonce.pop(req.response_nonce, {}) if req.response_nonce else {}
                names = tuple(sorted(set(req.resource_names_subscribe)))
                if req.HasField("error_detail"):
                    await self._record(SdsEvent(st.id, "NACK", names, versions, req.error_detail.message))
                elif req.response_nonce:
                    await self._record(SdsEvent(st.id, "ACK", names, versions))
                else:
                    await self._record(SdsEvent(st.id, "REQUEST", names, {}))
                first = False
                st.names |= set(req.resource_names_subscribe)
                self._want(req.resource_names_subscribe)
                st.names -= set(req.resource_names_unsubscribe)
                for n in req.resource_names_unsubscribe:
                    st.sent.pop(n, None)
                wake.set()

        async def respond() -> None:
            changed = {n: v for n in sorted(st.names)
                       if (v := self.store.version(n)) is not None and st.sent.get(n) != v}
            if not changed:
                return
            resp = discovery_pb2.DeltaDiscoveryResponse(type_url=SECRET_TYPE, nonce=uuid.uuid4().hex,
                                                        system_version_info=max(changed.values(), key=_counter))
            for n, v in changed.items():
                r = resp.resources.add(name=n, version=v)
                r.resource.Pack(self.store.get(n))
            st.sent.update(changed)
            sent_by_nonce[resp.nonce] = changed
            if len(sent_by_nonce) > 64:  # never answered nonces must not pile up
                sent_by_nonce.pop(next(iter(sent_by_nonce)))
            await context.write(resp)

        await self._serve(wake, read(), respond)

    async def FetchSecrets(self, request: discovery_pb2.DiscoveryRequest,  # noqa: N802 - gRPC name
                           context: grpc.aio.ServicerContext) -> discovery_pb2.DiscoveryResponse:
        self._want(request.resource_names)
        known = {n: v for n in request.resource_names if (v := self.store.version(n)) is not None}
        if not known:
            errors = self.resolver.errors if self.resolver is not None else {}
            why = [errors[n] for n in request.resource_names if n in errors]
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                "; ".join(why) or f"no secret named {list(request.resource_names)}")
        resp = discovery_pb2.DiscoveryResponse(type_url=SECRET_TYPE, nonce=uuid.uuid4().hex,
                                               version_info=max(known.values(), key=_counter))
        for n in known:
            resp.resources.add().Pack(self.store.get(n))
        return resp


def _counter(version: str) -> int:
    return int(version.rsplit("/", 1)[-1])


UNIX_PATH_MAX = 107  # sockaddr_un.sun_path, less its NUL


async def serve(store: SecretStore, socket_path: Path,
                resolver: Resolver | None = None) -> tuple[grpc.aio.Server, SdsServicer]:
    """Start an SDS server on a unix socket (mode 0660 would do when Envoy shares the agent's uid; 0666
    because in tests the agent may run as root and Envoy as 1337). The socket's directory is made."""
    socket_path = Path(socket_path).absolute()
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    servicer = SdsServicer(store, resolver=resolver)
    server = grpc.aio.server()
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(servicer, server)
    # a socket address holds 107 bytes of path; Envoy connects by the relative ./etc/istio/proxy/SDS, but the
    # agent's absolute path under a deep --work-dir may be longer: bind it through its directory's fd link
    dir_fd = None
    address = str(socket_path)
    if len(os.fsencode(address)) > UNIX_PATH_MAX:
        dir_fd = os.open(socket_path.parent, os.O_PATH | os.O_DIRECTORY)
        address = f"/proc/self/fd/{dir_fd}/{socket_path.name}"
    try:
        if server.add_insecure_port(f"unix:{address}") == 0:
            raise OSError(f"cannot listen on unix:{socket_path}")
        await server.start()
    finally:
        if dir_fd is not None:
            os.close(dir_fd)  # the listening socket is bound; the link was only for the name
    os.chmod(socket_path, 0o666)
    return server, servicer
