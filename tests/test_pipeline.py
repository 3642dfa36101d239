"""Registry → translator → Redis snapshots, as real processes against real NATS and Redis."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import nats
import orjson
import pytest
import redis.asyncio as aioredis

from mizzen.services.cli.http import request
from mizzen.services.mesh.snapstore import SnapshotStore
from mizzen.services.mesh.stack import Stack
from mizzen.services.mesh.xds_types import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.conftest import SEED_MESH

WEBSERVERV1 = "sidecar~10.200.0.135~webserverv1-84596579c6-xxvhd.default~default.svc.cluster.local"


@pytest.fixture
def stack(control_plane):
    return control_plane


def apply(stack: Stack, path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mizzen", "apply", "-f", str(path), "--server", stack.registry_url],
                          capture_output=True, text=True, timeout=60)


async def snapshot_digest(url: str) -> dict[str, dict]:
    """Every stored snapshot: proxy → (revision-independent) type versions and resource hashes."""
    r = aioredis.from_url(url)
    store = SnapshotStore(r)
    out = {}
    for p in await store.proxies():
        snap = await store.load(p)
        out[p] = {"versions": snap.manifest.versions, "index": snap.index}
    await r.aclose()
    return out


async def wait_snapshot_revision(url: str, proxy: str, revision: int, timeout: float = 30.0):
    r = aioredis.from_url(url)
    store = SnapshotStore(r)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            m = await store.manifest(proxy)
            if m is not None and m.revision >= revision:
                return m
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no snapshot at revision {revision} for {proxy}")
    finally:
        await r.aclose()


def wait_translated(stack: Stack, revision: int, timeout: float = 30.0) -> None:
    """Wait until the translator has stored every snapshot of `revision` (its metric moves after the last one)."""
    import urllib.request

    url = f"http://127.0.0.1:{stack.http_ports['translator']}/metrics"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("mizzen_translator_revision ") and float(line.split()[1]) >= revision:
                    return
        time.sleep(0.05)
    raise TimeoutError(f"translator did not reach revision {revision}")


def test_apply_builds_stores_and_announces_snapshots(stack):
    async def run():
        nc = await nats.connect(stack.nats_url)
        sub = await nc.subscribe("mizzen.snapshot.>")
        await nc.flush()  # the SUB reaches the server now: apply() blocks this loop, and the announcement may come first
        r = apply(stack, SEED_MESH)
        assert r.returncode == 0, r.stderr
        rev = request("GET", stack.registry_url + "/version")["revision"]
        m = await wait_snapshot_revision(stack.redis_url, WEBSERVERV1, rev)
        subjects = set()
        deadline = time.monotonic() + 10
        while WEBSERVERV1 not in {s.removeprefix("mizzen.snapshot.") for s in subjects} and time.monotonic() < deadline:
            msg = await sub.next_msg(timeout=10)
            subjects.add(msg.subject)
            if msg.subject == "mizzen.snapshot." + WEBSERVERV1:
                assert orjson.loads(msg.data)["version"] == m.version
        await nc.close()
        assert "mizzen.snapshot." + WEBSERVERV1 in subjects
        r = aioredis.from_url(stack.redis_url)
        msgs = await SnapshotStore(r).load_messages(WEBSERVERV1)
        await r.aclose()
        return msgs

    msgs = asyncio.run(run())
    assert "outbound|80|v1|webserver.default.svc.cluster.local" in msgs[CLUSTER]
    assert "outbound|80|v1|webserver.default.svc.cluster.local" in msgs[ENDPOINT]
    assert {"virtualOutbound", "virtualInbound", "0.0.0.0_80", "10.200.1.132_80"} <= set(msgs[LISTENER])
    assert {"80", "proxy.default.svc.cluster.local:80"} <= set(msgs[ROUTE])


def test_invalid_apply_changes_no_snapshot(stack, tmp_path):
    assert apply(stack, SEED_MESH).returncode == 0
    rev = request("GET", stack.registry_url + "/version")["revision"]
    wait_translated(stack, rev)
    before = asyncio.run(snapshot_digest(stack.redis_url))
    bad = tmp_path / "bad.yaml"
    bad.write_text("""apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: webserver, namespace: default}
spec:
  host: webserver
  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 10}}}
""")
    r = apply(stack, bad)
    assert r.returncode == 1
    assert "DestinationRule default/webserver: spec.trafficPolicy.connectionPool.tcp.connectTimeout" in r.stderr
    assert request("GET", stack.registry_url + "/version")["revision"] == rev
    time.sleep(0.5)
    assert asyncio.run(snapshot_digest(stack.redis_url)) == before


def test_restarts_lose_nothing_and_rebuild_the_same(stack, tmp_path):
    assert apply(stack, SEED_MESH).returncode == 0
    rev = request("GET", stack.registry_url + "/version")["revision"]
    wait_translated(stack, rev)
    before = asyncio.run(snapshot_digest(stack.redis_url))
    # translator killed and started again: rebuilds from Redis, same content
    stack.restart_service("translator")
    wait_translated(stack, rev)
    assert asyncio.run(snapshot_digest(stack.redis_url)) == before
    # a change made while the translator is down is picked up when it comes back
    stack.stop_service("translator", kill=True)
    extra = tmp_path / "extra.yaml"
    extra.write_text("""apiVersion: v1
