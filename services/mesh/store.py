"""Configuration state in Redis. The registry is its only writer.

Layout:
  config:objects   hash  `Kind/ns/name` → JSON object (metadata.resourceVersion = revision of its last write)
  config:rev       int   one monotonic revision, bumped once per committed write, in the same transaction
  config:log       stream of {rev, keys}: the change history (bounded), for tools and watchers
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis

from .kinds import object_key

OBJECTS = "config:objects"
REVISION = "config:rev"
LOG = "config:log"
LOG_MAXLEN = 10_000


@dataclass
class Change:
    revision: int
    keys: list[str]  # keys written or deleted

    def to_json(self) -> bytes:
        return orjson.dumps({"revision": self.revision, "keys": self.keys})


def key_of(obj: dict) -> str:
    meta = obj["metadata"]
    return object_key(obj["kind"], meta.get("namespace"), meta["name"])


def connect(url: str, max_connections: int | None = None) -> aioredis.Redis:
    """A client that retries through Redis restarts instead of failing the caller at once. With
    `max_connections`, callers beyond the limit wait for a free connection instead of failing (a gateway
    with 2,000 streams connecting at once)."""
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RConnErr
    from redis.exceptions import TimeoutError as RTimeout

    options = dict(
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 20),
        retry_on_error=[RConnErr, RTimeout, ConnectionRefusedError, OSError],
        health_check_interval=5,
        socket_connect_timeout=2,
    )
    if max_connections is None:
        return aioredis.from_url(url, **options)
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=30,
                                                    socket_timeout=10, **options)
    return aioredis.Redis(connection_pool=pool)


class ConfigStore:
    def __init__(self, redis: aioredis.Redis):
        self.r = redis

    async def revision(self) -> int:
        v = await self.r.get(REVISION)
        return int(v) if v else 0

    async def apply(self, objects: list[dict]) -> Change:
        """Store every object in one transaction with one new revision. All or nothing."""
        return await self._commit(puts=objects, deletes=[])

    async def delete(self, keys: list[str]) -> Change:
        return await self._commit(puts=[], deletes=keys)

    async def _commit(self, puts: list[dict], deletes: list[str]) -> Change:
        async with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(REVISION)
                    rev = int(await pipe.get(REVISION) or 0) + 1
                    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                    existing = {}
                    if puts:
                        vals = await pipe.hmget(OBJECTS, [key_of(o) for o in puts])
                        existing = {key_of(o): v for o, v in zip(puts, vals, strict=True)}
                    pipe.multi()
                    keys: list[str] = []
                    for obj in puts:
                        k = key_of(obj)
                        obj = dict(obj)
                        meta = dict(obj["metadata"])
                        meta["resourceVersion"] = str(rev)
                        old = existing.get(k)
                        if old:
                            old_meta = orjson.loads(old).get("metadata", {})
                            meta["creationTimestamp"] = old_meta.get("creationTimestamp", now)
                            meta["uid"] = old_meta.get("uid") or str(uuid.uuid4())
                        else:
                            meta.setdefault("creationTimestamp", now)
                            meta.setdefault("uid", str(uuid.uuid4()))
                        obj["metadata"] = meta
                        pipe.hset(OBJECTS, k, orjson.dumps(obj))
                        keys.append(k)
                    if deletes:
                        pipe.hdel(OBJECTS, *deletes)
                        keys.extend(deletes)
                    pipe.set(REVISION, rev)
                    pipe.xadd(LOG, {"rev": rev, "keys": orjson.dumps(keys)}, maxlen=LOG_MAXLEN, approximate=True)
                    await pipe.execute()
                    return Change(rev, keys)
                except aioredis.WatchError:
                    continue

    async def get(self, key: str) -> dict | None:
        v = await self.r.hget(OBJECTS, key)
        return orjson.loads(v) if v else None

    async def get_many(self, keys: list[str]) -> dict[str, dict]:
        """The stored objects among `keys`, in one round trip."""
        if not keys:
            return {}
        vals = await self.r.hmget(OBJECTS, keys)
        return {k: orjson.loads(v) for k, v in zip(keys, vals, strict=True) if v is not None}

    async def existing(self, keys: list[str]) -> list[str]:
        if not keys:
            return []
        vals = await self.r.hmget(OBJECTS, keys)
        return [k for k, v in zip(keys, vals, strict=True) if v is not None]

    async def snapshot(self) -> tuple[int, list[dict]]:
        """Every object and the revision they were read at, consistently (one MULTI)."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.get(REVISION)
            pipe.hvals(OBJECTS)
            rev, vals = await pipe.execute()
        return int(rev or 0), [orjson.loads(v) for v in vals]

    async def list(self, kind: str | None = None, namespace: str | None = None) -> tuple[int, list[dict]]:
        rev, objs = await self.snapshot()
        out = [
            o
            for o in objs
            if (kind is None or o.get("kind") == kind)
            and (namespace is None or o.get("metadata", {}).get("namespace") == namespace)
        ]
        out.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return rev, out
