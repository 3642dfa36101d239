"""The registry service shell: wires Redis, NATS and the HTTP API."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from aiohttp import web

from ..mesh import settings, tracing
from ..mesh.bus import Bus
from ..mesh.service import health_routes, serve_http
from ..mesh.snapstore import SnapshotStore
from ..mesh.store import ConfigStore, connect
from .api import Metrics, RegistryAPI

log = logging.getLogger("mizzen.registry")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mizzen registry", description="Run the Mizzen registry service.")
    p.add_argument("--host", default=settings.env("MIZZEN_REGISTRY_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(settings.env("MIZZEN_REGISTRY_PORT", str(settings.REGISTRY_PORT))))
    p.add_argument("--nats-url", default=None, help="default $MIZZEN_NATS_URL or nats://127.0.0.1:4222")
    p.add_argument("--redis-url", default=None, help="default $MIZZEN_REDIS_URL or redis://127.0.0.1:6379/0")
    p.add_argument("--kube-api", default=settings.env("MIZZEN_KUBE_API", ""),
                   help="also ingest resources from this Kubernetes API server (list + watch)")
    p.add_argument("--kube-token-file", default=settings.env("MIZZEN_KUBE_TOKEN_FILE", ""))
    p.add_argument("--log-level", default=settings.env("MIZZEN_LOG_LEVEL", "info"))
    return p


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    redis = connect(settings.redis_url(args.redis_url))
    bus = Bus(settings.nats_url(args.nats_url), "mizzen-registry")
    await bus.connect()
    store = ConfigStore(redis)
    metrics = Metrics()
    api = RegistryAPI(store, bus, SnapshotStore(redis), metrics)
    ready = {"ok": False}
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[tracing.middleware()])
    api.routes(app)
    health_routes(app, lambda: ready["ok"] and bus.connected.is_set(), metrics.registry)
    await redis.ping()
    metrics.revision.set(await store.revision())
    runner = await serve_http(app, args.host, args.port)
    ready["ok"] = True
    log.info("registry ready", extra={"address": f"http://{args.host}:{args.port}"})
    kube_task = None
    if args.kube_api:
        from .kube import KubeSource

        token = Path(args.kube_token_file).read_text().strip() if args.kube_token_file else None
        kube_task = asyncio.create_task(KubeSource(args.kube_api, api, token=token).run(stop))
    await stop.wait()
    if kube_task is not None:
        await kube_task
    ready["ok"] = False
    await runner.cleanup()
    await bus.close()
    await redis.aclose()
    log.info("registry stopped")
