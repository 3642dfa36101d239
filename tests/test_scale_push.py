"""Push less, with real processes (NATS, Redis, registry, translator, xds_gateway) and Envoy-like ADS clients:
an endpoint change is built incrementally, stored byte-identical to a full rebuild, and pushed as EDS only to
the proxies that see the service."""

from __future__ import annotations

import asyncio
import random

import redis.asyncio as aioredis
from envoy.config.cluster.v3 import cluster_pb2

from mizzen.services.mesh.snapstore import PROXY_NODE, SnapshotStore
from mizzen.services.mesh.stack import Stack
from mizzen.services.mesh.store import ConfigStore
from mizzen.services.mesh.xds_types import CLUSTER, ROUTE
from mizzen.services.translator.proxy import Proxy
from mizzen.services.translator.push_context import PushContext
from mizzen.services.translator.snapshot import build_snapshot

from .scale_support import (
    SHORT,
    apply,
    endpoints_object,
    eventually,
    metrics,
    new_client,
    node_id,
    pod_ip,
    pushes,
    scoped_namespace,
    service_objects,
)

SERVICES = {"a": [0, 1, 2], "b": [3, 4]}


def mesh() -> list[dict]:
    objs = scoped_namespace("a") + scoped_namespace("b")
    for ns, idx in SERVICES.items():
        for i in idx:
            objs += service_objects(f"s{i}", ns, i)
    return objs


async def stored_equals_full_rebuild(redis_url: str) -> int:
    """Compare every stored snapshot with a full rebuild from the stored config; returns how many compared."""
    r = aioredis.from_url(redis_url)
    try:
        store = SnapshotStore(r)
        revision, objects = await ConfigStore(r).snapshot()
        push = PushContext.from_resources(objects, revision=revision)
        proxies = await store.proxies()
        for p in proxies:
            stored = await store.load(p)
            assert stored is not None
            assert stored.manifest.revision == revision, (p, stored.manifest.revision, revision)
            node = await r.get(PROXY_NODE + p)
            import orjson

            meta = (orjson.loads(node).get("metadata") or {}) if node else None
            want = build_snapshot(push, Proxy.from_node_id(p, push, metadata=meta)).merged()
            for t, res in want.items():
                have = stored.index.get(t, {})
                assert sorted(have) == sorted(res), (p, SHORT[t])
                data = await store.resources(list(have.values()))
                for name, msg in res.items():
                    assert data[have[name]] == msg.SerializeToString(deterministic=True), (p, name)
        return len(proxies)
    finally:
        await r.aclose()


