"""Translator replicas split the proxies, with real processes: each proxy is built by exactly one live replica,
and a replica killed (also in the middle of a build) hands its share to the other within seconds."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from mizzen.services.mesh.snapstore import SnapshotStore
from mizzen.services.mesh.stack import Stack
from mizzen.services.mesh.xds_types import ENDPOINT
from mizzen.services.translator.shards import owner

from .scale_support import (
    apply,
    endpoints_object,
    eventually,
    metrics,
    new_client,
    node_id,
    pod_ip,
    service_objects,
)

N = 12  # services, one pod (= one proxy) each
REPLICAS = ("t1", "t2")


def mesh(n: int = N) -> list[dict]:
    objs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}]
    for i in range(n):
        objs += service_objects(f"s{i}", "a", i, pods=1)
    return objs


def proxies(n: int = N) -> list[str]:
    return [node_id(f"s{i}-0", "a", pod_ip(i, 0)) for i in range(n)]


async def revisions(redis_url: str) -> dict[str, int]:
    r = aioredis.from_url(redis_url)
    try:
        store = SnapshotStore(r)
        out = {}
        for p in await store.proxies():
            m = await store.manifest(p)
            out[p] = m.revision if m else -1
        return out
    finally:
        await r.aclose()


def start_replicas(stack: Stack) -> None:
    for name, rid in zip(("translator", "translator-2"), REPLICAS, strict=True):
        stack.start_service(name, extra=["--replica-id", rid, "--heartbeat", "0.5"])


def test_replicas_split_proxies_and_take_over_a_killed_ones_share(tmp_path):
    async def run(stack: Stack):
        rev = apply(stack.registry_url, mesh())
        ids = proxies()
        share = {r: [p for p in ids if owner(p, REPLICAS) == r] for r in REPLICAS}
        assert all(share.values()), share  # both replicas own some proxies
        await eventually(lambda: all(metrics(stack.http_ports[n])["mizzen_translator_replicas"] == 2
                                     for n in ("translator", "translator-2")), what="both replicas see each other")
        await eventually(lambda: all(metrics(stack.http_ports[n])["mizzen_translator_proxies"] == len(share[r])
                                     for n, r in (("translator", "t1"), ("translator-2", "t2"))),
                         what="each replica builds exactly its share")
        await eventually(lambda: _all_at(stack, ids, rev), what="every proxy built")

        # a proxy of t2, connected through the gateway, keeps getting updates after t2 dies
        victim = share["t2"][0]
        i = ids.index(victim)
        client = await new_client(stack.xds_port, victim).start()
        try:
            await eventually(lambda: len(client.versions) == 4, what="client synced")
            stack.stop_service("translator-2", kill=True)  # SIGKILL: no goodbye, the heartbeat must expire
            killed = time.monotonic()
            rev2 = apply(stack.registry_url, [endpoints_object(f"s{i}", "a", i, [0], ["10.9.9.9"])])
            cluster = f"outbound|80||s{i}.a.svc.cluster.local"
            await eventually(lambda: b"10.9.9.9" in client.resources[ENDPOINT].get(cluster, b""), timeout=20,
                             what="t2's proxy updated by t1")
            took = time.monotonic() - killed
            assert took < 6, f"takeover took {took:.1f}s"
            await eventually(lambda: _all_at(stack, ids, rev2), what="every proxy at the new revision")
            assert metrics(stack.http_ports["translator"])["mizzen_translator_proxies"] == len(ids)
        finally:
            await client.stop()

    with Stack(tmp_path) as stack:
        stack.start(services=("registry", "xds-gateway"))
        start_replicas(stack)
        asyncio.run(run(stack))


def test_translator_killed_mid_build_loses_nothing(tmp_path):
    """Kill a replica while it builds a large change; the survivor builds every proxy at the last revision."""
    async def run(stack: Stack):
        apply(stack.registry_url, mesh(40))
        ids = proxies(40)
        await eventually(lambda: _all_at(stack, ids, 1), timeout=30, what="first build")
        # a big change (300 new services) makes a build long enough to be interrupted
        objs = []
        for i in range(40, 340):
            objs += service_objects(f"s{i}", "a", i, pods=1)
        last = apply(stack.registry_url, objs)
        await asyncio.sleep(0.15)  # debounce passed: t2 is building
        stack.stop_service("translator-2", kill=True)
        all_ids = proxies(340)
        await eventually(lambda: _all_at(stack, all_ids, last), timeout=40,
                         what="every proxy (t2's too) built at the last revision by t1")

    with Stack(tmp_path) as stack:
        stack.start(services=("registry",))
        start_replicas(stack)
        asyncio.run(run(stack))


async def _all_at(stack: Stack, ids: list[str], revision: int) -> bool:
    revs = await revisions(stack.redis_url)
    return all(revs.get(p, -1) >= revision for p in ids)
