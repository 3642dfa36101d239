"""xDS protocol edge cases against the real gateway process, with a grpcio ADS client playing Envoy:
nonces (stale ones ignored), ACK/NACK, resource-name subscriptions and unsubscribe, content-only pushes, and
delta's initial_resource_versions, subscribe/unsubscribe/resubscribe and removals."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from mizzen.services.mesh.snapstore import SnapshotStore, digest
from mizzen.services.mesh.xds_types import CLUSTER, ENDPOINT, LISTENER
from mizzen.services.xds_gateway.status import load_statuses

from .test_xds_support import Mesh, eventually, node_id, start_gateway, write_snapshot

QUIET = 0.8  # seconds of silence that count as "no response"


class AdsClient:
    """A grpcio ADS client; a reader task queues responses (cancelling a read would cancel the whole call)."""

    def __init__(self, port: int, delta: bool = False):
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.call = stub.DeltaAggregatedResources() if delta else stub.StreamAggregatedResources()
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            msg = await self.call.read()
            if msg is grpc.aio.EOF:
                return
            self.inbox.put_nowait(msg)

    async def send(self, req) -> None:
        await self.call.write(req)

    async def recv(self, timeout: float = 10.0):
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def silent(self, timeout: float = QUIET) -> bool:
        try:
            msg = await asyncio.wait_for(self.inbox.get(), timeout)
        except TimeoutError:
            return True
        raise AssertionError(f"expected no response, got {msg}")

    async def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.channel.close()


def names(resp) -> set[str]:
    out = set()
    for a in resp.resources:
        cls = cluster_pb2.Cluster if a.type_url == CLUSTER else endpoint_pb2.ClusterLoadAssignment
        msg = cls.FromString(a.value)
        out.add(msg.name if a.type_url == CLUSTER else msg.cluster_name)
    return out


def cla_ports(resp) -> dict[str, list[int]]:
    out = {}
    for a in resp.resources:
        cla = endpoint_pb2.ClusterLoadAssignment.FromString(a.value)
        out[cla.cluster_name] = [e.endpoint.address.socket_address.port_value
                                 for loc in cla.endpoints for e in loc.lb_endpoints]
    return out


@pytest.fixture
async def stack(tmp_path, nats_server, redis_server):
    nats_url, redis_url = nats_server.meta["url"], redis_server.meta["url"]
    redis = aioredis.from_url(redis_url)
    gw = start_gateway(tmp_path, nats_url, redis_url, replica="gw-proto")
    try:
        yield {"nats": nats_url, "redis": redis, "store": SnapshotStore(redis), "gw": gw}
    finally:
        gw.stop()
        await redis.aclose()


async def test_sotw_nonces_acks_subscriptions(stack):
    store, nats_url = stack["store"], stack["nats"]
    proxy = node_id("proto-sotw")
    mesh = Mesh()
    mesh.clusters = {"a": [1001], "b": [2001]}
    await write_snapshot(store, proxy, 1, mesh)
    c = AdsClient(stack["gw"].meta["port"])
    node = base_pb2.Node(id=proxy)
    try:
        # wildcard CDS: both clusters, typed and versioned
        await c.send(discovery_pb2.DiscoveryRequest(node=node, type_url=CLUSTER))
        cds = await c.recv()
        assert cds.type_url == CLUSTER and names(cds) == {"a", "b"} and cds.version_info and cds.nonce
        assert cds.control_plane.identifier == "gw-proto"
        await c.send(discovery_pb2.DiscoveryRequest(type_url=CLUSTER, version_info=cds.version_info,
                                                    response_nonce=cds.nonce))
        assert await c.silent()  # an ACK gets no response

        # EDS by name: only what is subscribed
        await c.send(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["a"]))
        eds1 = await c.recv()
        assert cla_ports(eds1) == {"a": [1001]}
        await c.send(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["a"],
                                                    version_info=eds1.version_info, response_nonce=eds1.nonce))
        assert await c.silent()

        # a change to an unsubscribed resource is not pushed; CDS content is unchanged too
        mesh.clusters["b"] = [2002]
        await write_snapshot(store, proxy, 2, mesh, nats_url)
        assert await c.silent(1.5)

        # a change to a subscribed one is
        mesh.clusters["a"] = [1002]
        await write_snapshot(store, proxy, 3, mesh, nats_url)
        eds2 = await c.recv()
        assert cla_ports(eds2) == {"a": [1002]} and eds2.nonce != eds1.nonce

        # a request carrying the previous (stale) nonce is ignored, names and all
        await c.send(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["a", "b"],
                                                    version_info=eds1.version_info, response_nonce=eds1.nonce))
        assert await c.silent()

        # ACK of the latest nonce with a wider subscription: the new name is sent
        await c.send(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["a", "b"],
                                                    version_info=eds2.version_info, response_nonce=eds2.nonce))
        eds3 = await c.recv()
        assert cla_ports(eds3) == {"a": [1002], "b": [2002]}

        # unsubscribe b (SotW: the request lists what is still wanted)
        await c.send(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["a"],
                                                    version_info=eds3.version_info, response_nonce=eds3.nonce))
        eds4 = await c.recv()
        assert cla_ports(eds4) == {"a": [1002]}

        # a name with no assignment in the snapshot is answered with an empty one (cluster warms at once)
        await c.send(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["a", "ghost"],
                                                    version_info=eds4.version_info, response_nonce=eds4.nonce))
        eds5 = await c.recv()
        assert cla_ports(eds5) == {"a": [1002], "ghost": []}

        # NACK: recorded with Envoy's error_detail, nothing re-sent, status shows it
        await c.send(discovery_pb2.DiscoveryRequest(
            type_url=ENDPOINT, resource_names=["a", "ghost"], version_info=eds4.version_info,
            response_nonce=eds5.nonce, error_detail=status_pb2.Status(code=3, message="bad endpoint, says envoy")))
        assert await c.silent()
        st = await eventually(lambda: _status(stack["redis"], proxy, "EDS", "NACKed"), what="EDS NACKed")
        assert st["errors"]["EDS"] == "bad endpoint, says envoy"
        assert st["status"]["CDS"] == "SYNCED" and st["status"]["LDS"] == "NOT SENT"

        # LDS with no listeners still gets an (empty) answer, so Envoy can finish initializing
        await c.send(discovery_pb2.DiscoveryRequest(type_url=LISTENER))
        lds = await c.recv()
        assert lds.type_url == LISTENER and len(lds.resources) == 0
    finally:
        await c.close()
    # the stream's end clears its status (a clean disconnect)
    await eventually(lambda: _gone(stack["redis"], proxy), what="status removed on disconnect")


async def test_delta_resume_subscribe_unsubscribe_remove(stack):
    store, nats_url = stack["store"], stack["nats"]
    proxy = node_id("proto-delta")
    mesh = Mesh()
    mesh.clusters = {"a": [1001], "b": [2001], "c": [3001]}
    await write_snapshot(store, proxy, 1, mesh)
    layer = mesh.layer()
    c = AdsClient(stack["gw"].meta["port"], delta=True)
    node = base_pb2.Node(id=proxy)
    try:
        # resuming: the client already has a (current) and b (outdated): only b and c come
        await c.send(discovery_pb2.DeltaDiscoveryRequest(
            node=node, type_url=CLUSTER,
            initial_resource_versions={"a": digest(layer[CLUSTER]["a"]), "b": "outdated"}))
        r1 = await c.recv()
        assert sorted(r.name for r in r1.resources) == ["b", "c"]
        assert all(r.version == digest(layer[CLUSTER][r.name]) for r in r1.resources)
        assert cluster_pb2.Cluster.FromString(r1.resources[0].resource.value).name == r1.resources[0].name
        await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, response_nonce=r1.nonce))
        assert await c.silent()

        # subscribe to one endpoint resource
        await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, resource_names_subscribe=["a"]))
        e1 = await c.recv()
        assert [r.name for r in e1.resources] == ["a"]
        await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, response_nonce=e1.nonce))
        # unsubscribe: nothing to send; resubscribe: sent again even though unchanged
        await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, resource_names_unsubscribe=["a"]))
        assert await c.silent()
        await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, resource_names_subscribe=["a"]))
        e2 = await c.recv()
        assert [r.name for r in e2.resources] == ["a"] and e2.resources[0].version == e1.resources[0].version
        await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, response_nonce=e2.nonce))

        # an unknown nonce is not taken as an ACK of anything
        await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, response_nonce="no-such-nonce"))
        assert await c.silent()

        # removing a cluster from the snapshot: removed_resources, and only that
        del mesh.clusters["b"]
        mesh.clusters["a"] = [1009]
        await write_snapshot(store, proxy, 2, mesh, nats_url)
        r2 = await c.recv()
        assert r2.type_url == CLUSTER and list(r2.removed_resources) == ["b"] and len(r2.resources) == 0
        e3 = await c.recv()  # a's endpoints changed
        assert e3.type_url == ENDPOINT and [r.name for r in e3.resources] == ["a"]
        assert cla_ports_delta(e3) == {"a": [1009]}
        await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, response_nonce=r2.nonce))
        await c.send(discovery_pb2.DeltaDiscoveryRequest(
            type_url=ENDPOINT, response_nonce=e3.nonce,
            error_detail=status_pb2.Status(code=3, message="rejected by test")))
        st = await eventually(lambda: _status(stack["redis"], proxy, "EDS", "NACKed"), what="delta NACK recorded")
        assert st["status"]["CDS"] == "SYNCED" and st["api"] == "delta"
        assert await c.silent()  # the rejected content is not re-sent
    finally:
        await c.close()


def cla_ports_delta(resp) -> dict[str, list[int]]:
    out = {}
    for r in resp.resources:
        cla = endpoint_pb2.ClusterLoadAssignment.FromString(r.resource.value)
        out[r.name] = [e.endpoint.address.socket_address.port_value for loc in cla.endpoints for e in loc.lb_endpoints]
    return out


async def _status(redis, proxy: str, short: str, want: str) -> dict | None:
    for s in await load_statuses(redis):
        if s["proxy"] == proxy and s["status"][short] == want:
            return s
    return None


async def _gone(redis, proxy: str) -> bool:
    return all(s["proxy"] != proxy for s in await load_statuses(redis)) and not await redis.sismember(
        "proxies:connected", proxy)


async def test_sotw_cluster_removal_waits_for_routes(stack):
    """Make before break: when a snapshot drops a cluster and the route that used it, the route change goes
    out first and CDS drops the cluster only after the proxy ACKed the routes."""
    from envoy.config.route.v3 import route_pb2

    from mizzen.services.mesh.xds_types import ROUTE

    store, nats_url = stack["store"], stack["nats"]
    proxy = node_id("proto-order")
    mesh = Mesh()
    mesh.clusters = {"keep": [1001], "gone": [2001]}
    mesh.listeners = {"http": (15123, "web")}
    mesh.routes = {"web": [("/gone", "gone"), ("/", "keep")]}
    await write_snapshot(store, proxy, 1, mesh)
    c = AdsClient(stack["gw"].meta["port"])
    try:
        async def ack(resp, names=()):
            await c.send(discovery_pb2.DiscoveryRequest(type_url=resp.type_url, version_info=resp.version_info,
                                                        response_nonce=resp.nonce, resource_names=list(names)))

        await c.send(discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=proxy), type_url=CLUSTER))
        cds = await c.recv()
        await ack(cds)
        await c.send(discovery_pb2.DiscoveryRequest(type_url=LISTENER))
        lds = await c.recv()
        await ack(lds)
        await c.send(discovery_pb2.DiscoveryRequest(type_url=ROUTE, resource_names=["web"]))
        rds = await c.recv()
        await ack(rds, ["web"])
        assert names(cds) == {"keep", "gone"}
        await eventually(lambda: _status(stack["redis"], proxy, "RDS", "SYNCED"), what="synced")

        del mesh.clusters["gone"]
        mesh.routes["web"] = [("/", "keep")]
        await write_snapshot(store, proxy, 2, mesh, nats_url)
        first = await c.recv()
        assert first.type_url == ROUTE, "the route must stop referencing the cluster before CDS drops it"
        vhost = route_pb2.RouteConfiguration.FromString(first.resources[0].value).virtual_hosts[0]
        assert [r.route.cluster for r in vhost.routes] == ["keep"]
        st = await eventually(lambda: _status(stack["redis"], proxy, "CDS", "STALE"), what="CDS held (STALE)")
        assert st["status"]["RDS"] == "STALE"  # sent, not yet ACKed
        assert await c.silent()  # CDS waits for the ACK
        await ack(first, ["web"])
        cds2 = await c.recv()
        assert cds2.type_url == CLUSTER and names(cds2) == {"keep"}
        await ack(cds2)
        await eventually(lambda: _status(stack["redis"], proxy, "CDS", "SYNCED"), what="CDS synced after removal")
    finally:
        await c.close()


async def test_layered_snapshots_compose_and_override(stack):
    """A snapshot of several layers (mesh-wide + proxy-specific): the response carries the union, a later layer
    overrides a name, and a name dropped from a shared layer is removed."""
    from .test_xds_support import eds_cluster

    store, nats_url = stack["store"], stack["nats"]
    proxy = node_id("proto-layers")

    def layer(**clusters):
        return {CLUSTER: {n: eds_cluster(n).SerializeToString() if t is None else
                          cluster_pb2.Cluster(name=n, connect_timeout={"seconds": t}).SerializeToString()
                          for n, t in clusters.items()}}

    shared = layer(a=None, b=None, c=None)
    own = layer(inbound=None, b=7)  # b overridden by the proxy's own layer
    await store.put(proxy, 1, [shared, own])
    c = AdsClient(stack["gw"].meta["port"])
    try:
        await c.send(discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=proxy), type_url=CLUSTER))
        r1 = await c.recv()
        got = {cluster_pb2.Cluster.FromString(a.value).name: cluster_pb2.Cluster.FromString(a.value)
               for a in r1.resources}
        assert sorted(got) == ["a", "b", "c", "inbound"] and len(r1.resources) == 4
        assert got["b"].connect_timeout.seconds == 7
        manifest = await store.manifest(proxy)
        assert r1.version_info == manifest.versions[CLUSTER]
        await c.send(discovery_pb2.DiscoveryRequest(type_url=CLUSTER, version_info=r1.version_info,
                                                    response_nonce=r1.nonce))
        # without overlap too: two layers, one body each, joined
        await store.put(proxy, 2, [layer(a=None, c=None), layer(inbound=None)])
        from .test_xds_support import publish

        await publish(nats_url, proxy)
        r2 = await c.recv()
        assert sorted(cluster_pb2.Cluster.FromString(a.value).name for a in r2.resources) == ["a", "c", "inbound"]
        assert r2.version_info == (await store.manifest(proxy)).versions[CLUSTER]
    finally:
        await c.close()


async def test_unknown_proxy_announced_then_served_even_without_event(tmp_path, nats_server, redis_server):
    """A proxy that connects before its snapshot exists is announced on mizzen.proxy.connected (with its node
    metadata, also kept in Redis) and served once a snapshot appears, even if the NATS event for it is lost
    (the periodic resync re-reads Redis)."""
    import nats as nats_client
    import orjson
    from google.protobuf import struct_pb2

    from mizzen.services.mesh.bus import PROXY_CONNECTED

    nats_url, redis_url = nats_server.meta["url"], redis_server.meta["url"]
    redis = aioredis.from_url(redis_url)
    announced: asyncio.Queue = asyncio.Queue()

    async def on_connected(msg) -> None:
        announced.put_nowait(orjson.loads(msg.data))

    proxy = node_id("late-1", "shop")
    gw = start_gateway(tmp_path, nats_url, redis_url, replica="gw-resync", extra=["--resync-interval", "1"])
    nc = c = None
    try:
        nc = await nats_client.connect(nats_url)
        await nc.subscribe(PROXY_CONNECTED, cb=on_connected)
        await nc.flush()
        c = AdsClient(gw.meta["port"])
        md = struct_pb2.Struct()
        md.update({"NAMESPACE": "shop", "LABELS": {"app": "late"}})
        await c.send(discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=proxy, metadata=md), type_url=CLUSTER))
        event = await asyncio.wait_for(announced.get(), 10)
        assert event["proxy"] == proxy and event["replica"] == "gw-resync"
        assert event["node"]["metadata"]["LABELS"] == {"app": "late"}
        stored = orjson.loads(await redis.get("proxynode:" + proxy))
        assert stored["metadata"]["NAMESPACE"] == "shop" and stored["replica"] == "gw-resync"
        assert await c.silent()  # no snapshot yet: nothing to say
        st = await eventually(lambda: _status(redis, proxy, "CDS", "NOT SENT"), what="connected, NOT SENT")
        assert st["name"] == "late-1.shop"

        mesh = Mesh()
        mesh.clusters = {"late": [1234]}
        await write_snapshot(SnapshotStore(redis), proxy, 1, mesh)  # no NATS event: only the resync finds it
        resp = await c.recv(timeout=10)
        assert names(resp) == {"late"}
    finally:
        gw.stop()
        if c is not None:
            await c.close()
        if nc is not None:
            await nc.close()
        await redis.aclose()


async def test_delta_layered_diffs(stack):
    """Delta over layered snapshots: per-layer diffs are sent as one response; a resource that moves from the
    proxy's own layer to the shared one (same content) is neither removed nor resent."""
    from .test_xds_support import eds_cluster, publish

    store, nats_url = stack["store"], stack["nats"]
    proxy = node_id("proto-delta-layers")

    def layer(*names, timeout=None):
        out = {}
        for n in names:
            c = eds_cluster(n)
            if timeout and n == "c":
                c.connect_timeout.seconds = timeout
            out[n] = c.SerializeToString()
        return {CLUSTER: out}

    await store.put(proxy, 1, [layer("a", "b", "c"), layer("inbound")])
    c = AdsClient(stack["gw"].meta["port"], delta=True)
    try:
        await c.send(discovery_pb2.DeltaDiscoveryRequest(node=base_pb2.Node(id=proxy), type_url=CLUSTER))
        r1 = await c.recv()
        assert sorted(r.name for r in r1.resources) == ["a", "b", "c", "inbound"]
        await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, response_nonce=r1.nonce))

        await store.put(proxy, 2, [layer("b", "c", timeout=9), layer("inbound")])  # a removed, c changed
        await publish(nats_url, proxy)
        r2 = await c.recv()
        assert [r.name for r in r2.resources] == ["c"] and list(r2.removed_resources) == ["a"]
        assert cluster_pb2.Cluster.FromString(r2.resources[0].resource.value).connect_timeout.seconds == 9
        await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, response_nonce=r2.nonce))

        # inbound moves to the shared layer unchanged; d is new
        shared3 = {CLUSTER: {**layer("b", "inbound")[CLUSTER], **layer("c", timeout=9)[CLUSTER]}}
        await store.put(proxy, 3, [shared3, layer("d")])
        await publish(nats_url, proxy)
        r3 = await c.recv()
        assert [r.name for r in r3.resources] == ["d"] and list(r3.removed_resources) == []
    finally:
        await c.close()
