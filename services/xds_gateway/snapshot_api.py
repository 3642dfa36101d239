"""`mizzen.v1.SnapshotService` (proto/mizzen/v1/snapshot.proto): programs follow a proxy's snapshots by version
without speaking xDS. Served on the ADS port from the gateway's own SnapshotCache, so a subscriber sees what the
proxies are pushed, from the same shared resource bytes, woken by the same NATS events and resyncs.

Watch sends the current snapshot (unless the client already has that version), then every version the gateway
sees, in order. A version superseded before the gateway read it from Redis is never seen (the translator keeps
only a proxy's current manifest), exactly as with xDS; a client that falls more than MAX_BACKLOG versions behind
skips to the newest rather than buffering without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from google.protobuf import any_pb2

from mizzen.services.mesh.proto_gen.mizzen.v1 import snapshot_pb2 as pb
from mizzen.services.mesh.snapstore import PROXIES
from mizzen.services.mesh.xds_types import PUSH_ORDER, SHORT

from .cache import ProxyView, SnapshotCache

log = logging.getLogger("mizzen.xds_gateway.snapshot_api")

SERVICE = "mizzen.v1.SnapshotService"
MAX_BACKLOG = 256
RESOLVE_INTERVAL = 0.5  # how often a Watch for a pod without a snapshot yet looks again
_LONG = {v: k for k, v in SHORT.items()}


class ProxyNotFound(LookupError):
    pass


def parse_types(types) -> frozenset[str]:
    """Type URLs from URLs or their short names (CDS, EDS, LDS, RDS); empty means all."""
    out = set()
    for t in types:
        url = _LONG.get(t.upper(), t)
        if "/" not in url:
            raise ValueError(f"unknown type {t!r}: give a type URL or one of {', '.join(sorted(_LONG))}")
        out.add(url)
    return frozenset(out)


def ordered_types(versions: dict[str, str]) -> list[str]:
    return [t for t in PUSH_ORDER if t in versions] + sorted(t for t in versions if t not in PUSH_ORDER)


async def resolve(cache: SnapshotCache, name: str) -> str:
    """A node id as given, or the one proxy whose `<pod>.<ns>` part matches (`<pod>` means namespace default)."""
    if "~" in name:
        return name
    pod_id = name if "." in name else f"{name}.default"
    ids = sorted(p.decode() for p in await cache.redis.smembers(PROXIES))
    found = [p for p in ids if len(p.split("~")) == 4 and p.split("~")[2] == pod_id]
    if not found:
        raise ProxyNotFound(f"no proxy {pod_id!r} has a snapshot")
    return found[0]


async def snapshot_message(cache: SnapshotCache, view: ProxyView, types: frozenset[str], names_only: bool,
                           previous: dict[str, str] | None) -> pb.Snapshot:
    m = view.manifest
    msg = pb.Snapshot(proxy=m.proxy, version=m.version, revision=m.revision, type_versions=m.versions)
    all_types = ordered_types(m.versions)
    msg.changed_types.extend(all_types if previous is None else
                             [t for t in all_types if previous.get(t) != m.versions.get(t)]
                             + sorted(t for t in previous if t not in m.versions))
    for t in all_types:
        rs = view.resources(t)
        entries = rs.entries if rs is not None else {}
        msg.counts[t] = len(entries)
        if types and t not in types:
            continue
        await cache.ensure(t, entries.values())  # the bytes streams share: usually already in memory
        for name, h in entries.items():
            any_msg = any_pb2.Any.FromString(cache.any_bytes(t, h))
            res = msg.resources.add(name=name, type_url=t, hash=h, size=len(any_msg.value))
            if not names_only:
                res.resource.CopyFrom(any_msg)
    return msg


class SnapshotService:
    def __init__(self, cache: SnapshotCache):
        self.cache = cache
        self.watchers = 0

    async def get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext) -> pb.Snapshot:
        types = await self._types(request.types, context)
        try:
            proxy = await resolve(self.cache, request.proxy)
        except ProxyNotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        view = await self.cache.view(proxy)
        if view is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"proxy {proxy!r} has no snapshot")
        return await snapshot_message(self.cache, view, types, request.names_only, None)

    async def watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext):
        types = await self._types(request.types, context)
        if not request.proxy and not request.namespace:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "WatchRequest needs proxy or namespace")
        sub = _Subscription(self.cache)
        self.watchers += 1
        try:
            if request.proxy:
                proxy = await self._resolve_waiting(request.proxy, context)
                await sub.add(proxy, request.since_version)
                log.info("snapshot watch", extra={"proxy": proxy, "since": request.since_version})
                discover = None
            else:
                log.info("snapshot watch", extra={"namespace": request.namespace})
                discover = asyncio.create_task(self._discover(sub, request.namespace, dict(request.since_versions)))
            while True:
                view = await sub.next()
                m = view.manifest
                last = sub.last.get(m.proxy)
                # skip what the client has, and anything older than it (a replica lagging behind another)
                if last is not None and (m.version == last[0] or m.revision < last[1]):
                    continue
                previous = sub.previous.get(m.proxy)
                msg = await snapshot_message(self.cache, view, types, request.names_only, previous)
                await context.write(msg)
                sub.last[m.proxy] = (m.version, m.revision)
                sub.previous[m.proxy] = dict(m.versions)
        finally:
            if discover is not None:
                discover.cancel()
            self.watchers -= 1
            sub.close()

    async def _discover(self, sub: _Subscription, namespace: str, since: dict[str, str]) -> None:
        """Follow the namespace's proxies: new ones join the subscription (their current snapshot first)."""
        while True:
            ids = sorted(p.decode() for p in await self.cache.redis.smembers(PROXIES))
            for proxy in ids:
                if proxy not in sub.handles and _namespace(proxy) == namespace:
                    await sub.add(proxy, since.get(proxy, ""))
            await asyncio.sleep(RESOLVE_INTERVAL)

    async def _resolve_waiting(self, name: str, context: grpc.aio.ServicerContext) -> str:
        """Watch may start before the pod exists: look again until it has a snapshot (or the client leaves)."""
        while True:
            try:
                return await resolve(self.cache, name)
            except ProxyNotFound:
                await asyncio.sleep(RESOLVE_INTERVAL)

    @staticmethod
    async def _types(types, context: grpc.aio.ServicerContext) -> frozenset[str]:
        try:
            return parse_types(types)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise  # abort raises; this keeps type checkers honest


