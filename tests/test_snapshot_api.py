"""mizzen.v1.SnapshotService against a real control plane (NATS, Redis, registry, translator, xds_gateway as
processes): a subscriber gets each new version in order after each `mizzen apply`, resumes from since_version
after the gateway is killed and restarted, and `mizzen watch` prints the versions as they arrive."""

from __future__ import annotations

import asyncio
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import orjson
import pytest
import redis.asyncio as aioredis
from envoy.config.cluster.v3 import cluster_pb2

from mizzen.services.cli import watch as watch_cli
from mizzen.services.mesh.snapstore import SnapshotStore
from mizzen.services.mesh.stack import Stack
from mizzen.services.mesh.xds_types import CLUSTER, ROUTE

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NODE = "sidecar~10.77.0.5~app-1.shop~shop.svc.cluster.local"

BASE = """
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: app-1, namespace: shop, labels: {app: app}}
spec: {serviceAccountName: default, containers: [{name: app, image: app}]}
status: {podIP: 10.77.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: app, namespace: shop}
spec:
  selector: {app: app}
  ports: [{name: http, port: 8080, protocol: TCP}]
"""

CHANGES = [
    """
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  selector: {app: cart}
  ports: [{name: http, port: 9090, protocol: TCP}]
""",
    """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: cart, namespace: shop}
spec:
  hosts: [cart]
  http: [{timeout: 3s, route: [{destination: {host: cart}}]}]
""",
    """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: cart, namespace: shop}
spec:
  hosts: [cart]
  http: [{timeout: 7s, route: [{destination: {host: cart}}]}]
""",
]


