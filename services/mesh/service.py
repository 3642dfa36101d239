"""What every Mizzen service shares: structured logs, `/healthz/ready`, Prometheus `/metrics`, and a
graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class JsonFormatter(logging.Formatter):
    _skip = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        d = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in self._skip:
                d[k] = v
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(d, default=str).decode()


def setup_logging(level: str = "info") -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "nats"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def health_routes(app: web.Application, ready: Callable[[], bool], registry: CollectorRegistry) -> None:
    async def healthz(_req: web.Request) -> web.Response:
        ok = ready()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "not ready\n")

    async def metrics(_req: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz/ready", healthz)
    app.router.add_get("/metrics", metrics)


async def serve_http(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner


def relax_gc(young: int = 50_000) -> None:
    """For a service past its start-up: move what it has loaded out of the collector's way (gc.freeze) and
    collect the young generation less often. Its work makes many short-lived containers and few cycles, and
    each young collection of the default 700 costs time in proportion to what survives it."""
    gc.freeze()
    gc.set_threshold(young, 20, 100)


_libc = None


def trim_heap() -> bool:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim; False where there is none).
    After a burst (a connection storm, a full push to thousands of streams) gRPC's per-thread arenas keep
    hundreds of MiB of freed buffers as resident memory otherwise."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018 - present on glibc only
        except (OSError, AttributeError):
            _libc = False
    return bool(_libc) and bool(_libc.malloc_trim(0))


def run_service(main: Callable[[asyncio.Event], Awaitable[None]], name: str | None = None) -> None:
    """Run `main(stop_event)` until SIGTERM/SIGINT sets the event; main is expected to clean up and return.
    With `name`, the service traces itself when `MIZZEN_TRACING` says so (mesh/tracing.py)."""
    from . import tracing

    if name is not None:
        tracing.setup(name)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, stop.set)
        await main(stop)

    try:
        asyncio.run(runner())
    finally:
        tracing.shutdown()
