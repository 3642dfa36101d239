"""The translator service shell: re-reads state from Redis on each config event (coalescing bursts), rebuilds
snapshots with the pure core, stores them content-addressed and announces the ones that changed.

A translator that starts late, or missed events while NATS was away, rebuilds from Redis: events only wake it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..mesh import settings, tracing
from ..mesh.bus import CONFIG_CHANGED, PROXY_CONNECTED, Bus, snapshot_subject
from ..mesh.service import health_routes, serve_http
from ..mesh.snapstore import CONNECTED, PROXY_NODE, PreparedLayer, SnapshotStore, prepare_layer
from ..mesh.store import ConfigStore, connect
from .proxies import pod_node_ids
from .proxy import Proxy
from .push_context import PushContext
from .snapshot import build_snapshot

log = logging.getLogger("mizzen.translator")

class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.builds = Counter("mizzen_translator_builds", "Full rebuilds", registry=self.registry)
        self.build_seconds = Histogram("mizzen_translator_build_seconds", "Time to rebuild every snapshot",
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.snapshots_changed = Counter("mizzen_translator_snapshots_changed", "Snapshots stored with new content",
                                         registry=self.registry)
        self.proxies = Gauge("mizzen_translator_proxies", "Proxies with a snapshot", registry=self.registry)
        self.revision = Gauge("mizzen_translator_revision", "Config revision of the last build", registry=self.registry)
        self.queue_depth = Gauge("mizzen_translator_pending_events", "Config events not yet built", registry=self.registry)
        self.errors = Counter("mizzen_translator_build_errors", "Rebuilds that failed", registry=self.registry)
        self.gc_deleted = Counter("mizzen_translator_snapshot_gc_deleted", "Unreferenced snapshot layers and "
                                  "resources deleted", registry=self.registry)


def serialize_layers(layers: list[dict], cache: dict[int, PreparedLayer]) -> list[PreparedLayer]:
    """Serialize and hash each layer once per object: layers shared between proxies are the same Python object
    (the cache lives for one build, while those objects do, so ids are not reused)."""
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


class Translator:
    def __init__(self, store: ConfigStore, snapshots: SnapshotStore, bus: Bus, metrics: Metrics, debounce: float = 0.05):
        self.store = store
        self.snapshots = snapshots
        self.bus = bus
        self.metrics = metrics
        self.debounce = debounce
        self.dirty = asyncio.Event()
        self.built_revision = -1
        self.ready = False
        self.pending = 0
        self.gc_candidates: set[str] = set()
        self.trace_parents: list[str] = []  # traceparents of the config events the next build answers

    def poke(self) -> None:
        self.pending += 1
        self.metrics.queue_depth.set(self.pending)
        self.dirty.set()

    async def on_config(self, msg) -> None:
        tp = tracing.header(msg.headers)
        if tp and len(self.trace_parents) < 64:
            self.trace_parents.append(tp)
        try:
            rev = orjson.loads(msg.data).get("revision", 0)
        except orjson.JSONDecodeError:
            rev = None
        if rev is None or rev > self.built_revision:
            self.poke()

    async def on_proxy(self, _msg) -> None:
        self.poke()

    async def node_metadata(self, node_ids: list[str]) -> dict[str, dict]:
        """The node metadata each proxy last connected with (access-log path, labels, interception mode…)."""
        if not node_ids:
            return {}
        docs = await self.store.r.mget([PROXY_NODE + n for n in node_ids])
        return {n: orjson.loads(d).get("metadata") or {} for n, d in zip(node_ids, docs, strict=True) if d}

    async def rebuild(self) -> None:
        # One build may answer several coalesced events: a child of the first, linked to the others.
        parents, self.trace_parents = self.trace_parents, []
        span = (tracing.start("translator build", parents[0], kind="consumer", links=parents[1:])
                if parents else tracing.NOOP)
        try:
            await self._rebuild(span)
        except Exception as e:
            span.error(repr(e))
            raise
        finally:
            span.end()

    async def _rebuild(self, span=tracing.NOOP) -> None:
        t0 = time.perf_counter()
        revision, objects = await self.store.snapshot()
        connected = [p.decode() for p in await self.store.r.smembers(CONNECTED)]
        push = PushContext.from_resources(objects, revision=revision)
        node_ids = sorted(set(pod_node_ids(objects)) | set(connected))
        metadata = await self.node_metadata(node_ids)
        cache: dict[int, PreparedLayer] = {}
        items = []
        for node_id in node_ids:
            proxy = Proxy.from_node_id(node_id, push, metadata=metadata.get(node_id))
            items.append((node_id, serialize_layers(build_snapshot(push, proxy).layers, cache)))
        stored = await self.snapshots.put_many(revision, items)
        changed = [(node_id, m) for (node_id, _), (m, did_change) in zip(items, stored, strict=True) if did_change]
        known = set(await self.snapshots.proxies())
        for gone in known - set(node_ids):
            await self.snapshots.remove(gone)
        for node_id, manifest in changed:
            pub = (tracing.start("translator snapshot", span, {"mizzen.proxy": node_id,
                                                                "mizzen.snapshot.version": manifest.version},
                                 kind="producer") if span.recording else tracing.NOOP)
            await self.bus.publish(snapshot_subject(node_id),
                                   orjson.dumps({"revision": manifest.revision, "version": manifest.version}),
                                   headers=pub.headers())
            pub.end()
        span.set("mizzen.revision", revision)
        span.set("mizzen.proxies", len(node_ids))
        span.set("mizzen.snapshots_changed", len(changed))
        self.built_revision = revision
        dt = time.perf_counter() - t0
        self.metrics.builds.inc()
        self.metrics.build_seconds.observe(dt)
        self.metrics.snapshots_changed.inc(len(changed))
        self.metrics.proxies.set(len(node_ids))
        self.metrics.revision.set(revision)
        log.info("built snapshots", extra={"revision": revision, "proxies": len(node_ids), "changed": len(changed),
                                           "seconds": round(dt, 4)})

    async def run(self, stop: asyncio.Event) -> None:
        self.poke()  # a translator that starts late builds from Redis at once
        while not stop.is_set():
            waiter = asyncio.create_task(self.dirty.wait())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if stop.is_set():
                break
            await asyncio.sleep(self.debounce)  # coalesce a burst of events into one build
            self.dirty.clear()
            self.pending = 0
            self.metrics.queue_depth.set(0)
            try:
                await self.rebuild()
                self.ready = True
            except Exception:  # noqa: BLE001 - keep serving the last snapshots; retry on the next event or soon
                self.metrics.errors.inc()
                log.exception("rebuild failed; retrying")
                await asyncio.sleep(1.0)
                self.dirty.set()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mizzen translator", description="Run the Mizzen translator service.")
    p.add_argument("--http-host", default=settings.env("MIZZEN_TRANSLATOR_HOST", "127.0.0.1"))
    p.add_argument("--http-port", type=int, default=int(settings.env("MIZZEN_TRANSLATOR_HTTP_PORT", "15081")),
                   help="/healthz/ready and /metrics")
    p.add_argument("--nats-url", default=None)
    p.add_argument("--redis-url", default=None)
    p.add_argument("--debounce", type=float, default=float(settings.env("MIZZEN_TRANSLATOR_DEBOUNCE", "0.05")))
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
    tr = Translator(ConfigStore(redis), SnapshotStore(redis), bus, metrics, debounce=args.debounce)

    async def resync() -> None:
        tr.poke()

    bus.on_reconnect = resync
    await bus.subscribe(CONFIG_CHANGED, tr.on_config)
    await bus.subscribe(PROXY_CONNECTED, tr.on_proxy)
    app = web.Application()
    health_routes(app, lambda: tr.ready and bus.connected.is_set(), metrics.registry)
    runner = await serve_http(app, args.http_host, args.http_port)

    async def safety_net() -> None:
        while not stop.is_set():
            await asyncio.sleep(args.resync_interval)
            try:
                if await tr.store.revision() != tr.built_revision:
                    tr.poke()
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
    try:
        await tr.run(stop)
    finally:
        net.cancel()
        gc.cancel()
        await runner.cleanup()
        await bus.close()
        await redis.aclose()
        log.info("translator stopped")
