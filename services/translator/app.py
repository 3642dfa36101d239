"""The translator service shell: re-reads state from Redis on each config event (coalescing bursts), rebuilds
snapshots with the pure core, stores them content-addressed and announces the ones that changed.

A translator that starts late, or missed events while NATS was away, rebuilds from Redis: events only wake it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import time

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..mesh import locality, settings, tracing
from ..mesh.bus import CONFIG_CHANGED, PROXY_CONNECTED, Bus, snapshot_subject
from ..mesh.service import health_routes, relax_gc, serve_http
from ..mesh.snapstore import CONNECTED, PROXY_NODE, PreparedLayer, SnapshotStore, prepare_layer
from ..mesh.store import ConfigStore, connect
from .proxies import pod_node_ids
from .proxy import Proxy
from .push_context import PushContext
from .shards import Membership
from .snapshot import build_snapshot, reuse_previous

log = logging.getLogger("mizzen.translator")

class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.builds = Counter("mizzen_translator_builds", "Builds by kind (full, endpoints, routing, proxies)", ["kind"],
                              registry=r)
        self.build_seconds = Histogram("mizzen_translator_build_seconds", "Time to build and store snapshots",
                                       ["kind"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.push_seconds = Histogram("mizzen_translator_push_seconds",
                                      "Time to store the changed snapshots and announce them",
                                      buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.snapshots_changed = Counter("mizzen_translator_snapshots_changed", "Snapshots stored with new content",
                                         registry=r)
        self.proxies = Gauge("mizzen_translator_proxies", "Proxies this replica builds", registry=r)
        self.revision = Gauge("mizzen_translator_revision", "Config revision of the last build", registry=r)
        self.queue_depth = Gauge("mizzen_translator_pending_events", "Config events not yet built", registry=r)
        self.coalesced = Counter("mizzen_translator_coalesced_events",
                                 "Events merged into a build that another event already triggered", registry=r)
        self.debounce_seconds = Histogram("mizzen_translator_debounce_seconds",
                                          "Time from the first event of a burst to its build",
                                          buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.errors = Counter("mizzen_translator_build_errors", "Rebuilds that failed", registry=r)
        self.replicas = Gauge("mizzen_translator_replicas", "Live translator replicas sharing the proxies",
                              registry=r)
        self.gc_deleted = Counter("mizzen_translator_snapshot_gc_deleted", "Unreferenced snapshot layers and "
                                  "resources deleted", registry=r)


class LayerSerializer:
    """Serialises layers for storage. A layer object, and a message inside one, is serialised once and kept
    while the builds keep using it: layers carried over from the previous revision (and the unchanged
    assignments inside a rebuilt endpoints layer) cost nothing to store again."""

    def __init__(self) -> None:
        self._layers: dict[int, tuple[object, PreparedLayer]] = {}
        self._messages: dict[int, tuple[object, bytes]] = {}
        self._used_layers: dict[int, tuple[object, PreparedLayer]] = {}
        self._used_messages: dict[int, tuple[object, bytes]] = {}

    def begin(self, keep: bool) -> None:
        """Start a build; `keep` False forgets everything (a full rebuild makes new objects anyway)."""
        if not keep:
            self._layers, self._messages = {}, {}
        self._used_layers, self._used_messages = {}, {}

    def end(self, partial: bool) -> None:
        """After a build: keep what it used (plus, for a build of a few proxies, everything known before)."""
        if partial:
            self._layers.update(self._used_layers)
            self._messages.update(self._used_messages)
        else:
            self._layers, self._messages = self._used_layers, self._used_messages

    def _bytes(self, m) -> bytes:
        hit = self._used_messages.get(id(m)) or self._messages.get(id(m))
        if hit is None or hit[0] is not m:
            hit = (m, m.SerializeToString(deterministic=True))
        self._used_messages[id(m)] = hit
        return hit[1]

    def layers(self, layers: list[dict]) -> list[PreparedLayer]:
        out = []
        for layer in layers:
            hit = self._used_layers.get(id(layer)) or self._layers.get(id(layer))
            if hit is None or hit[0] is not layer:
                hit = (layer, prepare_layer({t: {n: self._bytes(m) for n, m in res.items()}
                                             for t, res in layer.items()}))
            self._used_layers[id(layer)] = hit
            out.append(hit[1])
        return out


def serialize_layers(layers: list[dict], cache: dict[int, PreparedLayer]) -> list[PreparedLayer]:
    """Serialize and hash each layer once per object (for callers outside the service)."""
    out = []
    for layer in layers:
        key = id(layer)
        prepared = cache.get(key)
        if prepared is None:
            prepared = prepare_layer({t: {n: m.SerializeToString(deterministic=True) for n, m in res.items()}
                                      for t, res in layer.items()})
            cache[key] = prepared
        out.append(prepared)
    return out


def _kind_of(key: str) -> str:
    return key.split("/", 1)[0]


class Translator:
    """Builds the snapshots of the proxies this replica owns.

    Events are debounced like istiod's: a build starts once no event came for `debounce` seconds, or
    `debounce_max` seconds after the first event of a burst, whichever is first. Everything that arrived meanwhile
    is merged into one change set (changed config keys, new proxies), so each proxy is built and pushed at most
    once per coalesced change. The change set decides the cost: new proxies only → just their layers (the
    shared ones come from the last push context); Endpoints (or Nodes, Pods) only → the previous layers carried
    over and only the changed assignments built; VirtualServices/DestinationRules only → the parts of each
    outbound layer they reach rebuilt (`routing`); anything else → a full rebuild (snapshot.reuse_previous)."""

    def __init__(self, store: ConfigStore, snapshots: SnapshotStore, bus: Bus, metrics: Metrics,
                 debounce: float = 0.1, debounce_max: float = 1.0, membership: Membership | None = None):
        self.store = store
        self.snapshots = snapshots
        self.bus = bus
        self.metrics = metrics
        self.debounce = debounce
        self.debounce_max = max(debounce_max, debounce)
        self.membership = membership
        self.dirty = asyncio.Event()
        self.built_revision = -1
        self.ready = False
        self.pending = 0
        self.first_event = 0.0
        self.last_event = 0.0
        # the merged change set: config keys changed (None: unknown, rebuild everything), new proxies
        self.changed_keys: set[str] | None = None
        self.full = True
        self.new_proxies: set[str] = set()
        self.push: PushContext | None = None
        self.built: set[str] = set()  # proxies built from self.push
        self.serializer = LayerSerializer()
        self.gc_candidates: set[str] = set()
        self.trace_parents: list[str] = []  # traceparents of the config events the next build answers

    def _event(self) -> None:
        now = time.monotonic()
        if self.pending == 0:
            self.first_event = now
        else:
            self.metrics.coalesced.inc()
        self.last_event = now
        self.pending += 1
        self.metrics.queue_depth.set(self.pending)
        self.dirty.set()

    def poke(self, keys: list[str] | None = None) -> None:
        """A config change (keys known) or a reason to rebuild everything (keys None)."""
        if keys is None:
            self.full = True
        elif not self.full:
            if self.changed_keys is None:
                self.changed_keys = set()
            self.changed_keys.update(keys)
        self._event()

    async def on_config(self, msg) -> None:
        tp = tracing.header(msg.headers)
        if tp and len(self.trace_parents) < 64:
            self.trace_parents.append(tp)
        try:
            doc = orjson.loads(msg.data)
            rev, keys = doc.get("revision", 0), doc.get("keys")
        except (orjson.JSONDecodeError, AttributeError):
            rev, keys = None, None
        if rev is None or rev > self.built_revision:
            self.poke(keys if isinstance(keys, list) else None)

    async def on_proxy(self, msg) -> None:
        try:
            proxy = orjson.loads(msg.data).get("proxy")
        except (orjson.JSONDecodeError, AttributeError):
            proxy = None
        if not isinstance(proxy, str) or not proxy:
            self.poke(None)
            return
        if self.membership is not None and not self.membership.mine(proxy):
            return
        self.new_proxies.add(proxy)
        self._event()

    async def node_info(self, node_ids: list[str]) -> dict[str, tuple[dict, str]]:
        """What each proxy last connected with: its node metadata (access-log path, labels, interception
        mode…) and its node.locality as `region/zone/subzone`."""
        if not node_ids:
            return {}
        docs = await self.store.r.mget([PROXY_NODE + n for n in node_ids])
        out = {}
        for n, d in zip(node_ids, docs, strict=True):
            if d:
                doc = orjson.loads(d)
                out[n] = (doc.get("metadata") or {}, locality.from_node(doc.get("locality")))
        return out

    def _mine(self, node_ids) -> list[str]:
        if self.membership is None:
            return sorted(node_ids)
        return sorted(n for n in node_ids if self.membership.mine(n))

    async def rebuild(self) -> None:
        """Build what the merged change set needs (see the class docstring)."""
        full, keys, new_proxies = self.full, self.changed_keys, self.new_proxies
        self.full, self.changed_keys, self.new_proxies = False, None, set()
        # One build may answer several coalesced events: a child of the first, linked to the others.
        parents, self.trace_parents = self.trace_parents, []
        span = (tracing.start("translator build", parents[0], kind="consumer", links=parents[1:])
                if parents else tracing.NOOP)
        try:
            await self._build(full, keys, new_proxies, span)
        except BaseException as e:
            self.full = True  # retry everything: we do not know how far this got
            span.error(repr(e))
            raise
        finally:
            span.end()

    async def _build(self, full: bool, keys: set[str] | None, new_proxies: set[str], span=tracing.NOOP) -> None:
        t0 = time.perf_counter()
        revision = await self.store.revision()
        if (not full and not keys and self.push is not None and revision == self.push.revision
                and self.built_revision == revision):
            # connected proxies are built again even if known: their node metadata shapes the snapshot
            todo = sorted(new_proxies)
            if todo:
                await self._store(self.push, todo, t0, "proxies", remove=False, span=span)
            return
        revision, objects = await self.store.snapshot()
        connected = [p.decode() for p in await self.store.r.smembers(CONNECTED)]
        push = PushContext.from_resources(objects, revision=revision)
        kind = "full"
        if not full and keys and self.push is not None:
            kind = reuse_previous(self.push, push, {_kind_of(k) for k in keys})
        all_ids = set(pod_node_ids(objects)) | set(connected)
        self.push = push
        self.built = set()
        await self._store(push, self._mine(all_ids), t0, kind, remove=True, all_ids=all_ids, span=span)

    async def _store(self, push: PushContext, node_ids: list[str], t0: float, kind: str, remove: bool,
                     all_ids: set[str] | None = None, span=tracing.NOOP) -> None:
        nodes = await self.node_info(node_ids)
        self.serializer.begin(keep=kind != "full")
        items = []
        for node_id in node_ids:
            metadata, node_locality = nodes.get(node_id, ({}, ""))
            proxy = Proxy.from_node_id(node_id, push, metadata=metadata, node_locality=node_locality)
            items.append((node_id, self.serializer.layers(build_snapshot(push, proxy).layers)))
        self.serializer.end(partial=kind == "proxies")
        t1 = time.perf_counter()
        stored = await self.snapshots.put_many(push.revision, items)
        changed = [(node_id, m) for (node_id, _), (m, did_change) in zip(items, stored, strict=True) if did_change]
        if remove and all_ids is not None:
            known = set(await self.snapshots.proxies())
            for gone in known - all_ids:
                if self.membership is None or self.membership.mine(gone):
                    await self.snapshots.remove(gone)
        for node_id, manifest in changed:
            pub = (tracing.start("translator snapshot", span, {"mizzen.proxy": node_id,
                                                                "mizzen.snapshot.version": manifest.version},
                                 kind="producer") if span.recording else tracing.NOOP)
            await self.bus.publish(snapshot_subject(node_id),
                                   orjson.dumps({"revision": manifest.revision, "version": manifest.version}),
                                   headers=pub.headers())
            pub.end()
        span.set("mizzen.revision", push.revision)
        span.set("mizzen.build", kind)
        span.set("mizzen.proxies", len(node_ids))
        span.set("mizzen.snapshots_changed", len(changed))
        self.built.update(node_ids)
        self.built_revision = push.revision
        dt = time.perf_counter() - t0
        self.metrics.builds.labels(kind).inc()
        self.metrics.build_seconds.labels(kind).observe(dt)
        self.metrics.push_seconds.observe(time.perf_counter() - t1)
        self.metrics.snapshots_changed.inc(len(changed))
        if kind != "proxies":
            self.metrics.proxies.set(len(node_ids))
        self.metrics.revision.set(push.revision)
        log.info("built snapshots", extra={"revision": push.revision, "kind": kind, "proxies": len(node_ids),
                                           "changed": len(changed), "seconds": round(dt, 4)})

    async def _debounced(self, stop: asyncio.Event) -> None:
        """Wait until the burst is quiet for `debounce` s, or `debounce_max` s after its first event."""
        while not stop.is_set():
            now = time.monotonic()
            wait = min(self.last_event + self.debounce, self.first_event + self.debounce_max) - now
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def run(self, stop: asyncio.Event) -> None:
        self.poke(None)  # a translator that starts late builds from Redis at once
        while not stop.is_set():
            waiter = asyncio.create_task(self.dirty.wait())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if stop.is_set():
                break
            await self._debounced(stop)
            self.dirty.clear()
            self.metrics.debounce_seconds.observe(time.monotonic() - self.first_event)
            self.pending = 0
            self.metrics.queue_depth.set(0)
            try:
                await self.rebuild()
                self.ready = True
            except Exception:  # noqa: BLE001 - keep serving the last snapshots; retry on the next event or soon
                self.metrics.errors.inc()
                log.exception("rebuild failed; retrying")
                await asyncio.sleep(1.0)
                self.poke(None)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mizzen translator", description="Run the Mizzen translator service.")
    p.add_argument("--http-host", default=settings.env("MIZZEN_TRANSLATOR_HOST", "127.0.0.1"))
    p.add_argument("--http-port", type=int, default=int(settings.env("MIZZEN_TRANSLATOR_HTTP_PORT", "15081")),
                   help="/healthz/ready and /metrics")
    p.add_argument("--nats-url", default=None)
    p.add_argument("--redis-url", default=None)
    p.add_argument("--debounce", type=float, default=float(settings.env("MIZZEN_TRANSLATOR_DEBOUNCE", "0.1")),
                   help="seconds without events before a build starts (istiod's PILOT_DEBOUNCE_AFTER)")
    p.add_argument("--debounce-max", type=float, default=float(settings.env("MIZZEN_TRANSLATOR_DEBOUNCE_MAX", "1")),
                   help="longest a burst of events delays its build (istiod's PILOT_DEBOUNCE_MAX)")
    p.add_argument("--replica-id", default=settings.env("MIZZEN_TRANSLATOR_REPLICA", ""),
                   help="name in the replica heartbeat set (default host-pid); replicas split the proxies")
    p.add_argument("--heartbeat", type=float, default=float(settings.env("MIZZEN_TRANSLATOR_HEARTBEAT", "1")),
                   help="seconds between replica heartbeats; a replica silent for 3 heartbeats is dead")
    p.add_argument("--resync-interval", type=float, default=float(settings.env("MIZZEN_TRANSLATOR_RESYNC", "30")),
                   help="seconds between revision checks, a safety net for lost events")
    p.add_argument("--gc-interval", type=float, default=float(settings.env("MIZZEN_SNAPSHOT_GC_INTERVAL", "60")),
                   help="seconds between sweeps of snapshot layers/resources no proxy references (0: never)")
    p.add_argument("--log-level", default=settings.env("MIZZEN_LOG_LEVEL", "info"))
    return p


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    redis = connect(settings.redis_url(args.redis_url))
    bus = Bus(settings.nats_url(args.nats_url), "mizzen-translator")
    await bus.connect()
    metrics = Metrics()
    replica = args.replica_id or f"translator-{socket.gethostname()}-{os.getpid()}"
    membership = Membership(redis, replica, ttl=3 * args.heartbeat)
    tr = Translator(ConfigStore(redis), SnapshotStore(redis), bus, metrics, debounce=args.debounce,
                    debounce_max=args.debounce_max, membership=membership)

    async def resync() -> None:
        tr.poke(None)

    async def heartbeat() -> None:
        while not stop.is_set():
            try:
                if await membership.heartbeat():
                    log.info("translator replicas changed", extra={"replicas": list(membership.members)})
                    tr.poke(None)  # our share moved: build what is ours now
                metrics.replicas.set(len(membership.members))
            except Exception as e:  # noqa: BLE001 - Redis away; keep the last member list
                log.warning("replica heartbeat failed: %s", e)
            await asyncio.sleep(args.heartbeat)

    with contextlib.suppress(Exception):
        await membership.heartbeat()  # know the others before the first build

    bus.on_reconnect = resync
    await bus.subscribe(CONFIG_CHANGED, tr.on_config)
    await bus.subscribe(PROXY_CONNECTED, tr.on_proxy)
    app = web.Application()
    health_routes(app, lambda: tr.ready and bus.connected.is_set(), metrics.registry)
    runner = await serve_http(app, args.http_host, args.http_port)
    relax_gc()  # a build allocates tens of thousands of objects: default young collections were ~20% of it

    async def safety_net() -> None:
        while not stop.is_set():
            await asyncio.sleep(args.resync_interval)
            try:
                if await tr.store.revision() != tr.built_revision:
                    tr.poke(None)
            except Exception:  # noqa: BLE001 - Redis away; the next tick retries
                pass

    async def garbage_collector() -> None:
        while args.gc_interval > 0 and not stop.is_set():
            await asyncio.sleep(args.gc_interval)
            try:
                deleted, tr.gc_candidates = await tr.snapshots.collect_garbage(tr.gc_candidates)
                metrics.gc_deleted.inc(deleted)
            except Exception as e:  # noqa: BLE001 - Redis away; the next sweep retries
                log.warning("snapshot garbage collection failed: %s", e)

    net = asyncio.create_task(safety_net())
    gc = asyncio.create_task(garbage_collector())
    hb = asyncio.create_task(heartbeat())
    try:
        await tr.run(stop)
    finally:
        net.cancel()
        gc.cancel()
        hb.cancel()
        with contextlib.suppress(Exception):
            # hand our share over at once, not after the heartbeat TTL; with Redis away the retrying client would
            # hold the shutdown for many seconds, and the TTL hands the share over anyway
            await asyncio.wait_for(membership.leave(), timeout=1.0)
        await runner.cleanup()
        await bus.close()
        await redis.aclose()
        log.info("translator stopped")
