"""The NATS event bus. Events are hints; state in Redis is the truth, so a missed event costs latency, not data."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # nats (and the aiohttp it pulls in) is imported on connect: the subject names here are
    from nats.aio.client import Client as NATS  # used by commands that never connect (`logsink convert`)
    from nats.aio.msg import Msg

log = logging.getLogger("mizzen.bus")

CONFIG_CHANGED = "mizzen.config.changed"
SNAPSHOT_PREFIX = "mizzen.snapshot."
PROXY_CONNECTED = "mizzen.proxy.connected"
ACCESSLOG_PREFIX = "mizzen.accesslog."


def snapshot_subject(proxy_id: str) -> str:
    return SNAPSHOT_PREFIX + proxy_id


# Access logs for partitioned logsinks: `mizzen.accesslog._p<k>.<proxy>`, k = hash(request id) mod N, so both
# sides of a call (and every hop of a chain) reach the replica that owns partition k (mesh/accesslog.py).
PARTITION_TOKEN = "_p"


def accesslog_subject(proxy: str, partition: int | None = None) -> str:
    if partition is None:
        return ACCESSLOG_PREFIX + proxy
    return f"{ACCESSLOG_PREFIX}{PARTITION_TOKEN}{partition}.{proxy}"


def split_accesslog_subject(subject: str) -> tuple[int | None, str]:
    """`mizzen.accesslog._p3.front.shop` → (3, "front.shop"); `mizzen.accesslog.front.shop` → (None, …)."""
    rest = subject[len(ACCESSLOG_PREFIX):] if subject.startswith(ACCESSLOG_PREFIX) else ""
    if rest.startswith(PARTITION_TOKEN):
        token, _, proxy = rest.partition(".")
        if token[2:].isdigit():
            return int(token[2:]), proxy
    return None, rest


class Bus:
    """A NATS connection that reconnects forever and re-subscribes, calling `on_reconnect` so the owner can
    re-read state it may have missed while NATS was away."""

    def __init__(self, url: str, name: str):
        self.url = url
        self.name = name
        self.nc: NATS | None = None
        self.on_reconnect: Callable[[], Awaitable[None]] | None = None
        self.connected = asyncio.Event()

    async def connect(self, timeout: float = 30.0) -> None:
        import nats

        async def disconnected():
            self.connected.clear()
            log.warning("nats disconnected", extra={"url": self.url})

        async def reconnected():
            self.connected.set()
            log.info("nats reconnected", extra={"url": self.url})
            if self.on_reconnect:
                await self.on_reconnect()

        async def error_cb(e):
            log.debug("nats error: %s", e)

        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                self.nc = await nats.connect(
                    self.url,
                    name=self.name,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    connect_timeout=2,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    error_cb=error_cb,
                    allow_reconnect=True,
                )
                self.connected.set()
                return
            except Exception as e:  # noqa: BLE001 - NATS may not be up yet; keep trying until the deadline
                if asyncio.get_running_loop().time() > deadline:
                    raise
                log.info("waiting for nats at %s: %s", self.url, e)
                await asyncio.sleep(0.25)

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Publish, tolerating an outage: events are hints, and subscribers re-read state on reconnect.
        `headers` carry trace context (W3C `traceparent`, see mesh/tracing.py) when tracing is on."""
        assert self.nc is not None
        try:
            await self.nc.publish(subject, payload, headers=headers or None)
        except Exception as e:  # noqa: BLE001
            log.warning("publish to %s failed (%s); subscribers will resync on reconnect", subject, e)

    async def subscribe(self, subject: str, handler: Callable[[Msg], Awaitable[None]], queue: str = "") -> None:
        assert self.nc is not None
        await self.nc.subscribe(subject, cb=handler, queue=queue)

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:  # noqa: BLE001
                await self.nc.close()
