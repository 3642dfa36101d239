"""Follow the store's change log (`config:log`) and fan each entry out to the registry's Kubernetes watches.

One task per registry process reads the log with a blocking XREAD and hands every entry to each subscribed
watch's queue; a watch first replays the log from its resourceVersion (`ConfigStore.log_since`), then drains
its queue, skipping what the replay already covered. Several registry replicas each follow the same log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis

from ..mesh.store import LOG, decode_log_entry

log = logging.getLogger("mizzen.registry.watch")

QUEUE_LIMIT = 10_000  # a watcher this far behind is closed; its client watches again from its resourceVersion


class LogFollower:
    def __init__(self, redis: aioredis.Redis):
        self.r = redis
        self.subscribers: set[asyncio.Queue] = set()
        self.task: asyncio.Task | None = None

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self.subscribers.add(q)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self.subscribers.discard(q)

    async def _run(self) -> None:
        last = "$"
        while True:
            try:
                if last == "$":
                    # start from the newest entry, so a reconnect never skips what came after it
                    newest = await self.r.xrevrange(LOG, count=1)
                    last = newest[0][0] if newest else "0-0"
                got = await self.r.xread({LOG: last}, block=5000, count=500)
                for _stream, entries in got or []:
                    for sid, fields in entries:
                        last = sid
                        entry = decode_log_entry(fields)
                        for q in list(self.subscribers):
                            if q.qsize() >= QUEUE_LIMIT:
                                self.subscribers.discard(q)
                                q.put_nowait(None)  # tells the watch to end
                            else:
                                q.put_nowait(entry)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis away: retry; the stream id keeps our place
                log.warning("following the change log failed: %s", e)
                await asyncio.sleep(0.5)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
