"""NATS input: subjects `mizzen.accesslog.<proxy>` through a JetStream durable pull consumer, so lines published
while the logsink is down (or before it acked them) are delivered again and none is lost.

The logsink makes sure the stream exists (`MIZZEN_ACCESSLOG`, subjects `mizzen.accesslog.>`, file storage,
kept for `max_age`) and binds a durable consumer (explicit acks, deliver-all for a new consumer). A message
holds one access-log line or several (NDJSON); it is acked once every line in it is exported or
dead-lettered. `ack_wait` must exceed the join window plus export time: an unacked message comes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from ...mesh.bus import ACCESSLOG_PREFIX
from ..identity import Source
from ..pipeline import Pipeline

log = logging.getLogger("mizzen.logsink.nats")

STREAM = "MIZZEN_ACCESSLOG"


class _MsgAck:
    """Acks a JetStream message once all its lines are done."""

    __slots__ = ("msg", "left", "owner")

    def __init__(self, msg, left: int, owner: NatsInput):
        self.msg = msg
        self.left = left
        self.owner = owner

    def __call__(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.owner.to_ack.append(self.msg)
            self.owner.ack_ready.set()


class NatsInput:
    def __init__(
        self,
        url: str,
        pipeline: Pipeline,
        shipper,
        subject: str = ACCESSLOG_PREFIX + ">",
        durable: str = "mizzen-logsink",
        stream: str = STREAM,
        ack_wait: float = 60.0,
        max_age: float = 24 * 3600.0,
        batch: int = 256,
    ):
        self.url = url
        self.pipeline = pipeline
        self.shipper = shipper
        self.subject = subject
        self.durable = durable
        self.stream = stream
        self.ack_wait = ack_wait
        self.max_age = max_age
        self.batch = batch
        self.nc = None
        self.js = None
        self.to_ack: list = []
        self.ack_ready = asyncio.Event()
        self.connected = False
        self._sources: dict[str, Source] = {}
        self.dead_letter_subject: str | None = None

    def _source(self, subject: str) -> Source:
        src = self._sources.get(subject)
        if src is None:
            proxy = subject[len(ACCESSLOG_PREFIX):] if subject.startswith(ACCESSLOG_PREFIX) else ""
            if len(self._sources) > 10000:
                self._sources.clear()
            src = self._sources[subject] = Source("nats", proxy)
        return src

    async def connect(self) -> None:
        await self._connect_stream()
        self.sub = await self.js.pull_subscribe(
            self.subject,
            durable=self.durable,
            stream=self.stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                                  ack_wait=self.ack_wait, max_ack_pending=-1),
        )
        self.connected = True

    async def _connect_stream(self) -> None:
        async def err(e):
            log.debug("nats: %s", e)

        self.nc = await nats.connect(self.url, name="mizzen-logsink", max_reconnect_attempts=-1,
                                     reconnect_time_wait=0.25, connect_timeout=2, error_cb=err)
        js = self.nc.jetstream()
        try:
            await js.stream_info(self.stream)
        except NotFoundError:
            await js.add_stream(StreamConfig(name=self.stream, subjects=[ACCESSLOG_PREFIX + ">"],
                                             storage=StorageType.FILE, max_age=self.max_age))
            log.info("created JetStream stream %s", self.stream)
        self.js = js

    async def run(self, stop: asyncio.Event) -> None:
        acker = asyncio.create_task(self._acker(stop))
        try:
            while not stop.is_set():
                await self.shipper.wait_room()
                try:
                    msgs = await self.sub.fetch(self.batch, timeout=0.5)
                except (TimeoutError, NatsTimeoutError):
                    continue
                except Exception as e:  # noqa: BLE001 - reconnecting; keep trying
                    if stop.is_set():
                        break
                    log.warning("nats fetch failed: %s", e)
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    self._handle(msg)
                await asyncio.sleep(0)
        finally:
            stop.set()
            await acker

    def _handle(self, msg) -> None:
        src = self._source(msg.subject)
        lines = [ln.rstrip(b"\r") for ln in msg.data.split(b"\n") if ln.strip()]
        if not lines:
            self.to_ack.append(msg)
            self.ack_ready.set()
            return
        token = _MsgAck(msg, len(lines), self)
        feed = self.pipeline.feed_line
        for raw in lines:
            feed(raw, src, token)

    async def _acker(self, stop: asyncio.Event) -> None:
        while True:
            await self.flush_acks()
            if stop.is_set():
                return
            self.ack_ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ack_ready.wait(), 0.5)

    async def flush_acks(self) -> None:
        msgs, self.to_ack = self.to_ack, []
        for m in msgs:
            try:
                await m.ack()
            except Exception as e:  # noqa: BLE001 - not acked: JetStream redelivers after ack_wait
                log.warning("ack failed: %s", e)

    async def publish_dead_letters(self, entries) -> None:
        if self.nc is None or not self.dead_letter_subject:
            return
        while entries:
            await self.nc.publish(self.dead_letter_subject, entries.popleft())

    async def close(self) -> None:
        """After the pipeline has been flushed and the exporter drained: send the last acks, then leave."""
        await self.flush_acks()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=5)
            with contextlib.suppress(Exception):
                await self.nc.close()
