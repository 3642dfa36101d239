"""The xds_gateway process: Redis + NATS in, gRPC ADS out, /healthz/ready and /metrics on the side."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from aiohttp import web

from mizzen.services.mesh import settings
from mizzen.services.mesh.bus import Bus
from mizzen.services.mesh.service import health_routes, relax_gc, serve_http, trim_heap
from mizzen.services.mesh.store import connect as connect_redis

from .cache import SnapshotCache
from .metrics import Metrics
from .server import make_server
from .status import StatusRecorder
from .stream import Gateway
from .tls import ServingCert, TlsOptions

log = logging.getLogger("mizzen.xds_gateway")


@dataclass
class Options:
    host: str
    port: int
    http_host: str
    http_port: int
    nats_url: str
    redis_url: str
    replica: str
    resync_interval: float = 5.0
    status_ttl: float = 30.0
    grace: float = 1.0
    push_slots: int = settings.XDS_PUSH_SLOTS
    slot_lease: float = 1.0
    reuse_port: bool = False
    max_pending_streams: int = 20_000  # streams queued for admission in a storm (mesh/grpcserver.py)
    tls: TlsOptions | None = None  # also serve xDS over TLS (certificate from certauth, tokens checked)


async def _wait_redis(redis: aioredis.Redis, stop: asyncio.Event) -> bool:
    while not stop.is_set():
        try:
            await redis.ping()
            return True
        except Exception as e:  # noqa: BLE001 - not up yet
            log.info("waiting for redis: %s", e)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    return False


async def run_gateway(opts: Options, stop: asyncio.Event) -> None:
    metrics = Metrics()
    redis_ok = False
    state = {"serving": False}
    # a bounded pool that waits for a free connection (2,000 streams connecting at once must queue, not
    # fail) and retries through a Redis restart instead of failing a push
    redis = connect_redis(opts.redis_url, max_connections=64)
    bus = Bus(opts.nats_url, f"xds-gateway-{opts.replica}")

    def ready() -> bool:
        return state["serving"] and redis_ok and bus.connected.is_set()

    http = web.Application()
    health_routes(http, ready, metrics.registry)
    runner = await serve_http(http, opts.http_host, opts.http_port)
    log.info("http listening", extra={"addr": f"{opts.http_host}:{opts.http_port}"})

    if not await _wait_redis(redis, stop):
        await runner.cleanup()
        return
    redis_ok = True
    connect = asyncio.create_task(bus.connect(timeout=3600))
    done, _ = await asyncio.wait({connect, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if connect not in done:
        connect.cancel()
        await runner.cleanup()
        await redis.aclose()
        return

    cache = SnapshotCache(redis, bus, resync_interval=opts.resync_interval)
    status = StatusRecorder(redis, opts.replica, ttl=opts.status_ttl)
    gw = Gateway(cache=cache, status=status, metrics=metrics, replica=opts.replica, bus=bus,
                 push_slots=asyncio.Semaphore(opts.push_slots), slot_lease=opts.slot_lease)
    metrics.in_flight.set_function(lambda: gw.pushes_in_flight)
    await cache.start()
    await status.start()
    serving_cert = None
    tls = None
    if opts.tls is not None:
        serving_cert = ServingCert(opts.tls)
        await serving_cert.start(stop)  # retried until certauth answers (or stop)
        if stop.is_set():
            await serving_cert.stop()
            return
        tls = (opts.tls.port, serving_cert.credentials(), serving_cert.tokens)
        log.info("xds over TLS", extra={"port": opts.tls.port, "identity": serving_cert.identity})
    server, port = make_server(gw, opts.host, opts.port, tls, reuse_port=opts.reuse_port,
                               max_pending=opts.max_pending_streams)
    await server.start()
    relax_gc()
    state["serving"] = True
    log.info("xds gateway serving", extra={"addr": f"{opts.host}:{port}", "replica": opts.replica})

    async def watch_redis() -> None:
        nonlocal redis_ok
        sent_at_trim = -1.0
        while True:
            await asyncio.sleep(2)
            try:
                await redis.ping()
                redis_ok = True
            except Exception:  # noqa: BLE001
                redis_ok = False
            gw.update_queue_gauge()
            # pushes went out since the last trim and none is going on now: hand the freed buffers back
            sent = sum(metrics.push_bytes.values.values())
            if sent != sent_at_trim and gw.idle():
                trim_heap()
                sent_at_trim = sent

    pinger = asyncio.create_task(watch_redis())
    await stop.wait()
    started = time.monotonic()
    log.info("shutting down", extra={"streams": len(gw.streams)})
    state["serving"] = False
    await server.stop(opts.grace)
    pinger.cancel()
    if serving_cert is not None:
        await serving_cert.stop()
    await cache.stop()
    await status.stop()
    await bus.close()
    await redis.aclose()
    await runner.cleanup()
    log.info("stopped", extra={"seconds": round(time.monotonic() - started, 3)})
