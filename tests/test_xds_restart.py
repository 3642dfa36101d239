"""Kill the xds_gateway (SIGKILL) while a real Envoy is connected and start another replica on the same port:
Envoy reconnects and resyncs, and a request loop running through it all never fails."""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest
import redis.asyncio as aioredis

from mizzen.services.mesh import procs
from mizzen.services.mesh.snapstore import SnapshotStore
from mizzen.services.xds_gateway.status import load_statuses

from .test_xds_support import (
    Mesh,
    Upstream,
    eventually,
    get_async,
    http_get,
    node_id,
    start_envoy,
    start_gateway,
    write_snapshot,
)

pytestmark = pytest.mark.slow


def metric(http_port: int, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


class RequestLoop(threading.Thread):
    """A bounded request loop: `count` GETs, `gap` seconds apart, recording every failure."""

    def __init__(self, port: int, count: int = 200, gap: float = 0.02):
        super().__init__(daemon=True)
        self.port, self.count, self.gap = port, count, gap
        self.ok = 0
        self.failures: list[tuple[int, str]] = []

    def run(self) -> None:
        for _ in range(self.count):
            status, body = http_get(self.port, "/", timeout=2)
            if status == 200 and body == "alpha":
                self.ok += 1
            else:
                self.failures.append((status, body[:200]))
            time.sleep(self.gap)


@pytest.mark.parametrize("api", ["sotw", "delta"])
async def test_gateway_killed_and_replaced_traffic_never_fails(api, tmp_path, nats_server, redis_server):
    nats_url, redis_url = nats_server.meta["url"], redis_server.meta["url"]
    redis = aioredis.from_url(redis_url)
    store = SnapshotStore(redis)
    proxy = node_id("restart-1")
    listen = procs.free_port()
    alpha, beta = Upstream("alpha"), Upstream("beta")
    mesh = Mesh()
    for i in range(5):  # a few clusters, so "nothing resent" on delta reconnect means something
        mesh.clusters[f"svc-{i}"] = [alpha.port]
    mesh.listeners["http"] = (listen, "web")
    mesh.routes["web"] = [("/", "svc-0")]
    await write_snapshot(store, proxy, 1, mesh)

    port = procs.free_port()
    first = start_gateway(tmp_path, nats_url, redis_url, port=port, replica="gw-first")
    second = envoy = None
    try:
        envoy = start_envoy(tmp_path, proxy, port, delta=(api == "delta"))
        await eventually(lambda: http_get(listen)[1] == "alpha", what="traffic through envoy")
        await eventually(lambda: _owner(redis, proxy, "gw-first"), what="status from first replica")

        loop = RequestLoop(listen)
        loop.start()
        time.sleep(0.5)
        first.kill()  # SIGKILL: no goodbye, Envoy sees the stream break
        second = start_gateway(tmp_path, nats_url, redis_url, port=port, replica="gw-second")
        st = await eventually(lambda: _owner(redis, proxy, "gw-second"), timeout=30,
                              what="envoy reconnected to the second replica and SYNCED")
        loop.join(timeout=30)
        assert not loop.is_alive()
        assert loop.failures == [], f"{len(loop.failures)} failed requests: {loop.failures[:5]}"
        assert loop.ok == loop.count
        assert set(st["status"].values()) == {"SYNCED"}

        if api == "delta":
            # initial_resource_versions: the new replica re-sent nothing Envoy already had
            assert metric(second.meta["http_port"], "mizzen_xds_resources_sent_total", 'type="CDS"') == 0
            assert metric(second.meta["http_port"], "mizzen_xds_resources_sent_total", 'type="EDS"') == 0
        else:
            # state of the world: the full set again (Envoy sees identical content and keeps its clusters)
            assert metric(second.meta["http_port"], "mizzen_xds_resources_sent_total", 'type="CDS"') == 5

        # the new replica serves live updates too
        mesh.clusters["svc-0"] = [beta.port]
        await write_snapshot(store, proxy, 2, mesh, nats_url)
        await eventually(lambda: _body(listen, "beta"), what="update through the second replica")
    finally:
        if envoy is not None:
            envoy.stop()
        for g in (first, second):
            if g is not None:
                g.stop()
        alpha.close()
        beta.close()
        await redis.aclose()


async def _body(port: int, want: str) -> bool:
    return (await get_async(port, "/"))[1] == want


async def _owner(redis, proxy: str, replica: str) -> dict | None:
    for s in await load_statuses(redis):
        if s["proxy"] == proxy and s["istiod"] == replica and set(s["status"].values()) == {"SYNCED"}:
            return s
    return None
