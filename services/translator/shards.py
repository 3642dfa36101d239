"""Which translator replica builds which proxy: rendezvous (highest-random-weight) hashing of proxy ids over the
replicas alive in a Redis heartbeat set.

Each replica refreshes its score (the time) in `translator:replicas` every `interval` seconds; a replica whose
score is older than `ttl` is dead to the others. Every live replica computes the same owner for every proxy
from the same member list, so each proxy is built by exactly one replica; when a replica dies (or joins) only
its share moves (rendezvous hashing moves nothing else), within `ttl` plus one heartbeat.

During the few seconds two replicas disagree on membership a proxy may be built by both: both build from the
stored config, and the snapshot store keeps the manifest with the newer revision (see SnapshotStore.put_many),
so the writes never conflict.
"""

from __future__ import annotations

import hashlib
import time

import redis.asyncio as aioredis

REPLICAS = "translator:replicas"  # sorted set: replica id → last heartbeat (unix seconds)


def _weight(replica: str, proxy: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{replica}\0{proxy}".encode(), digest_size=8).digest(), "big")


def owner(proxy: str, replicas: list[str] | tuple[str, ...]) -> str | None:
    """The replica that builds `proxy` (None when there is none)."""
    best, best_w = None, -1
    for r in replicas:
        w = _weight(r, proxy)
        if w > best_w or (w == best_w and best is not None and r < best):
            best, best_w = r, w
    return best


class Membership:
    """This replica's view of the live replicas."""

    def __init__(self, redis: aioredis.Redis, replica: str, ttl: float = 3.0):
        self.r = redis
        self.replica = replica
        self.ttl = ttl
        self.members: tuple[str, ...] = (replica,)

    async def heartbeat(self) -> bool:
        """Refresh our score, drop long-dead members, read the live set; True when it changed."""
        now = time.time()
        async with self.r.pipeline(transaction=False) as p:
            p.zadd(REPLICAS, {self.replica: now})
            p.zremrangebyscore(REPLICAS, 0, now - 10 * self.ttl)
            p.zrangebyscore(REPLICAS, now - self.ttl, "+inf")
            _, _, live = await p.execute()
        members = tuple(sorted({m.decode() if isinstance(m, bytes) else m for m in live} | {self.replica}))
        changed = members != self.members
        self.members = members
        return changed

    async def leave(self) -> None:
        await self.r.zrem(REPLICAS, self.replica)

    def mine(self, proxy: str) -> bool:
        return len(self.members) == 1 or owner(proxy, self.members) == self.replica