kind: Service
metadata: {name: late, namespace: default}
spec:
  clusterIP: 10.200.1.250
  ports: [{name: http, port: 8080, targetPort: 8080}]
""")
    assert apply(stack, extra).returncode == 0
    rev2 = request("GET", stack.registry_url + "/version")["revision"]
    stack.start_service("translator")
    asyncio.run(wait_snapshot_revision(stack.redis_url, WEBSERVERV1, rev2))
    after = asyncio.run(snapshot_digest(stack.redis_url))
    assert "outbound|8080||late.default.svc.cluster.local" in after[WEBSERVERV1]["index"][CLUSTER]
    # registry killed: state is still there and served
    stack.restart_service("registry")
    assert request("GET", stack.registry_url + "/api/v1/namespaces/default/services/late")["metadata"]["name"] == "late"
    # NATS restarted: the services reconnect and the next apply flows through
    stack.restart_infra("nats")
    extra.write_text(extra.read_text().replace("late", "later").replace("10.200.1.250", "10.200.1.251"))
    deadline = time.monotonic() + 20
    while apply(stack, extra).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    rev3 = request("GET", stack.registry_url + "/version")["revision"]
    asyncio.run(wait_snapshot_revision(stack.redis_url, WEBSERVERV1, rev3))
    # Redis restarted (AOF): nothing lost, snapshots still readable
    stack.restart_infra("redis")
    final = asyncio.run(snapshot_digest(stack.redis_url))
    assert "outbound|8080||later.default.svc.cluster.local" in final[WEBSERVERV1]["index"][CLUSTER]


def test_connected_proxy_metadata_shapes_its_snapshot(stack, tmp_path):
    """A proxy's bootstrap metadata (here the access-log path) reaches the listeners built for it."""
    from envoy.extensions.access_loggers.file.v3 import file_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

    assert apply(stack, SEED_MESH).returncode == 0
    rev = request("GET", stack.registry_url + "/version")["revision"]
    wait_translated(stack, rev)
    log_path = str(tmp_path / "access.log")

    def access_log_paths(msgs) -> set[str]:
        paths = set()
        for lst in msgs[LISTENER].values():
            for fc in lst.filter_chains:
                for f in fc.filters:
                    if f.typed_config.type_url.endswith("HttpConnectionManager"):
                        m = hcm.HttpConnectionManager.FromString(f.typed_config.value)
                        for al in m.access_log:
                            paths.add(file_pb2.FileAccessLog.FromString(al.typed_config.value).path)
        return paths

    async def run():
        r = aioredis.from_url(stack.redis_url)
        store = SnapshotStore(r)
        before = access_log_paths(await store.load_messages(WEBSERVERV1))
        await r.set("proxynode:" + WEBSERVERV1, orjson.dumps({"id": WEBSERVERV1, "metadata": {"ACCESS_LOG_FILE": log_path}}))
        await r.sadd("proxies:connected", WEBSERVERV1)
        nc = await nats.connect(stack.nats_url)
        await nc.publish("mizzen.proxy.connected", orjson.dumps({"proxy": WEBSERVERV1}))
        await nc.flush()
        await nc.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            after = access_log_paths(await store.load_messages(WEBSERVERV1))
            if log_path in after:
                break
            await asyncio.sleep(0.1)
        await r.aclose()
        return before, after

    before, after = asyncio.run(run())
    assert before == {"/dev/stdout"}
    assert after == {log_path}


def test_translator_sweeps_snapshot_data_no_proxy_uses(tmp_path):
    """Layers and resources of replaced snapshots are deleted after two sweeps; live snapshots stay whole."""
    s = Stack(tmp_path)
    try:
        s.start_infra()
        s.start_service("registry")
        s.start_service("translator", extra=["--gc-interval", "0.5"])
        assert apply(s, SEED_MESH).returncode == 0
        wait_translated(s, request("GET", s.registry_url + "/version")["revision"])
        first = asyncio.run(snapshot_digest(s.redis_url))[WEBSERVERV1]
        extra = tmp_path / "dr.yaml"
        extra.write_text("""apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: proxy, namespace: default}
spec:
  host: proxy
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 7}}}
""")
        assert apply(s, extra).returncode == 0
        wait_translated(s, request("GET", s.registry_url + "/version")["revision"])
        old_cluster = first["index"][CLUSTER]["outbound|80||proxy.default.svc.cluster.local"]

        async def swept() -> bool:
            r = aioredis.from_url(s.redis_url)
            deadline = time.monotonic() + 20
            try:
                while time.monotonic() < deadline:
                    if not await r.exists("snapres:" + old_cluster):
                        return True
                    await asyncio.sleep(0.2)
                return False
            finally:
                await r.aclose()

        assert asyncio.run(swept()), "the replaced cluster's bytes were never collected"

        async def load_all() -> int:
            r = aioredis.from_url(s.redis_url)
            store = SnapshotStore(r)
            n = 0
            for p in await store.proxies():
                msgs = await store.load_messages(p)  # raises if anything it names was collected
                n += sum(len(v) for v in msgs.values())
            await r.aclose()
            return n

        assert asyncio.run(load_all()) > 0
    finally:
        s.stop()
