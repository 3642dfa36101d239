"""What SotW and delta streams share: identifying the proxy, watching its snapshot, the event loop of one
stream (requests and snapshot wake-ups handled one at a time, in order), and status/metrics reporting."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import orjson

from mizzen.services.mesh.bus import PROXY_CONNECTED, Bus
from mizzen.services.mesh.settings import XDS_PUSH_SLOTS
from mizzen.services.mesh.tracing import PushTrace
from mizzen.services.mesh.xds_types import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE

from .cache import ProxyView, ResourceSet, SnapshotCache
from .metrics import Metrics, short
from .status import StatusRecorder, node_info, proxy_version

log = logging.getLogger("mizzen.xds_gateway.stream")

_conn_ids = itertools.count(1)
_WAKE = object()
_CLOSED = object()


@dataclass
class Gateway:
    """Everything a stream needs from the process around it."""

    cache: SnapshotCache
    status: StatusRecorder | None
    metrics: Metrics
    replica: str
    bus: Bus | None = None
    streams: set = field(default_factory=set)
    pending_wakes: int = 0
    warm_timeout: float = 3.0  # longest LDS/RDS wait for new clusters' endpoints
    push_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(XDS_PUSH_SLOTS))
    slot_lease: float = 1.0  # seconds a push may hold its slot before it must give it back (stuck clients)
    pushes_in_flight: int = 0
    sotw_requests: dict = field(default_factory=dict)  # (type, names) -> a request asking them (sotw._names)

    def idle(self) -> bool:
        """No push going on or waiting."""
        return not self.pushes_in_flight and not self.pending_wakes and not self.cache.queue_depth

    def update_queue_gauge(self) -> None:
        self.metrics.queue_depth.set(self.cache.queue_depth + self.pending_wakes)


def order_types(types) -> list[str]:
    """PUSH_ORDER first (CDS, EDS, LDS, RDS), then any other requested type."""
    rest = sorted(t for t in types if t not in PUSH_ORDER)
    return [t for t in PUSH_ORDER if t in types] + rest


@dataclass(slots=True)  # four per stream: slots keep 10,000 streams' worth small
class TypeStatus:
    """What status reports per type (both protocols)."""

    sent_nonce: str = ""
    acked_nonce: str = ""
    sent_version: str = ""
    acked_version: str = ""
    basis: str = ""  # manifest type version the last sent content reflects ("" while held back)
    error: str = ""
    error_nonce: str = ""
    sent_at: float = 0.0
    acked_at: float = 0.0
    pending_since: float = 0.0  # when the change being pushed was first seen (latency metric)

    def doc(self) -> dict:
        return {"sent_nonce": self.sent_nonce, "acked_nonce": self.acked_nonce, "sent_version": self.sent_version,
                "acked_version": self.acked_version, "basis": self.basis, "error": self.error,
                "error_nonce": self.error_nonce, "sent_at": self.sent_at, "acked_at": self.acked_at}


class _Inbox:
    """A stream's requests and wake-ups, in order, for its one reader: asyncio.Queue without the parts one
    reader needs none of (its four deques cost ~3 KiB per stream, 30 MiB for 10,000 streams)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class Stream:
    api = "sotw"

    def __init__(self, gw: Gateway, context: grpc.aio.ServicerContext):
        self.gw = gw
        self.context = context
        self.conn_id = f"{gw.replica}-{os.getpid()}-{next(_conn_ids)}"
        self.proxy = ""
        self.node_info: dict[str, Any] = {}
        self.version = ""  # istioctl's VERSION column, from the node (the node itself is kept under proxynode:)
        self.connected_at = time.time()
        self.view: ProxyView | None = None
        self.view_seen_at = 0.0
        self.status: dict[str, TypeStatus] = {}
        self._inbox = _Inbox()
        self._wake_pending = False
        self._next_view: ProxyView | None = None
        self._closed = False
        self.warming: set[str] = set()  # clusters just sent whose endpoints Envoy has not ACKed yet
        self.warming_deadline = 0.0
        self.eds_resend: set[str] = set()  # EDS clusters CDS just replaced: their endpoints go again
        self._watch: int | None = None
        self._nonce = itertools.count(1)
        self.trace: PushTrace | None = None  # the config change being pushed, when it is traced

    # ---- helpers for subclasses ----
    def next_nonce(self) -> str:
        return f"{next(self._nonce)}"

    def type_status(self, t: str) -> TypeStatus:
        st = self.status.get(t)
        if st is None:
            st = self.status[t] = TypeStatus()
        return st

    def desired(self, t: str, wildcard: bool, names: frozenset[str]) -> ResourceSet:
        """The resources of type t this stream should hold now."""
        assert self.view is not None
        full = self.view.resources(t)
        if wildcard:  # all of the type (explicitly named ones are in it when they exist)
            return full if full is not None else self.gw.cache.empty(t)
        return self.gw.cache.subset(full, t, names)

    def basis(self, t: str) -> str:
        return self.view.manifest.versions.get(t, "") if self.view is not None else ""

    def record_sent(self, t: str, nonce: str, version: str, basis: str, size: int, since: float,
                    count: int) -> None:
        st = self.type_status(t)
        st.sent_nonce, st.sent_version, st.basis, st.sent_at = nonce, version, basis, time.time()
        if self.trace is not None:
            self.trace.sent(t, nonce, version)
        if not st.pending_since:
            st.pending_since = since
        m, s = self.gw.metrics, short(t)
        m.pushes.values[(s, self.api)] += 1
        m.push_bytes.values[(s,)] += size
        m.resources_sent.values[(s,)] += count
        self.changed()

    def record_ack(self, t: str, nonce: str, version: str) -> None:
        st = self.type_status(t)
        st.acked_nonce, st.acked_version, st.acked_at = nonce, version, time.time()
        if self.trace is not None:
            self.trace.answered(t, nonce, None)
        st.error = st.error_nonce = ""
        m = self.gw.metrics
        if st.pending_since:
            m.child(m.push_latency, short(t)).observe(max(0.0, time.monotonic() - st.pending_since))
            st.pending_since = 0.0
        m.acks.values[(short(t),)] += 1
        self.changed()

    def record_nack(self, t: str, nonce: str, message: str) -> None:
        st = self.type_status(t)
        st.error, st.error_nonce = message or "rejected (no detail)", nonce
        if self.trace is not None:
            self.trace.answered(t, nonce, st.error)
        st.pending_since = 0.0
        self.gw.metrics.nacks.labels(short(t)).inc()
        log.warning("proxy rejected config", extra={"proxy": self.proxy, "type": short(t), "nonce": nonce,
                                                    "error_detail": message})
        self.changed()

    def changed(self) -> None:
        if self.gw.status is not None and self.proxy:
            self.gw.status.changed(self)

    def status_doc(self) -> dict:
        return {"proxy": self.proxy, "conn": self.conn_id, "replica": self.gw.replica, "api": self.api,
                "connected_at": self.connected_at, "version": self.version,
                "manifest_version": self.view.manifest.version if self.view else "",
                "types": {t: s.doc() for t, s in self.status.items()}}

    def references_settled(self) -> bool:
        """True once listeners and routes the proxy holds match the current snapshot and are ACKed, so clusters
        they no longer reference can go (make-before-break)."""
        return all(self.type_settled(t) for t in (LISTENER, ROUTE))

    def type_settled(self, t: str) -> bool:
        raise NotImplementedError

    # ---- new clusters warm before listeners and routes use them ----
    def clusters_added(self, names: list[str]) -> None:
        """CDS just carried these new clusters: hold LDS/RDS until Envoy has ACKed their endpoints (a route to a
        cluster that is still warming answers 503), or until the warm-up deadline passes."""
        eds = self.view.resources(ENDPOINT) if self.view is not None else None
        waiting = eds.present(set(names)) if eds is not None and names else ()  # EDS clusters (Istio names)
        if waiting:
            self.warming.update(waiting)
            self.warming_deadline = time.monotonic() + self.gw.warm_timeout
            asyncio.get_running_loop().call_later(self.gw.warm_timeout + 0.01, self.wake)

    def clusters_changed(self, names: Iterable[str]) -> None:
        """CDS just replaced these existing EDS clusters (same name, new content). Envoy warms each new version
        until it gets endpoints, but does not ask for them again (the names it subscribes did not change) and
        holds its CDS ACK meanwhile, so without a fresh EDS response the new version never becomes active and
        the old one keeps serving. Their assignments go right after the CDS response, as istiod pushes EDS with
        every CDS: Envoy registers the new versions' EDS watches while it processes CDS, before it reads EDS."""
        self.eds_resend.update(names)  # filtered to EDS clusters when taken (set operations, not a loop per name)

    def take_eds_resend(self, going: frozenset[str] = frozenset()) -> set[str]:
        """The endpoint assignments to send again now, less those `going` out anyway (a full push: all)."""
        names, self.eds_resend = self.eds_resend, set()
        if going:
            names -= going
        eds = self.view.resources(ENDPOINT) if self.view is not None else None
        return eds.present(names) if names and eds is not None else set()

    def endpoints_acked(self) -> set[str] | frozenset[str]:
        """Names of the endpoint assignments Envoy has ACKed (and nothing newer is outstanding)."""
        raise NotImplementedError

    def cds_outstanding(self) -> bool:
        raise NotImplementedError

    def clusters_warming(self) -> bool:
        if not self.warming:
            return False
        if time.monotonic() >= self.warming_deadline:
            log.info("clusters still warming at deadline; pushing listeners and routes anyway",
                     extra={"proxy": self.proxy, "warming": sorted(self.warming)[:10]})
            self.warming.clear()
            return False
        if self.cds_outstanding():
            return True
        self.warming -= self.endpoints_acked()
        return bool(self.warming)

    # ---- identification ----
    async def identify(self, node: Any) -> None:
        self.proxy = node.id
        if not self.proxy:
            await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first request must carry node.id")
        self.node_info = node_info(node)
        self.version = proxy_version(self.node_info)
        self._watch = self.gw.cache.watch(self.proxy, self._on_snapshot)
        self.view = await self.gw.cache.view(self.proxy)
        self.view_seen_at = time.monotonic()
        if self.gw.status is not None:
            try:
                await self.gw.status.connected(self)
            except Exception as e:  # noqa: BLE001 - serving config matters more than reporting it
                log.warning("could not record connection of %s: %s", self.proxy, e)
        if self.gw.bus is not None and self.gw.bus.nc is not None:
            payload = {"proxy": self.proxy, "replica": self.gw.replica, "node": self.node_info}
            await self.gw.bus.publish(PROXY_CONNECTED, orjson.dumps(payload))
        log.info("proxy connected", extra={"proxy": self.proxy, "api": self.api, "conn": self.conn_id,
                                           "has_snapshot": self.view is not None})

    def _on_snapshot(self, view: ProxyView | None) -> None:
        if view is None:
            return  # a deleted snapshot keeps the proxy's last config; nothing to push
        # applied by the stream's own loop, between pushes: one push never mixes two snapshots
        self._next_view = view
        self.wake()

    def wake(self) -> None:
        if not self._wake_pending and not self._closed:
            self._wake_pending = True
            self.gw.pending_wakes += 1
            self._inbox.put_nowait(_WAKE)

    def _trace_view(self) -> None:
        """A new snapshot: its push is a child of the translator span that announced it (when traced)."""
        if self.trace is not None:
            self.trace.finish("superseded")
        tp = self.view.traceparent if self.view is not None else None
        self.trace = PushTrace.begin(tp, self.proxy, self.view.manifest.version, self.api, self.gw.replica) \
            if tp else None

    # ---- the stream's loop ----
    async def run(self, request_iterator) -> None:
        self.gw.streams.add(self)
        self.gw.metrics.streams.labels(self.api).inc()
        self.gw.metrics.connected.labels(self.api).inc()
        reader = asyncio.create_task(self._read(request_iterator))
        try:
            while True:
                item = await self._inbox.get()
                if item is _CLOSED:
                    break
                if isinstance(item, BaseException):
                    raise item
                if item is _WAKE:
                    self._wake_pending = False
                    self.gw.pending_wakes -= 1
                    self.gw.update_queue_gauge()
                    if self._next_view is not None:
                        self.view, self._next_view = self._next_view, None
                        self.view_seen_at = self.view.seen_at
                        self._trace_view()
                    await self._push_in_slot()
                else:
                    await self.handle(item)
                if self.trace is not None and self.trace.idle():
                    self.trace = None
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("stream failed", extra={"proxy": self.proxy, "conn": self.conn_id})
            raise
        finally:
            self._closed = True
            if self.trace is not None:
                self.trace.finish("disconnected")
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            if self._wake_pending:
                self.gw.pending_wakes -= 1
            self.gw.streams.discard(self)
            self.gw.metrics.connected.labels(self.api).dec()
            if self._watch is not None:
                self.gw.cache.unwatch(self.proxy, self._watch)
            if self.gw.status is not None and self.proxy:
                with contextlib.suppress(Exception):
                    await self.gw.status.disconnected(self)
            log.info("proxy disconnected", extra={"proxy": self.proxy, "conn": self.conn_id})

    async def _push_in_slot(self) -> None:
        """Push within one of the capped in-flight slots. A stream whose client does not read (a stuck Envoy:
        gRPC flow control blocks the write) gives its slot back after `slot_lease` seconds and finishes the
        write outside it, so a few stuck proxies never hold up everyone else's pushes."""
        slots = self.gw.push_slots
        started = time.monotonic()
        await slots.acquire()
        self.gw.pushes_in_flight += 1
        held = [True]

        def release() -> None:
            if held[0]:
                held[0] = False
                self.gw.pushes_in_flight -= 1
                slots.release()

        lease = asyncio.get_running_loop().call_later(self.gw.slot_lease, release)
        try:
            await self.push(self.view_seen_at)
        finally:
            lease.cancel()
            release()
            self.gw.metrics.push_seconds.observe(time.monotonic() - started)

    async def _read(self, request_iterator) -> None:
        try:
            async for req in request_iterator:
                self._inbox.put_nowait(req)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the client went away
            log.debug("stream read ended: %s", e)
        self._inbox.put_nowait(_CLOSED)

    async def send(self, data: bytes) -> None:
        await self.context.write(data)

    async def handle(self, req: Any) -> None:
        raise NotImplementedError

    async def push(self, since: float) -> None:
        raise NotImplementedError


# Types whose absence from a SotW response removes them on the client (the others are only ever added).
STATE_OF_THE_WORLD_TYPES = {CLUSTER, LISTENER}
ENDPOINT_TYPE = ENDPOINT
