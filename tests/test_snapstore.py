"""The content-addressed snapshot store against a real Redis: sharing, unchanged puts, garbage collection."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from mizzen.services.mesh.snapstore import LAYER, RES, SnapshotStore, prepare_layer
from mizzen.services.mesh.xds_types import CLUSTER, LISTENER


def layer(**resources: bytes) -> dict:
    return {CLUSTER: {n: b for n, b in resources.items() if n.startswith("c")},
            LISTENER: {n: b for n, b in resources.items() if n.startswith("l")}}


async def keys(r, prefix: str) -> set[str]:
    return {k.decode() async for k in r.scan_iter(match=prefix + "*")}


def test_shared_layers_unchanged_puts_and_two_phase_gc(redis_server):
    async def run():
        r = aioredis.from_url(redis_server.meta["url"])
        store = SnapshotStore(r)
        shared = prepare_layer(layer(c1=b"one", l1=b"listener"))
        (m1, ch1), (m2, ch2) = await store.put_many(1, [("p1", [shared, layer(c9=b"own-1")]),
                                                        ("p2", [shared, layer(c9=b"own-2")])])
        assert ch1 and ch2 and m1.layers[0] == m2.layers[0]  # one stored copy of the shared layer
        assert len(await keys(r, LAYER)) == 3 and len(await keys(r, RES)) == 4
        (same, changed), = await store.put_many(2, [("p1", [shared, layer(c9=b"own-1")])])
        assert not changed and same.revision == 2 and same.versions == m1.versions
        # p2 moves on: its old own layer and resource are unreferenced now
        await store.put("p2", 3, [shared, layer(c9=b"own-2b")])
        deleted, candidates = await store.collect_garbage(set())
        assert deleted == 0 and len(candidates) == 2  # first sweep only marks
        deleted, candidates = await store.collect_garbage(candidates)
        assert deleted == 2 and not candidates
        # everything live still loads, bytes included
        for p, own in (("p1", b"own-1"), ("p2", b"own-2b")):
            msgs = await store.load(p)
            data = await store.resources(list(msgs.index[CLUSTER].values()))
            assert sorted(data.values()) == sorted([b"one", own])
        # content that comes back after being collected is written again, not assumed present
        await store.put("p2", 4, [shared, layer(c9=b"own-2")])
        snap = await store.load("p2")
        assert b"own-2" in (await store.resources(list(snap.index[CLUSTER].values()))).values()
        await r.aclose()

    asyncio.run(run())


def test_a_snapshot_of_older_config_never_replaces_a_newer_one(redis_server):
    """Two translator replicas may both build a proxy while it moves between them: the newer revision wins."""
    async def main():
        r = aioredis.from_url(redis_server.meta["url"])
        store = SnapshotStore(r)
        try:
            (m, changed), = await store.put_many(5, [("p1", [layer(c1=b"new")])])
            assert changed and m.revision == 5
            (kept, changed), = await store.put_many(4, [("p1", [layer(c1=b"old")])])
            assert not changed and kept.revision == 5
            assert (await store.manifest("p1")).layers == m.layers
        finally:
            await r.aclose()

    asyncio.run(main())
