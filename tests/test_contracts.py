"""Mizzen's own wire contracts (proto/mizzen/v1/events.proto) match what the services really send: the proto is
compiled here and every payload, taken from the real producers, must parse strictly (unknown fields fail)."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import nats
import orjson
import pytest
import redis.asyncio as aioredis
from google.protobuf import json_format

from mizzen.services.mesh.stack import Stack
from tests.conftest import SEED_MESH

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def events_pb2(tmp_path_factory):
    import grpc_tools
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("proto")
    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={out}",
                      str(ROOT / "proto/mizzen/v1/events.proto")])
    assert rc == 0
    # loaded by path: `mizzen` is also this project's command package
    spec = importlib.util.spec_from_file_location("mizzen_events_pb2", out / "mizzen/v1/events_pb2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def strict(message_cls, payload: bytes):
    return json_format.Parse(payload, message_cls(), ignore_unknown_fields=False)


def test_events_and_manifest_follow_the_proto(events_pb2, tmp_path):
    stack = Stack(tmp_path)
    try:
        stack.start(services=("registry", "translator", "xds-gateway"))

        async def run():
            nc = await nats.connect(stack.nats_url)
            config = await nc.subscribe("mizzen.config.changed")
            snaps = await nc.subscribe("mizzen.snapshot.>")
            await nc.flush()  # the subscriptions are registered before anything is published
            r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "mizzen", "apply", "-f", str(SEED_MESH),
                                                         "--server", stack.registry_url],
                                        capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            changed = strict(events_pb2.ConfigChanged, (await config.next_msg(timeout=10)).data)
            snap_msg = await snaps.next_msg(timeout=20)
            snapshot = strict(events_pb2.SnapshotChanged, snap_msg.data)
            proxy = snap_msg.subject.removeprefix("mizzen.snapshot.")
            # a proxy connecting: the gateway announces it and stores its node
            connected = await nc.subscribe("mizzen.proxy.connected")
            await nc.flush()
            import grpc
            from envoy.config.core.v3 import base_pb2
            from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

            node = base_pb2.Node(id=proxy, cluster="webserverv1.default")
            node.metadata.update({"ACCESS_LOG_FILE": "/dev/stdout", "LABELS": {"app": "webserver"}})
            async with grpc.aio.insecure_channel(stack.xds_address) as ch:
                call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources()
                await call.write(discovery_pb2.DiscoveryRequest(
                    node=node, type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster"))
                await call.read()
                announced = strict(events_pb2.ProxyConnected, (await connected.next_msg(timeout=10)).data)
                call.cancel()
            await nc.close()
            rr = aioredis.from_url(stack.redis_url)
            deadline = time.monotonic() + 10
            node_doc = None
            while node_doc is None and time.monotonic() < deadline:
                node_doc = await rr.get("proxynode:" + proxy)
                await asyncio.sleep(0.05)
            manifest = await rr.get("snapshot:" + proxy)
            await rr.aclose()
            return changed, snapshot, announced, strict(events_pb2.NodeInfo, node_doc), \
                strict(events_pb2.SnapshotManifest, manifest)

        changed, snapshot, announced, node_info, manifest = asyncio.run(run())
        assert changed.revision == 1 and "Service/default/webserver" in changed.keys
        assert snapshot.revision == 1 and snapshot.version.startswith("1-")
        assert announced.node.metadata["ACCESS_LOG_FILE"] == "/dev/stdout"
        assert node_info.id == announced.proxy and node_info.replica == announced.replica
        assert manifest.layers and set(manifest.versions) == {
            "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "type.googleapis.com/envoy.config.listener.v3.Listener",
            "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"}
    finally:
        stack.stop()


def test_payload_with_an_unknown_field_is_refused(events_pb2):
    with pytest.raises(json_format.ParseError):
        strict(events_pb2.ConfigChanged, orjson.dumps({"revision": 1, "keys": [], "extra": 1}))
