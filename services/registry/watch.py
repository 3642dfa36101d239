"""Follow the store's change log (`config:log`) and fan each entry out to the registry's Kubernetes watches.

One task per registry process reads the log with a blocking XREAD and hands every entry to each subscribed
watch's queue; a watch first replays the log from its resourceVersion (`ConfigStore.log_since`), then drains
its queue, skipping what the replay already covered. Several registry replicas each follow the same log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import redis.asyncio as aioredis

from ..mesh.store import LOG, decode_log_entry, key_of

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


class WatchView:
    """One watch's view of one kind: turns change-log entries into the events the client should get.

    Pure apart from the caller's fetch: `live_keys(entry)` names the objects to read for an entry whose
    objects the log did not keep; `events(entry, live)` returns [(type, object)] and moves `last`.

    `visible` tracks, per key, whether the client holds the object (True), does not (False) or is not known
    (absent: a watch from a resourceVersion does not know what the client listed). With a selector, an object
    that starts matching is sent as ADDED and one that stops matching as DELETED, as the API server does.
    """

    def __init__(self, kind: str, wanted: Callable[[dict], bool], complete: bool, last: int):
        self.prefix = kind + "/"
        self.wanted = wanted  # kind, namespace and selectors
        self.complete = complete  # the client got the whole view first (no resourceVersion): unlisted = not held
        self.last = last
        self.visible: dict[str, bool] = {}
        self.pending_add: set[str] = set()  # created at a revision whose state a later write replaced

    def listed(self, obj: dict) -> None:
        self.visible[key_of(obj)] = True

    def _keys(self, entry: dict) -> list[str]:
        return [k for k in entry["keys"] if k.startswith(self.prefix)]

    def live_keys(self, entry: dict) -> list[str]:
        if entry["rev"] <= self.last or entry.get("objects") is not None:
            return []
        deleted = {key_of(o) for o in entry["deleted"] if isinstance(o, dict) and o.get("metadata")}
        return [k for k in self._keys(entry) if k not in deleted]

    def events(self, entry: dict, live: dict[str, dict]) -> list[tuple[str, dict]]:
        rev = entry["rev"]
        if rev <= self.last:
            return []
        out: list[tuple[str, dict]] = []
        deleted = {key_of(o): o for o in entry["deleted"] if isinstance(o, dict) and o.get("metadata")}
        exact = entry.get("objects") is not None
        written = {key_of(o): o for o in entry["objects"] if isinstance(o, dict) and o.get("metadata")} \
            if exact else {}
        for k in self._keys(entry):
            if k in deleted:
                self.pending_add.discard(k)
                self._emit(out, k, "DELETED", deleted[k])
                continue
            if exact:
                # the log kept this revision's objects: replay exactly what was written
                obj = written.get(k)
                if obj is None:
                    continue
            else:
                # only keys: the object's current state stands for this revision if nothing rewrote it since
                obj = live.get(k)
                if obj is None or obj["metadata"].get("resourceVersion") != str(rev):
                    if k in entry["created"]:
                        self.pending_add.add(k)  # announce it as ADDED when its later write is played
                    continue
            added = k in entry["created"] or k in self.pending_add
            self.pending_add.discard(k)
            self._emit(out, k, "ADDED" if added else "MODIFIED", obj)
        self.last = rev
        return out

    def _emit(self, out: list[tuple[str, dict]], k: str, typ: str, obj: dict) -> None:
        now, before = self.wanted(obj), self.visible.get(k, False if self.complete else None)
        if typ == "DELETED":
            self.visible.pop(k, None)
            if before or (before is None and now):
                out.append(("DELETED", obj))
        elif now:
            self.visible[k] = True
            out.append(("ADDED" if typ == "ADDED" or before is False else typ, obj))
        else:
            self.visible[k] = False
            if before:
                out.append(("DELETED", obj))