def test_endpoint_change_is_incremental_identical_and_pushed_only_where_seen(tmp_path):
    async def run(stack: Stack):
        apply(stack.registry_url, mesh())
        gw_http = stack.http_ports["xds-gateway"]
        a = await new_client(stack.xds_port, node_id("s0-0", "a", pod_ip(0, 0))).start()
        b = await new_client(stack.xds_port, node_id("s3-0", "b", pod_ip(3, 0))).start()
        try:
            s1 = "outbound|80||s1.a.svc.cluster.local"
            await eventually(lambda: all(len(c.versions) == 4 for c in (a, b)) and s1 in a.resources[
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"], what="both clients synced")
            await asyncio.sleep(1.5)  # let every initial push and ACK settle
            before = pushes(gw_http)
            b_before = dict(b.responses)
            builds_before = metrics(stack.http_ports["translator"]).get(
                'mizzen_translator_builds_total{kind="endpoints"}', 0.0)

            rev = apply(stack.registry_url, [endpoints_object("s1", "a", 1, [0, 1], ["10.9.9.9"])])
            eds = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            await eventually(lambda: b"10.9.9.9" in a.resources[eds].get(s1, b""), what="a sees the new endpoint")
            await asyncio.sleep(1.5)  # anything else would have arrived by now
            after = pushes(gw_http)
            diff = {k: after[k] - before[k] for k in after}
            assert diff == {"CDS": 0, "EDS": 1, "LDS": 0, "RDS": 0}, diff
            assert b.responses == b_before  # namespace b does not see s1: nothing pushed to it
            tm = metrics(stack.http_ports["translator"])
            assert tm['mizzen_translator_builds_total{kind="endpoints"}'] == builds_before + 1
            assert tm["mizzen_translator_revision"] >= rev
            assert await stored_equals_full_rebuild(stack.redis_url) >= 2

            # a random sequence of endpoint changes (some coalesced into one build) stays identical too
            rng = random.Random(7)
            for step in range(6):
                i = rng.choice([0, 1, 2, 3, 4])
                ns = "a" if i < 3 else "b"
                pods = rng.choice([[0, 1], [0], [1]])
                apply(stack.registry_url, [endpoints_object(f"s{i}", ns, i, pods,
                                                            [f"10.8.{step}.{k}" for k in range(rng.randint(0, 2))])])
                if step % 2:
                    await asyncio.sleep(0.3)
            last = apply(stack.registry_url, [endpoints_object("s2", "a", 2, [1], ["10.7.7.7"])])
            await eventually(lambda: metrics(stack.http_ports["translator"])["mizzen_translator_revision"] >= last,
                             what="translator built the last revision")
            assert await stored_equals_full_rebuild(stack.redis_url) >= 2
            tm = metrics(stack.http_ports["translator"])
            assert tm['mizzen_translator_builds_total{kind="endpoints"}'] >= builds_before + 3
            assert tm.get('mizzen_translator_builds_total{kind="full"}', 0) >= 1
        finally:
            await a.stop()
            await b.stop()

    with Stack(tmp_path) as stack:
        stack.start()
        asyncio.run(run(stack))


def test_virtual_service_change_is_routing_only_identical_and_pushed_only_where_seen(tmp_path):
    """A VirtualService change builds `routing`: RDS goes to the proxies that see its host and nothing else to
    anyone; a DestinationRule policy change reaches only the clusters of those proxies. Stored snapshots stay
    byte-identical to a full rebuild."""
    async def run(stack: Stack):
        apply(stack.registry_url, mesh())
        gw_http, tr_http = stack.http_ports["xds-gateway"], stack.http_ports["translator"]
        a0 = await new_client(stack.xds_port, node_id("s0-0", "a", pod_ip(0, 0))).start()
        a1 = await new_client(stack.xds_port, node_id("s1-0", "a", pod_ip(1, 0))).start()
        b = await new_client(stack.xds_port, node_id("s3-0", "b", pod_ip(3, 0))).start()
        clients = (a0, a1, b)
        try:
            await eventually(lambda: all(len(c.versions) == 4 for c in clients), what="clients synced")
            await asyncio.sleep(1.5)  # let every initial push and ACK settle

            async def change(objs: list[dict], seen) -> tuple[dict, dict]:
                before, b_before = pushes(gw_http), dict(b.responses)
                routing = metrics(tr_http).get('mizzen_translator_builds_total{kind="routing"}', 0.0)
                rev = apply(stack.registry_url, objs)
                await eventually(lambda: metrics(tr_http)["mizzen_translator_revision"] >= rev, what="built")
                await eventually(lambda: all(seen(c) for c in (a0, a1)), what="a's proxies got the change")
                await asyncio.sleep(1.5)  # anything else would have arrived by now
                after = pushes(gw_http)
                assert b.responses == b_before  # b's Sidecar hides a's services: nothing pushed to it
                assert metrics(tr_http)['mizzen_translator_builds_total{kind="routing"}'] == routing + 1
                assert await stored_equals_full_rebuild(stack.redis_url) >= 3
                return {k: after[k] - before[k] for k in after}

            vs = {"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
                  "metadata": {"name": "s2", "namespace": "a"},
                  "spec": {"hosts": ["s2"], "http": [{"match": [{"headers": {"x-to": {"exact": "to-s1"}}}],
                                                      "route": [{"destination": {"host": "s1"}}]},
                                                     {"route": [{"destination": {"host": "s2"}}]}]}}
            def routes_say(text: bytes):
                return lambda c: any(text in v for v in c.resources[ROUTE].values())

            diff = await change([vs], routes_say(b"to-s1"))
            assert diff == {"CDS": 0, "EDS": 0, "LDS": 0, "RDS": 2}, diff  # a0 and a1, once each

            vs["spec"]["http"][0] = {"match": [{"headers": {"x-to": {"exact": "to-s0"}}}],
                                     "route": [{"destination": {"host": "s0"}}]}
            diff = await change([vs], routes_say(b"to-s0"))
            assert diff == {"CDS": 0, "EDS": 0, "LDS": 0, "RDS": 2}, diff

            dr = {"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
                  "metadata": {"name": "s2", "namespace": "a"},
                  "spec": {"host": "s2", "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 77}}}}}

            def limited(c) -> bool:
                raw = c.resources[CLUSTER].get("outbound|80||s2.a.svc.cluster.local")
                if raw is None:
                    return False
                t = cluster_pb2.Cluster.FromString(raw).circuit_breakers.thresholds
                return bool(t) and t[0].max_connections.value == 77

            diff = await change([dr], limited)
            # a replaced EDS cluster gets its endpoints again (Envoy re-warms it): EDS follows CDS, same two
            assert diff == {"CDS": 2, "EDS": 2, "LDS": 0, "RDS": 0}, diff
        finally:
            for c in clients:
                await c.stop()

    with Stack(tmp_path) as stack:
        stack.start()
        asyncio.run(run(stack))
