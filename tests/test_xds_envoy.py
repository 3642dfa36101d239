"""xds_gateway against a real Envoy: config arrives, traffic follows live updates, NACKs keep the last good
config and show in proxy-status; for both SotW (GRPC) and delta (DELTA_GRPC) ADS."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from mizzen.services.mesh import procs
from mizzen.services.mesh.snapstore import SnapshotStore
from mizzen.services.xds_gateway.status import load_statuses

from .test_xds_proxy_status import run_cli
from .test_xds_support import (
    Mesh,
    Upstream,
    bad_listener,
    config_dump,
    dump_section,
    dynamic_clusters,
    dynamic_listeners,
    dynamic_routes,
    endpoint_ports,
    eventually,
    get_async,
    node_id,
    rejected_listeners,
    start_envoy,
    start_gateway,
    write_snapshot,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def upstreams():
    ups = {name: Upstream(name) for name in ("alpha", "beta")}
    try:
        yield ups
    finally:
        for u in ups.values():
            u.close()


async def _statuses(redis) -> dict[str, dict]:
    return {s["proxy"]: s for s in await load_statuses(redis)}


@pytest.mark.parametrize("api", ["sotw", "delta"])
async def test_envoy_gets_config_and_follows_updates(api, tmp_path, nats_server, redis_server, upstreams):
    nats_url, redis_url = nats_server.meta["url"], redis_server.meta["url"]
    redis = aioredis.from_url(redis_url)
    store = SnapshotStore(redis)
    proxy = node_id("app-1")
    listen = procs.free_port()
    alpha, beta = upstreams["alpha"], upstreams["beta"]

    mesh = Mesh()
    mesh.clusters["svc"] = [alpha.port]
    mesh.listeners["http"] = (listen, "web")
    mesh.routes["web"] = [("/", "svc")]
    await write_snapshot(store, proxy, 1, mesh)  # before anything runs: the gateway must read it from Redis

    gw = start_gateway(tmp_path, nats_url, redis_url, replica="gw-a")
    envoy = None
    try:
        envoy = start_envoy(tmp_path, proxy, gw.meta["port"], delta=(api == "delta"))
        admin = envoy.meta["admin"]

        # config_dump holds what was stored, and traffic reaches the upstream EDS chose
        await eventually(lambda: _body_is(listen, "/", "alpha"), what="traffic to alpha")
        assert set(dynamic_clusters(admin)) == {"svc"}
        assert set(dynamic_listeners(admin)) == {"http"}
        assert set(dynamic_routes(admin)) == {"web"}
        assert endpoint_ports(admin) == {"svc": [alpha.port]}

        st = await eventually(lambda: _synced(redis, proxy), what="SYNCED status")
        assert st["istiod"] == "gw-a" and st["name"] == "app-1.default" and st["version"] == "1.7.0"
        assert st["api"] == api

        # a new endpoint: EDS moves traffic to beta without a restart
        mesh.clusters["svc"] = [beta.port]
        await write_snapshot(store, proxy, 2, mesh, nats_url)
        await eventually(lambda: _body_is(listen, "/", "beta"), what="traffic to beta")
        assert endpoint_ports(admin) == {"svc": [beta.port]}

        # a new service: cluster + route, reachable at once; the old one keeps working
        mesh.clusters["other"] = [alpha.port]
        mesh.routes["web"] = [("/other", "other"), ("/", "svc")]
        await write_snapshot(store, proxy, 3, mesh, nats_url)
        await eventually(lambda: _body_is(listen, "/other", "alpha"), what="new service reachable")
        assert (await get_async(listen, "/"))[1] == "beta"
        assert set(dynamic_clusters(admin)) == {"svc", "other"}

        # a removal: the route goes first, then the cluster (make before break)
        del mesh.clusters["other"]
        mesh.routes["web"] = [("/", "svc")]
        await write_snapshot(store, proxy, 4, mesh, nats_url)
        await eventually(lambda: "other" not in dynamic_clusters(admin), what="cluster removed")
        assert (await get_async(listen, "/other"))[1] == "beta"  # now matched by "/" → svc
        assert set(dynamic_clusters(admin)) == {"svc"}
        await eventually(lambda: _synced(redis, proxy), what="SYNCED after removal")

        # a config Envoy rejects: NACKed, recorded, and the last good config keeps serving
        mesh.extra_listeners["broken"] = bad_listener("broken", procs.free_port())
        await write_snapshot(store, proxy, 5, mesh, nats_url)
        st = await eventually(lambda: _state(redis, proxy, "LDS", "NACKed"), what="LDS NACKed")
        assert "broken" in st["errors"]["LDS"] and "StatPrefix" in st["errors"]["LDS"], st["errors"]
        assert st["status"]["CDS"] == "SYNCED"
        out = await asyncio.to_thread(run_cli, "--redis-url", redis_url)
        assert out.returncode == 0, out.stderr
        header, row = out.stdout.splitlines()
        assert header.split() == ["NAME", "CDS", "LDS", "EDS", "RDS", "ISTIOD", "VERSION"]
        assert row.split() == ["app-1.default", "SYNCED", "NACKed", "SYNCED", "SYNCED", "gw-a", "1.7.0"]
        for _ in range(20):
            assert await get_async(listen, "/") == (200, "beta")
        assert set(dynamic_listeners(admin)) == {"http"}
        assert any("StatPrefix" in e.get("details", "") for e in rejected_listeners(admin))

        # fixing the snapshot clears the NACK
        del mesh.extra_listeners["broken"]
        mesh.clusters["svc"] = [alpha.port]
        await write_snapshot(store, proxy, 6, mesh, nats_url)
        await eventually(lambda: _body_is(listen, "/", "alpha"), what="traffic after fix")
        await eventually(lambda: _synced(redis, proxy), what="SYNCED after fix")
    finally:
        if envoy is not None:
            envoy.stop()
        gw.stop()
        await redis.aclose()
    assert gw.popen.returncode == 0, gw.log_text()[-2000:]


async def _body_is(port: int, path: str, body: str) -> bool:
    status, text = await get_async(port, path)
    return status == 200 and text == body


async def _status_is(port: int, status: int) -> bool:
    return (await get_async(port, "/"))[0] == status


async def _synced(redis, proxy: str) -> dict | None:
    st = (await _statuses(redis)).get(proxy)
    if st and all(v == "SYNCED" for v in st["status"].values()):
        return st
    return None


async def _state(redis, proxy: str, short: str, want: str) -> dict | None:
    st = (await _statuses(redis)).get(proxy)
    return st if st and st["status"][short] == want else None


@pytest.mark.parametrize("api", ["sotw", "delta"])
async def test_repointing_routes_to_new_clusters_drops_no_request(api, tmp_path, nats_server, redis_server,
                                                                   upstreams):
    """Make before break with live traffic: each snapshot moves the route to a brand-new cluster and deletes
    the old one at the same time. Envoy must get the new cluster before the route and lose the old one only
    after the route stopped using it, so a request loop running through ten such swaps never fails."""
    from .test_xds_restart import RequestLoop

    nats_url, redis_url = nats_server.meta["url"], redis_server.meta["url"]
    redis = aioredis.from_url(redis_url)
    store = SnapshotStore(redis)
    proxy = node_id("swap-1")
    listen = procs.free_port()
    alpha = upstreams["alpha"]
    mesh = Mesh()
    mesh.clusters = {"gen-0": [alpha.port]}
    mesh.listeners["http"] = (listen, "web")
    mesh.routes["web"] = [("/", "gen-0")]
    await write_snapshot(store, proxy, 1, mesh)
    gw = start_gateway(tmp_path, nats_url, redis_url, replica="gw-swap")
    envoy = None
    try:
        envoy = start_envoy(tmp_path, proxy, gw.meta["port"], delta=(api == "delta"))
        admin = envoy.meta["admin"]
        await eventually(lambda: _body_is(listen, "/", "alpha"), what="traffic")
        loop = RequestLoop(listen, count=400, gap=0.005)
        loop.start()
        for gen in range(1, 11):
            mesh.clusters = {f"gen-{gen}": [alpha.port]}
            mesh.routes["web"] = [("/", f"gen-{gen}")]
            await write_snapshot(store, proxy, gen + 1, mesh, nats_url)
            await eventually(lambda g=gen: set(dynamic_clusters(admin)) == {f"gen-{g}"},
                             what=f"generation {gen} alone in CDS")
        await asyncio.to_thread(loop.join, 30)
        assert not loop.is_alive()
        assert loop.failures == [], f"{len(loop.failures)} failed: {loop.failures[:5]}"
        assert dynamic_routes(admin)["web"]["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"] \
            == "gen-10"
        await eventually(lambda: _synced(redis, proxy), what="SYNCED")
    finally:
        if envoy is not None:
            envoy.stop()
        gw.stop()
        await redis.aclose()


def _warming(admin: int) -> list[str]:
    sec = dump_section(config_dump(admin), "ClustersConfigDump")
    return [c["cluster"]["name"] for c in sec.get("dynamic_warming_clusters", [])]


@pytest.mark.parametrize("api", ["sotw", "delta"])
async def test_a_changed_cluster_becomes_active_and_its_behaviour_applies(api, tmp_path, nats_server, redis_server,
                                                                          upstreams):
    """Envoy warms a replaced EDS cluster until it gets its endpoints, and asks for none (its EDS names did not
    change): the gateway must send them again, or the new version never activates and the old one keeps
    serving while config_dump shows the new one warming. Proven by traffic: the new version health-checks the
    upstream for a status it never answers, so once active Envoy has no healthy host and answers 503."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.core.v3 import health_check_pb2
    from envoy.type.v3 import percent_pb2, range_pb2
    from google.protobuf import duration_pb2, wrappers_pb2

    nats_url, redis_url = nats_server.meta["url"], redis_server.meta["url"]
    redis = aioredis.from_url(redis_url)
    store = SnapshotStore(redis)
    proxy = node_id("app-warm")
    listen = procs.free_port()
    mesh = Mesh()
    mesh.clusters["svc"] = [upstreams["alpha"].port]
    mesh.listeners["http"] = (listen, "web")
    mesh.routes["web"] = [("/", "svc")]
    # as the translator makes EDS clusters (istiod too): no initial-fetch timeout, so nothing but the gateway's
    # EDS response can finish warming a replaced cluster
    no_timeout = cluster_pb2.Cluster()
    no_timeout.eds_cluster_config.eds_config.initial_fetch_timeout.SetInParent()
    mesh.cluster_merges["svc"] = no_timeout
    await write_snapshot(store, proxy, 1, mesh)
    gw = start_gateway(tmp_path, nats_url, redis_url)
    envoy = None
    try:
        envoy = start_envoy(tmp_path, proxy, gw.meta["port"], delta=(api == "delta"))
        admin = envoy.meta["admin"]
        await eventually(lambda: _body_is(listen, "/", "alpha"), what="traffic to alpha")

        hc = health_check_pb2.HealthCheck(
            timeout=duration_pb2.Duration(seconds=1), interval=duration_pb2.Duration(nanos=200_000_000),
            unhealthy_threshold=wrappers_pb2.UInt32Value(value=1), healthy_threshold=wrappers_pb2.UInt32Value(value=1),
            http_health_check=health_check_pb2.HealthCheck.HttpHealthCheck(
                path="/healthz", expected_statuses=[range_pb2.Int64Range(start=500, end=501)]))
        merge = cluster_pb2.Cluster(health_checks=[hc])
        merge.MergeFrom(no_timeout)
        merge.common_lb_config.healthy_panic_threshold.CopyFrom(percent_pb2.Percent(value=0))
        mesh.cluster_merges["svc"] = merge
        await write_snapshot(store, proxy, 2, mesh, nats_url)
        await eventually(lambda: "health_checks" in dynamic_clusters(admin).get("svc", {}).get("cluster", {}),
                         timeout=10, what="the changed cluster active")
        assert _warming(admin) == []
        await eventually(lambda: _status_is(listen, 503), timeout=10, what="503: no healthy upstream")

        # and back: the plain cluster replaces it again, traffic flows
        mesh.cluster_merges["svc"] = no_timeout
        await write_snapshot(store, proxy, 3, mesh, nats_url)
        await eventually(lambda: _body_is(listen, "/", "alpha"), timeout=10, what="traffic to alpha again")
        assert _warming(admin) == []
    finally:
        if envoy is not None:
            envoy.stop()
        gw.stop()
        await redis.aclose()