def apply(stack: Stack, tmp_path: Path, text: str) -> None:
    f = tmp_path / f"doc-{time.monotonic_ns()}.yaml"
    f.write_text(text)
    r = subprocess.run([sys.executable, "-m", "mizzen", "apply", "-f", str(f), "--server", stack.registry_url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def registry_revision(stack: Stack) -> int:
    async def run() -> int:
        r = aioredis.from_url(stack.redis_url)
        try:
            from mizzen.services.mesh.store import ConfigStore

            return await ConfigStore(r).revision()
        finally:
            await r.aclose()

    return asyncio.run(run())


def settled_manifest(stack: Stack, timeout: float = 60.0, node: str = NODE):
    """The proxy's manifest once the translator has built the registry's current revision."""
    rev = registry_revision(stack)

    async def run():
        r = aioredis.from_url(stack.redis_url)
        store = SnapshotStore(r)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                m = await store.manifest(node)
                if m is not None and m.revision >= rev:
                    return m
                await asyncio.sleep(0.05)
        finally:
            await r.aclose()
        raise TimeoutError(f"no snapshot of {node} at revision {rev}")

    return asyncio.run(run())


class Subscriber:
    """watch() in a thread, its snapshots in a queue, so the test can wait with a timeout."""

    def __init__(self, target: str, proxy: str, since: str = "", namespace: str = ""):
        self.q: queue.Queue = queue.Queue()
        self.reconnects = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(target, proxy, since, namespace), daemon=True)
        self.thread.start()

    def _run(self, target: str, proxy: str, since: str, namespace: str) -> None:
        def on_reconnect(_e) -> None:
            self.reconnects += 1

        try:
            for snap in watch_cli.watch(target, proxy, since=since, on_reconnect=on_reconnect, namespace=namespace):
                self.q.put(snap)
                if self.stop.is_set():
                    return
        except Exception as e:  # noqa: BLE001 - reported to the test through the queue
            self.q.put(e)

    def next(self, timeout: float = 60.0):
        item = self.q.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        return item

    def until(self, version: str, timeout: float = 60.0) -> list:
        got = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = self.next(timeout=max(0.1, deadline - time.monotonic()))
            got.append(snap)
            if snap.version == version:
                return got
        raise TimeoutError(f"version {version} not received; got {[s.version for s in got]}")


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    try:
        s.start(services=("registry", "translator", "xds-gateway"))
        yield s
    finally:
        s.stop()


def test_each_apply_reaches_the_subscriber_in_order_and_watch_resumes(stack, tmp_path):
    apply(stack, tmp_path, BASE)
    first = settled_manifest(stack)
    sub = Subscriber(stack.xds_address, "app-1.shop")  # resolved from <pod>.<ns>
    try:
        snap = sub.next()
        assert snap.proxy == NODE and snap.version == first.version and snap.revision == first.revision
        assert set(snap.changed_types) == set(first.versions)  # the first message: everything is new
        assert dict(snap.type_versions) == first.versions
        clusters = [r for r in snap.resources if r.type_url == CLUSTER]
        assert snap.counts[CLUSTER] == len(clusters) > 0
        names = {cluster_pb2.Cluster.FromString(r.resource.value).name for r in clusters}
        assert "outbound|8080||app.shop.svc.cluster.local" in names
        assert all(r.size == len(r.resource.value) and r.hash for r in snap.resources)

        received = [snap]
        expected = [first.version]
        for doc in CHANGES:
            apply(stack, tmp_path, doc)
            m = settled_manifest(stack)
            expected.append(m.version)
            got = sub.until(m.version)
            received += got
            assert dict(got[-1].type_versions) == m.versions
        revisions = [s.revision for s in received]
        assert revisions == sorted(revisions) and len(set(s.version for s in received)) == len(received)
        assert expected == [s.version for s in received if s.version in expected]  # every one, in order
        # what changed: the new Service adds clusters; the VirtualService edits change routes only
        by_version = {s.version: s for s in received}
        assert CLUSTER in by_version[expected[1]].changed_types
        assert list(by_version[expected[3]].changed_types) == [ROUTE]

        # the gateway dies; a change lands while it is down; the subscriber reconnects and resumes
        last = received[-1].version
        stack.stop_service("xds-gateway", kill=True)
        apply(stack, tmp_path, CHANGES[1])  # back to timeout 3s: new content, new version
        m = settled_manifest(stack)
        assert m.version != last
        stack.start_service("xds-gateway")
        resumed = sub.until(m.version, timeout=90)
        assert [s.version for s in resumed] == [m.version]  # nothing re-sent, nothing skipped
        assert sub.reconnects >= 1
        assert set(resumed[0].changed_types) == set(m.versions)  # a new call: all types reported
    finally:
        sub.stop.set()

    # a new subscriber that already has the current version gets nothing until the next change
    sub2 = Subscriber(stack.xds_address, NODE, since=m.version)
    try:
        with pytest.raises(queue.Empty):
            sub2.next(timeout=2.0)
        apply(stack, tmp_path, CHANGES[2])
        m2 = settled_manifest(stack)
        assert sub2.next().version == m2.version
    finally:
        sub2.stop.set()


def test_get_and_errors(stack, tmp_path):
    apply(stack, tmp_path, BASE)
    m = settled_manifest(stack)
    snap = watch_cli.get(stack.xds_address, "app-1.shop", types=["CDS"], names_only=True)
    assert snap.version == m.version and snap.counts[CLUSTER] > 0
    assert {r.type_url for r in snap.resources} == {CLUSTER}
    assert all(not r.HasField("resource") and r.size > 0 for r in snap.resources)
    with pytest.raises(grpc.RpcError) as e:
        watch_cli.get(stack.xds_address, "nope.shop")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "nope.shop" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        watch_cli.get(stack.xds_address, "app-1.shop", types=["XDS"])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "XDS" in e.value.details()


def test_mizzen_watch_prints_each_version(stack, tmp_path):
    apply(stack, tmp_path, BASE)
    m1 = settled_manifest(stack)
    argv = [sys.executable, "-m", "mizzen", "watch", "app-1.shop", "--xds", stack.xds_address, "--json",
            "--count", "2"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        first = orjson.loads(p.stdout.readline())
        assert first["version"] == m1.version and first["types"]["CDS"]["resources"] > 0
        assert first["types"]["CDS"]["bytes"] > 0
        apply(stack, tmp_path, CHANGES[0])
        m2 = settled_manifest(stack)
        out, err = p.communicate(timeout=60)
        second = orjson.loads(out.splitlines()[-1])
        assert second["version"] == m2.version and "CDS" in second["changed"], err
        assert p.returncode == 0, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    # the human format names the version, what changed, and counts with bytes per type
    r = subprocess.run([*argv[:-3], "--count", "1"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(m2.version) and "changed CDS,EDS,LDS,RDS" in r.stdout and " B)" in r.stdout


def test_namespace_watch_follows_every_proxy_of_the_namespace(stack, tmp_path):
    apply(stack, tmp_path, BASE)
    first = settled_manifest(stack)
    sub = Subscriber(stack.xds_address, "", namespace="shop")
    try:
        snap = sub.next()
        assert (snap.proxy, snap.version) == (NODE, first.version)
        # a pod that appears later joins the watch; a pod of another namespace does not
        node2 = "sidecar~10.77.0.6~app-2.shop~shop.svc.cluster.local"
        apply(stack, tmp_path, BASE.split("---")[1].replace("app-1", "app-2").replace("10.77.0.5", "10.77.0.6")
              + "---\n" + BASE.split("---")[1].replace("shop", "other").replace("10.77.0.5", "10.78.0.1")
              + "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n")
        m1, m2 = settled_manifest(stack), settled_manifest(stack, node=node2)
        got: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while got.get(node2) != m2.version or got.get(NODE) != m1.version:
            assert time.monotonic() < deadline, got
            s = sub.next()
            assert s.proxy in (NODE, node2), s.proxy
            got[s.proxy] = s.version
        # one change reaches both, each in order
        apply(stack, tmp_path, CHANGES[0])
        m1, m2 = settled_manifest(stack), settled_manifest(stack, node=node2)
        seen: dict[str, list[int]] = {NODE: [], node2: []}
        while not (got.get(NODE) == m1.version and got.get(node2) == m2.version):
            assert time.monotonic() < deadline + 60, got
            s = sub.next()
            got[s.proxy] = s.version
            seen[s.proxy].append(s.revision)
        assert all(r == sorted(r) for r in seen.values())
    finally:
        sub.stop.set()
