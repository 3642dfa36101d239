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
        if not request.proxy:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "WatchRequest.proxy is required")
        proxy = await self._resolve_waiting(request.proxy, context)
        queue: asyncio.Queue[ProxyView] = asyncio.Queue()

        def on_view(view: ProxyView | None) -> None:
            if view is None:
                return  # a deleted snapshot: nothing new to show; the next one arrives as usual
            if queue.qsize() >= MAX_BACKLOG:
                with contextlib.suppress(asyncio.QueueEmpty):
                    while True:
                        queue.get_nowait()
            queue.put_nowait(view)

        handle = self.cache.watch(proxy, on_view)  # before reading the current view: no change falls between
        self.watchers += 1
        log.info("snapshot watch", extra={"proxy": proxy, "since": request.since_version})
        try:
            last_version = request.since_version
            last_revision = _revision(last_version)
            previous: dict[str, str] | None = None
            current = await self.cache.view(proxy)
            pending = [current] if current is not None else []
            while True:
                for view in pending:
                    m = view.manifest
                    # skip what the client has, and anything older than it (a replica lagging behind another)
                    if m.version == last_version or m.revision < last_revision:
                        continue
                    msg = await snapshot_message(self.cache, view, types, request.names_only, previous)
                    await context.write(msg)
                    last_version, last_revision, previous = m.version, m.revision, dict(m.versions)
                pending = [await queue.get()]
        finally:
            self.watchers -= 1
            self.cache.unwatch(proxy, handle)

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
