"""xds_gateway at scale, with real processes: workers sharing one port, and clients that never ACK or never
read not delaying anyone else's pushes."""

from __future__ import annotations

import asyncio
import time

import grpc
import redis.asyncio as aioredis
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from mizzen.services.mesh.proxystatus import load_statuses
from mizzen.services.mesh.stack import Stack
from mizzen.services.mesh.xds_types import CLUSTER, ENDPOINT, LISTENER

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


def mesh(n: int) -> list[dict]:
    objs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}]
    for i in range(n):
        objs += service_objects(f"s{i}", "a", i, pods=1)
    return objs


def test_two_workers_on_one_port_both_serve_streams(tmp_path):
    async def run(stack: Stack):
        apply(stack.registry_url, mesh(8))
        base = stack.http_ports["xds-gateway"]
        await eventually(lambda: _ready(base + 1), what="worker 1 ready")
        clients = [await new_client(stack.xds_port, node_id(f"s{i % 8}-0", "a", pod_ip(i % 8, 0))).start()
                   for i in range(16)]
        try:
            try:
                await eventually(lambda: all(len(c.versions) == 4 for c in clients), timeout=60,
                                 what="all clients synced")
            except AssertionError as e:
                raise AssertionError(f"{e}; unsynced: {_unsynced(clients)}") from None
            per_worker = []
            for port in (base, base + 1):
                m = metrics(port)
                per_worker.append(sum(v for k, v in m.items() if k.startswith("mizzen_xds_connected_proxies")))
            assert sum(per_worker) == 16 and all(n > 0 for n in per_worker), per_worker
            # status written by both workers is read in one place (the kernel's reader)
            r = aioredis.from_url(stack.redis_url)
            try:
                statuses = await eventually(lambda: _statuses(r, 8), what="statuses of 8 proxies")
            finally:
                await r.aclose()
            assert {e["istiod"].rsplit("-", 1)[-1] for e in statuses} <= {"w0", "w1"}
            # a live change reaches the streams of both workers
            apply(stack.registry_url, [endpoints_object("s3", "a", 3, [0], ["10.9.9.9"])])
            await eventually(lambda: all(b"10.9.9.9" in c.resources[ENDPOINT].get(
                "outbound|80||s3.a.svc.cluster.local", b"") for c in clients), what="every client sees the change")
        finally:
            for c in clients:
                await c.stop()

    with Stack(tmp_path) as stack:
        stack.start(services=("registry", "translator"))
        stack.start_service("xds-gateway", extra=["--workers", "2"])
        stack.wait_ready("xds-gateway")
        asyncio.run(run(stack))


def _unsynced(clients) -> list:
    return [(c.node_id, c.port, sorted(c.responses.items()), c.names, c.errors[-1:]) for c in clients
            if len(c.versions) != 4]


def _ready(port: int) -> bool:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz/ready", timeout=2) as resp:
        return resp.status == 200


async def _statuses(r, n: int):
    entries = await load_statuses(r)
    return entries if len({e["proxy"] for e in entries}) >= n and all(
        e["status"]["CDS"] == "SYNCED" for e in entries) else None


class StuckClient:
    """Opens an ADS stream, asks for clusters and listeners, and never reads: gRPC flow control then blocks
    the gateway's writes to it, like an Envoy whose event loop hangs."""

    def __init__(self, port: int, proxy: str):
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel).StreamAggregatedResources()
        self.proxy = proxy

    async def start(self) -> StuckClient:
        await self.call.write(discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=self.proxy), type_url=CLUSTER))
        await self.call.write(discovery_pb2.DiscoveryRequest(type_url=LISTENER))
        return self

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


def test_clients_that_never_ack_or_never_read_do_not_delay_others(tmp_path):
    async def run(stack: Stack):
        n = 1500  # CDS of a few hundred KiB: more than a stream's flow-control window
        apply(stack.registry_url, mesh(n))
        stuck = [await StuckClient(stack.xds_port, node_id(f"s{i}-0", "a", pod_ip(i, 0))).start() for i in range(4)]
        silent = [await new_client(stack.xds_port, node_id(f"s{i}-0", "a", pod_ip(i, 0)), ack=False).start()
                  for i in range(4, 6)]
        good = [await new_client(stack.xds_port, node_id(f"s{i}-0", "a", pod_ip(i, 0))).start() for i in range(6, 9)]
        try:
            await eventually(lambda: all(len(c.versions) == 4 for c in good), timeout=60, what="good clients synced")
            for round_ in range(3):
                name = f"late{round_}"
                t0 = time.monotonic()
                apply(stack.registry_url, service_objects(name, "a", n + round_, pods=1))
                cluster = f"outbound|80||{name}.a.svc.cluster.local"
                await eventually(lambda c=cluster: all(c in g.resources[CLUSTER] for g in good), timeout=30,
                                 what="good clients got the new cluster")
                took = time.monotonic() - t0
                assert took < 8, f"round {round_}: {took:.1f}s with stuck clients around"
            m = metrics(stack.http_ports["xds-gateway"])
            assert sum(v for k, v in m.items() if k.startswith("mizzen_xds_connected_proxies")) == 9
        finally:
            for c in good + silent:
                await c.stop()
            for s in stuck:
                await s.close()

    with Stack(tmp_path) as stack:
        stack.start(services=("registry", "translator"))
        stack.start_service("xds-gateway", extra=["--push-slots", "2", "--slot-lease", "0.5"])
        asyncio.run(run(stack))
