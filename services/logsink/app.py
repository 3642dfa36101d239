"""The logsink service: inputs (files, HTTP, NATS JetStream, Envoy ALS) → pipeline → OTLP exporter, plus
`/healthz/ready` and `/metrics`. Graceful shutdown: stop reading, emit what the join still holds, export it,
then commit file offsets and JetStream acks, so a restart neither loses nor repeats a line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from ..mesh.bus import ACCESSLOG_PREFIX
from ..mesh.service import health_routes, relax_gc, serve_http
from .deadletter import DeadLetters
from .export import Shipper, make_exporter
from .inputs.file import FileInput
from .inputs.http import HttpInput
from .metrics import IstioMetrics, Stats, registry_for
from .pipeline import Pipeline

log = logging.getLogger("mizzen.logsink")


@dataclass
class Settings:
    files: list[str] = field(default_factory=list)
    http: str | None = None
    nats_url: str | None = None
    subject: str = ACCESSLOG_PREFIX + ">"
    durable: str = "mizzen-logsink"
    als: str | None = None
    redis_url: str | None = None  # with it: workloads named from the registry's Pods/WorkloadEntries
    events_nats_url: str | None = None
    progress: str = "never"
    otlp_endpoint: str = "localhost:4317"
    otlp_protocol: str = "grpc"
    otlp_headers: dict[str, str] = field(default_factory=dict)
    admin: str | None = "127.0.0.1:15085"
    data_dir: Path = Path.home() / ".mizzen"
    dead_letter: Path | None = None
    dead_letter_subject: str | None = None
    window: float = 5.0
    max_pending: int = 100_000
    batch_size: int = 512
    max_line_bytes: int = 1 << 20
    istio_metrics: bool = True
    poll_interval: float = 0.1
    flush_interval: float = 0.2
    export_timeout: float = 10.0
    shutdown_grace: float = 10.0
    ack_wait: float = 60.0
    partitions: int = 0  # > 0: read mizzen.accesslog._p<k>.> partitions shared with other replicas
    replica: str = ""
    lease: float = 10.0
    export_queue: int = 64
    http_room_timeout: float = 5.0

    @property
    def state_dir(self) -> Path:
        return self.data_dir / "logsink"


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class LogSink:
    def __init__(self, s: Settings):
        self.s = s
        self.stats = Stats()
        self.istio = IstioMetrics() if s.istio_metrics else None
        self.registry = registry_for(self.stats, self.istio)
        self.dead = DeadLetters(s.dead_letter, keep_for_nats=bool(s.dead_letter_subject and s.nats_url))
        self.exporter = make_exporter(s.otlp_endpoint, s.otlp_protocol, s.export_timeout, s.otlp_headers)
        self.shipper = Shipper(self.exporter, self.stats, max_queued=s.export_queue)
        self.workloads = None
        self.registry_watch = None
        if s.redis_url:
            from .workloads import RegistryWatch, WorkloadIndex

            self.workloads = WorkloadIndex()
            self.registry_watch = RegistryWatch(self.workloads, s.redis_url, s.events_nats_url or s.nats_url or "")
        self.pipeline = Pipeline(self.shipper.submit, dead=self.dead, stats=self.stats, istio=self.istio,
                                 window=s.window, max_records=s.max_pending, batch_size=s.batch_size,
                                 max_line_bytes=s.max_line_bytes, workloads=self.workloads)
        from .progress import Progress

        self.progress = Progress.for_stream(sys.stderr, s.progress)
        self.files = FileInput(s.files, self.pipeline, self.shipper, s.state_dir / "offsets.json",
                               s.poll_interval, s.max_line_bytes) if s.files else None
        self.http = HttpInput(self.pipeline, self.shipper, room_timeout=s.http_room_timeout) if s.http else None
        self.nats = None
        if s.nats_url and s.partitions > 0:
            from .inputs.partitions import PartitionedNatsInput

            self.nats = PartitionedNatsInput(s.nats_url, self.pipeline, self.shipper, subject=s.subject,
                                             durable=s.durable, ack_wait=s.ack_wait, partitions=s.partitions,
                                             replica=s.replica, lease=s.lease)
        elif s.nats_url:
            from .inputs.nats import NatsInput

            self.nats = NatsInput(s.nats_url, self.pipeline, self.shipper, subject=s.subject, durable=s.durable,
                                  ack_wait=s.ack_wait)
            self.nats.dead_letter_subject = s.dead_letter_subject
        self.ready = False
        self.runners: list[web.AppRunner] = []
        self.als_server = None
        self.als_port = 0
        self.bound: dict[str, int] = {}

    def _app(self, with_ingest: bool) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        health_routes(app, lambda: self.ready, self.registry)
        if with_ingest and self.http is not None:
            self.http.add_routes(app)
        return app

    async def start(self) -> None:
        s = self.s
        self.shipper.start()
        if s.admin:
            host, port = host_port(s.admin)
            runner = await serve_http(self._app(with_ingest=False), host, port)
            self.runners.append(runner)
            self.bound["admin"] = runner.addresses[0][1]
        if s.http:
            host, port = host_port(s.http)
            runner = await serve_http(self._app(with_ingest=True), host, port)
            self.runners.append(runner)
            self.bound["http"] = runner.addresses[0][1]
        if s.als:
            from .inputs.als import start_als_server

            self.als_server, self.als_port = await start_als_server(s.als, self.pipeline, self.shipper)
            self.bound["als"] = self.als_port
        if self.registry_watch is not None:
            await self.registry_watch.start()
        if self.nats is not None:
            await self.nats.connect()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        relax_gc()  # the pipeline allocates many short-lived objects and few cycles
        tasks = [asyncio.create_task(self._ticker(stop), name="ticker")]
        if self.files is not None:
            tasks.append(asyncio.create_task(self.files.run(stop), name="files"))
        if self.nats is not None:
            tasks.append(asyncio.create_task(self.nats.run(stop), name="nats"))
        self.ready = True
        log.info("logsink running", extra={"bound": self.bound, "otlp": self.exporter.target,
                                           "files": self.s.files, "nats": self.s.nats_url})
        done, _ = await asyncio.wait([asyncio.create_task(stop.wait()), *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t in tasks and t.exception() is not None:
                log.error("%s failed, stopping", t.get_name(), exc_info=t.exception())
        stop.set()
        await self.shutdown(tasks)

    async def _ticker(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        last_save = loop.time()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
            try:
                self.pipeline.tick()
                if self.progress is not None:
                    self.progress.update(self.stats)
                if self.pipeline.batch_count and loop.time() - self.pipeline.batch_since >= self.s.flush_interval:
                    self.pipeline.flush_batch()
                if loop.time() - last_save >= 1.0:
                    last_save = loop.time()
                    await self._checkpoint()
            except Exception:  # noqa: BLE001 - keep ticking: a failed checkpoint is retried next second
                log.exception("periodic work failed")

    async def _checkpoint(self) -> None:
        self.dead.flush()  # before offsets: a committed bad line is on disk
        if self.files is not None:
            self.files.save_state()
        if self.nats is not None and self.dead.outbox:
            await self.nats.publish_dead_letters(self.dead.outbox)

    async def shutdown(self, tasks: list[asyncio.Task]) -> None:
        self.ready = False
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.als_server is not None:
            await self.als_server.stop(1.0)
        for r in self.runners:
            await r.cleanup()
        if self.nats is not None and hasattr(self.nats, "handover"):
            try:
                await self.nats.handover()  # partitions: waiting lines go to the partitions' next owners
            except Exception:  # noqa: BLE001 - not handed over: exported here instead (unjoined, not lost)
                log.exception("handing over waiting lines failed")
        self.pipeline.flush()
        ok = await self.shipper.drain(self.s.shutdown_grace)
        if not ok:
            log.error("exporter did not catch up within %.1fs; unexported lines will be read again next time",
                      self.s.shutdown_grace)
        await self._checkpoint()
        if self.files is not None:
            self.files.close()
        if self.nats is not None:
            await self.nats.close()
        if self.registry_watch is not None:
            await self.registry_watch.close()
        if self.progress is not None:
            self.progress.done(self.stats)
        await self.exporter.close()
        self.dead.close()
        log.info("logsink stopped", extra={"lines": self.stats.lines_total, "spans": self.stats.spans,
                                           "exported": self.stats.exported, "bad": self.stats.bad_total})
