"""The registry service shell: wires Redis, NATS and the HTTP API."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from aiohttp import web

from ..mesh import settings, tracing, validation
from ..mesh.bus import Bus
from ..mesh.service import health_routes, serve_http
from ..mesh.snapstore import SnapshotStore
from ..mesh.store import ConfigStore, connect
from . import kube
from .api import Metrics, RegistryAPI
from .kubeapi import KubeAPI

log = logging.getLogger("mizzen.registry")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mizzen registry", description="Run the Mizzen registry service.")
    p.add_argument("--host", default=settings.env("MIZZEN_REGISTRY_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(settings.env("MIZZEN_REGISTRY_PORT", str(settings.REGISTRY_PORT))))
    p.add_argument("--nats-url", default=None, help="default $MIZZEN_NATS_URL or nats://127.0.0.1:4222")
    p.add_argument("--redis-url", default=None, help="default $MIZZEN_REDIS_URL or redis://127.0.0.1:6379/0")
    p.add_argument("--kubeconfig", default=settings.env("MIZZEN_KUBECONFIG", ""),
                   help="ingest resources (list + watch) from the cluster of this kubeconfig")
    p.add_argument("--context", default=settings.env("MIZZEN_KUBE_CONTEXT", ""),
                   help="the kubeconfig context to use (default: its current-context)")
    p.add_argument("--kube-api", default=settings.env("MIZZEN_KUBE_API", ""),
                   help="ingest from this Kubernetes API server URL (with --kube-token-file) instead of a kubeconfig")
    p.add_argument("--kube-token-file", default=settings.env("MIZZEN_KUBE_TOKEN_FILE", ""))
    p.add_argument("--no-kube", action="store_true", default=settings.env("MIZZEN_NO_KUBE", "") not in ("", "0"),
                   help="do not ingest from Kubernetes, not even with in-cluster credentials inside a pod")
    p.add_argument("--no-kube-status", action="store_true",
                   help="do not write validation status back to the cluster's Istio objects")
    p.add_argument("--log-level", default=settings.env("MIZZEN_LOG_LEVEL", "info"))
    return p


async def kube_client_from_args(args: argparse.Namespace):
    """The Kubernetes client ingestion uses, or None; bad credentials stop the registry at once, named."""
    if args.no_kube or not (args.kubeconfig or args.kube_api or kube.in_cluster()):
        return None
    # explicit kubeconfig, else a URL, else the pod's service-account credentials
    where = (f"--kubeconfig {args.kubeconfig}" + (f" --context {args.context}" if args.context else "")
             if args.kubeconfig else f"--kube-api {args.kube_api}" if args.kube_api else "in-cluster credentials")
    try:
        token = Path(args.kube_token_file).read_text().strip() if args.kube_token_file else None
        return await kube.api_client(args.kube_api, token, args.kubeconfig, args.context or None)
    except Exception as e:  # noqa: BLE001 - ConfigException, OSError, YAML errors: all mean unusable credentials
        raise SystemExit(f"mizzen registry: cannot use {where}: {e}") from None


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    kube_client = await kube_client_from_args(args)
    redis = connect(settings.redis_url(args.redis_url))
    bus = Bus(settings.nats_url(args.nats_url), "mizzen-registry")
    await bus.connect()
    store = ConfigStore(redis)
    metrics = Metrics()
    api = RegistryAPI(store, bus, SnapshotStore(redis), metrics)
    validation.load_validators()
    ready = {"ok": False}
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[tracing.middleware()])
    api.routes(app)
    kube_api = KubeAPI(api)
    kube_api.routes(app)
    health_routes(app, lambda: ready["ok"] and bus.connected.is_set(), metrics.registry)
    await redis.ping()
    metrics.revision.set(await store.revision())
    runner = await serve_http(app, args.host, args.port)
    ready["ok"] = True
    log.info("registry ready", extra={"address": f"http://{args.host}:{args.port}"})
    kube_task = None
    if kube_client is not None:
        source = kube.KubeSource(kube_client, api, write_status=not args.no_kube_status)
        log.info("ingesting from kubernetes", extra={"server": kube_client.configuration.host})
        kube_task = asyncio.create_task(source.run(stop))
    await stop.wait()
    if kube_task is not None:
        await kube_task
    ready["ok"] = False
    await kube_api.close()
    await runner.cleanup()
    await bus.close()
    await redis.aclose()
    log.info("registry stopped")
