"""Per-proxy xDS sync status, kept in Redis so that any replica (and `mizzen proxy-status`) can read it.

Whichever replica serves a proxy's stream writes:

  proxystatus:<node id>   JSON (expires unless the serving replica refreshes it, so a killed replica's
                          proxies vanish from the table instead of showing a stale owner):
                          {proxy, replica, conn, api, connected_at, version (istioctl's VERSION, read
                          off the node, which proxynode: keeps whole), manifest_version, types: {type_url: {
                            sent_nonce, acked_nonce, sent_version, acked_version, basis, error, error_nonce,
                            sent_at, acked_at}}}
                          `basis` is the manifest type version the last sent content was computed from
                          (empty while the gateway deliberately holds back, e.g. a cluster removal).
  proxynode:<node id>     JSON {id, cluster, metadata, user_agent_*, locality, replica, seen_at} (kept)
  proxies:connected       set of node ids with a live stream on some replica

and publishes `mizzen.proxy.connected` with {proxy, replica, node} so the translator can build a snapshot for a
proxy it did not know.

Reading it (`load_statuses`) lives in the shared kernel, services/mesh/proxystatus.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from mizzen.services.mesh.proxystatus import (  # noqa: F401 - re-exported: the reading side lives in the kernel
    NACKED,
    NEVER_ACKED,
    NOT_SENT,
    STALE,
    STATUS,
    SYNCED,
    TABLE_TYPES,
    load_statuses,
    proxy_name,
    proxy_version,
    type_state,
)
from mizzen.services.mesh.snapstore import CONNECTED
from mizzen.services.mesh.snapstore import PROXY_NODE as NODE

log = logging.getLogger("mizzen.xds_gateway.status")

# Delete the status only if it still belongs to this connection (another replica may own the proxy by now).
_RELEASE = """
local cur = redis.call('GET', KEYS[1])
if cur and string.find(cur, ARGV[1], 1, true) then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

# Records per script call: batches keep each run short (Redis is single-threaded while a script runs).
_SCRIPT_BATCH = 1000

# Renew the expiry of many records in one command (cheaper to send than one EXPIRE each); 0 where a key is gone.
_RENEW = """
local kept = {}
for i, key in ipairs(KEYS) do
  kept[i] = redis.call('EXPIRE', key, ARGV[1])
end
return kept
"""

# Write many records with one expiry in one command (a pipeline of SETs costs the gateway more to encode).
_STORE = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1])
end
return #KEYS
"""


def node_info(node: Any) -> dict:
    """The parts of an envoy.config.core.v3.Node worth keeping, as JSON-able data."""
    from google.protobuf.json_format import MessageToDict

    info: dict[str, Any] = {"id": node.id, "cluster": node.cluster}
    if node.HasField("metadata"):
        info["metadata"] = MessageToDict(node.metadata)
    if node.user_agent_name:
        info["user_agent_name"] = node.user_agent_name
    if node.user_agent_version:
        info["user_agent_version"] = node.user_agent_version
    if node.HasField("user_agent_build_version"):
        v = node.user_agent_build_version.version
        info["user_agent_build_version"] = f"{v.major_number}.{v.minor_number}.{v.patch}"
    if node.HasField("locality"):
        info["locality"] = MessageToDict(node.locality)
    return info


class StatusRecorder:
    """Collects status changes from streams and writes them to Redis in batches (a push to 2,000 streams would
    otherwise be 16,000 single writes)."""

    def __init__(self, redis: aioredis.Redis, replica: str, ttl: float = 30.0, flush_interval: float = 0.1):
        self.redis = redis
        self.replica = replica
        self.ttl = ttl
        self.flush_interval = flush_interval
        self._live: dict[str, Any] = {}  # conn id → stream (has .status_doc())
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._release = self.redis.register_script(_RELEASE)
        self._renew = self.redis.register_script(_RENEW)
        self._store = self.redis.register_script(_STORE)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._flush_loop(), name="status-flush"),
                       asyncio.create_task(self._heartbeat_loop(), name="status-heartbeat")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(Exception):
            await self.flush()

    async def connected(self, stream) -> None:
        """Record a new stream at once (the translator may be waiting for it)."""
        self._live[stream.conn_id] = stream
        node = dict(stream.node_info)
        node["replica"] = self.replica
        node["seen_at"] = time.time()
        async with self.redis.pipeline(transaction=True) as p:
            p.set(NODE + stream.proxy, orjson.dumps(node))
            p.set(STATUS + stream.proxy, orjson.dumps(stream.status_doc()), ex=int(self.ttl))
            p.sadd(CONNECTED, stream.proxy)
            await p.execute()

    def changed(self, stream) -> None:
        if stream.conn_id in self._live:
            self._dirty.add(stream.conn_id)
            self._wake.set()

    async def disconnected(self, stream) -> None:
        self._live.pop(stream.conn_id, None)
        self._dirty.discard(stream.conn_id)
        try:
            await self._release(keys=[STATUS + stream.proxy, CONNECTED], args=[f'"conn":"{stream.conn_id}"', stream.proxy])
        except Exception as e:  # noqa: BLE001 - the TTL cleans up if Redis is away
            log.warning("could not clear status of %s: %s", stream.proxy, e)

    async def flush(self) -> None:
        batch = [self._live[c] for c in self._dirty if c in self._live]
        self._dirty.clear()
        if not batch:
            return
        for i in range(0, len(batch), _SCRIPT_BATCH):
            part = batch[i:i + _SCRIPT_BATCH]
            await self._store(keys=[STATUS + s.proxy for s in part],
                              args=[int(self.ttl), *(orjson.dumps(s.status_doc()) for s in part)])

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.flush_interval)  # coalesce a push's worth of changes
            try:
                await self.flush()
            except Exception as e:  # noqa: BLE001
                log.warning("status flush failed: %s", e)
                await asyncio.sleep(1)

    async def refresh(self) -> None:
        """Keep every live stream's record alive. Unchanged records only get a new expiry (a 10,000-proxy
        gateway would otherwise encode and send 10,000 documents every heartbeat); records Redis no longer has
        (it restarted, or one expired while Redis was away) are written again."""
        unchanged = [s for c, s in self._live.items() if c not in self._dirty]
        for i in range(0, len(unchanged), _SCRIPT_BATCH):
            batch = unchanged[i:i + _SCRIPT_BATCH]
            kept = await self._renew(keys=[STATUS + s.proxy for s in batch], args=[int(self.ttl)])
            self._dirty.update(s.conn_id for s, ok in zip(batch, kept, strict=True) if not ok)
        await self.flush()

    async def _heartbeat_loop(self) -> None:
        """Keep our streams' status alive, re-assert membership, and drop members whose status expired (their
        replica died)."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.refresh()
                if self._live:
                    await self.redis.sadd(CONNECTED, *{s.proxy for s in self._live.values()})
                members = [m.decode() for m in await self.redis.smembers(CONNECTED)]
                if members:
                    exists = await self.redis.mget([STATUS + m for m in members])
                    gone = [m for m, v in zip(members, exists, strict=True) if v is None]
                    if gone:
                        await self.redis.srem(CONNECTED, *gone)
            except Exception as e:  # noqa: BLE001
                log.warning("status heartbeat failed: %s", e)


