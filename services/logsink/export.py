"""OTLP export: gRPC (`opentelemetry.proto.collector.trace.v1.TraceService/Export`) or HTTP (`POST /v1/traces`,
`application/x-protobuf`), batched, retried with backoff, with backpressure on the inputs.

Requests arrive already encoded (see pipeline.py), so the gRPC stub sends the bytes as they are. Retryable
failures (gRPC UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, …; HTTP 429/502/503/504 and connection
errors, as the OTLP spec lists them) are retried until they succeed or shutdown's grace period ends: a batch
whose export never succeeded is never acked, so its lines are read again after a restart. Permanent failures
(the receiver says the data is invalid) are counted and dropped, so one bad batch cannot stall the stream.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable

import grpc
from aiohttp import ClientError, ClientSession, ClientTimeout

from .metrics import Stats
from .otlp_decode import partial_success

log = logging.getLogger("mizzen.logsink.export")

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
RETRYABLE_GRPC = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
RETRYABLE_HTTP = frozenset({429, 502, 503, 504})


class RetryableError(Exception):
    def __init__(self, kind: str, message: str, delay: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.delay = delay


class PermanentError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def split_endpoint(endpoint: str, protocol: str) -> tuple[str, bool]:
    """`host:port` / `http://host:port` / `https://host:port[/path]` → (target, tls). For HTTP the target is the
    full URL of the traces path."""
    tls = endpoint.startswith("https://")
    bare = endpoint.split("://", 1)[1] if "://" in endpoint else endpoint
    if protocol == "grpc":
        return bare.rstrip("/").split("/", 1)[0], tls
    scheme = "https" if tls else "http"
    host, _, path = bare.partition("/")
    if not path or path == "":
        path = "v1/traces"
    return f"{scheme}://{host}/{path}", tls


class GrpcExporter:
    def __init__(self, endpoint: str, timeout: float = 10.0, headers: dict[str, str] | None = None):
        self.target, self.tls = split_endpoint(endpoint, "grpc")
        self.timeout = timeout
        self.metadata = tuple((k.lower(), v) for k, v in (headers or {}).items()) or None
        self.channel: grpc.aio.Channel | None = None

    def _connect(self) -> None:
        # Created on first use: a grpc.aio channel belongs to the event loop it was made in.
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.enable_retries", 0)]
        if self.tls:
            self.channel = grpc.aio.secure_channel(self.target, grpc.ssl_channel_credentials(), options=opts)
        else:
            self.channel = grpc.aio.insecure_channel(self.target, options=opts)
        self.call = self.channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=lambda b: b,
            response_deserializer=partial_success,  # raw bytes both ways: no opentelemetry.proto import
        )

    async def export(self, body: bytes) -> tuple[int, str]:
        if self.channel is None:
            self._connect()
        try:
            resp = await self.call(body, timeout=self.timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code in RETRYABLE_GRPC:
                raise RetryableError(code.name.lower(), e.details() or code.name) from None
            raise PermanentError(code.name.lower(), e.details() or code.name) from None
        return resp

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


class HttpExporter:
    def __init__(self, endpoint: str, timeout: float = 10.0, headers: dict[str, str] | None = None):
        self.url, _ = split_endpoint(endpoint, "http")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/x-protobuf", **(headers or {})}
        self._session: ClientSession | None = None
        self.target = self.url

    async def export(self, body: bytes) -> tuple[int, str]:
        if self._session is None:
            self._session = ClientSession(timeout=ClientTimeout(total=self.timeout))
        try:
            async with self._session.post(self.url, data=body, headers=self.headers) as r:
                data = await r.read()
                if 200 <= r.status < 300:
                    if data and r.content_type == "application/x-protobuf":
                        return partial_success(data)
                    return 0, ""
                if r.status in RETRYABLE_HTTP:
                    delay = r.headers.get("Retry-After")
                    raise RetryableError(f"http_{r.status}", data[:200].decode(errors="replace"),
                                         float(delay) if delay and delay.isdigit() else None)
                raise PermanentError(f"http_{r.status}", data[:200].decode(errors="replace"))
        except (ClientError, TimeoutError, OSError) as e:
            raise RetryableError("connection", str(e) or e.__class__.__name__) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def make_exporter(endpoint: str, protocol: str, timeout: float = 10.0, headers: dict[str, str] | None = None):
    if protocol == "grpc":
        return GrpcExporter(endpoint, timeout, headers)
    if protocol in ("http", "http/protobuf"):
        return HttpExporter(endpoint, timeout, headers)
    raise ValueError(f"unknown OTLP protocol {protocol!r} (grpc or http)")


class Shipper:
    """Batches waiting for export, a few export workers, retry with exponential backoff and jitter.
    Inputs `await wait_room()` before feeding more lines: that is the backpressure."""

    def __init__(
        self,
        exporter,
        stats: Stats,
        max_queued: int = 64,
        workers: int = 2,
        backoff: tuple[float, float] = (0.1, 5.0),
    ):
        self.exporter = exporter
        self.stats = stats
        self.max_queued = max_queued
        self.workers = workers
        self.backoff = backoff
        self.queue: deque[tuple[bytes, int, list[Callable[[], None]]]] = deque()
        self._have = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._tasks: list[asyncio.Task] = []
        self.inflight = 0
        self._closing = False
        self._give_up = False
        self.idle = asyncio.Event()
        self.idle.set()

    # called by the pipeline (synchronously)
    def submit(self, body: bytes, count: int, tokens: list[Callable[[], None]]) -> None:
        self.queue.append((body, count, tokens))
        self.idle.clear()
        self._have.set()
        if len(self.queue) >= self.max_queued:
            self._room.clear()
        self.stats.gauges["export_queue_batches"] = len(self.queue)

    async def wait_room(self) -> None:
        if not self._room.is_set():
            await self._room.wait()

    def has_room(self) -> bool:
        return self._room.is_set()

    def start(self) -> None:
        for i in range(self.workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"otlp-export-{i}"))

    async def _worker(self) -> None:
        while True:
            if not self.queue:
                if self._closing:
                    return
                self._have.clear()
                await self._have.wait()
                continue
            body, count, tokens = self.queue.popleft()
            if len(self.queue) < self.max_queued:
                self._room.set()
            self.stats.gauges["export_queue_batches"] = len(self.queue)
            self.inflight += 1
            try:
                done = await self._export_with_retry(body, count)
            finally:
                self.inflight -= 1
            if done:
                for t in tokens:
                    t()
            if not self.queue and self.inflight == 0:
                self.idle.set()

    async def _export_with_retry(self, body: bytes, count: int) -> bool:
        delay = self.backoff[0]
        while True:
            try:
                rejected, msg = await self.exporter.export(body)
            except RetryableError as e:
                self.stats.export_errors[e.kind] += 1
                if self._give_up:
                    log.error("giving up on a batch of %d spans at shutdown: %s", count, e)
                    return False
                self.stats.retries += 1
                wait = e.delay if e.delay is not None else delay * (0.5 + random.random())
                log.warning("OTLP export failed (%s: %s); retrying in %.2fs", e.kind, e, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, self.backoff[1])
                continue
            except PermanentError as e:
                self.stats.export_errors[e.kind] += 1
                self.stats.rejected += count
                log.error("OTLP receiver refused a batch of %d spans (%s: %s); dropped", count, e.kind, e)
                return True
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - unexpected: keep the worker alive and retry
                log.exception("OTLP export failed unexpectedly")
                self.stats.export_errors["internal"] += 1
                if self._give_up:
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff[1])
                continue
            if rejected:
                self.stats.rejected += rejected
                log.warning("OTLP receiver rejected %d of %d spans: %s", rejected, count, msg)
            self.stats.exported += count - rejected
            return True

    async def drain(self, timeout: float) -> bool:
        """Export what is queued; after `timeout` stop retrying. True when everything was exported."""
        self._closing = True
        self._have.set()
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
            ok = True
        except TimeoutError:
            ok = False
        self._give_up = True
        for t in self._tasks:
            if not ok:
                t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return ok and not self.queue