class _Subscription:
    """The proxies one Watch follows: a cache watch each, their views in one queue, in arrival order."""

    def __init__(self, cache: SnapshotCache):
        self.cache = cache
        self.queue: asyncio.Queue[ProxyView] = asyncio.Queue()
        self.handles: dict[str, int] = {}
        self.last: dict[str, tuple[str, int]] = {}  # proxy → (version, revision) the client has
        self.previous: dict[str, dict[str, str]] = {}  # proxy → type versions of the last message sent

    def _on_view(self, view: ProxyView | None) -> None:
        if view is None:
            return  # a deleted snapshot: nothing new to show; the next one arrives as usual
        if self.queue.qsize() >= MAX_BACKLOG:
            # far behind: keep the newest view per proxy (older ones are superseded anyway)
            newest: dict[str, ProxyView] = {}
            with contextlib.suppress(asyncio.QueueEmpty):
                while True:
                    v = self.queue.get_nowait()
                    newest[v.manifest.proxy] = v
            for v in newest.values():
                self.queue.put_nowait(v)
        self.queue.put_nowait(view)

    async def add(self, proxy: str, since: str) -> None:
        self.handles[proxy] = self.cache.watch(proxy, self._on_view)  # before reading: no change falls between
        if since:
            self.last[proxy] = (since, _revision(since))
        current = await self.cache.view(proxy)
        if current is not None:
            self.queue.put_nowait(current)

    async def next(self) -> ProxyView:
        return await self.queue.get()

    def close(self) -> None:
        for proxy, handle in self.handles.items():
            self.cache.unwatch(proxy, handle)
        self.handles.clear()


def _namespace(node_id: str) -> str:
    parts = node_id.split("~")
    return parts[2].partition(".")[2] if len(parts) == 4 else ""


def _revision(version: str) -> int:
    head = version.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


def snapshot_handler(cache: SnapshotCache) -> grpc.GenericRpcHandler:
    svc = SnapshotService(cache)
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Watch": grpc.unary_stream_rpc_method_handler(
            svc.watch, request_deserializer=pb.WatchRequest.FromString,
            response_serializer=pb.Snapshot.SerializeToString),
        "Get": grpc.unary_unary_rpc_method_handler(
            svc.get, request_deserializer=pb.GetRequest.FromString,
            response_serializer=pb.Snapshot.SerializeToString),
    })
