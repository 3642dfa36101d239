"""Issue 10's four bugs as a user meets them: a client pod with a real sidecar (iptables interception, Envoy
from `mizzen bootstrap`) calling Kubernetes Services whose pods answer slowly or fail, DestinationRules and
VirtualServices applied through `mizzen apply`. The gateway harness (tests/test_traffic_policy.py) covers the
same behaviours and the rest of the API faster; this module proves the sidecar path.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import NETNS_E2E
from tests.test_e2e_support import (
    APP_UID,
    E2E,
    ECHO,
    TLS_MODE_LABEL,
    call,
    endpoints,
    eventually,
    served_by,
    service,
)

pytestmark = NETNS_E2E

PORT = 8080


class Mesh:
    def __init__(self, env: E2E, server_sidecars: bool):
        self.env = env
        self.pods = {}
        cars = []
        labels = {TLS_MODE_LABEL: "istio"} if server_sidecars else {}
        for name, extra in (("g1", []), ("g2", []), ("g3", []), ("bad", ["--status", "503"]),
                            ("slow", ["--delay", "1"])):
            pod = env.add_pod(name, {"app": name, **labels})
            pod.start_app([sys.executable, ECHO, "serve", "--http", str(PORT), "--name", name, *extra],
                          uid=APP_UID, wait_ports=[PORT])
            self.pods[name] = pod
            if server_sidecars:
                cars.append(env.start_sidecar(pod, concurrency=2))
        self.client = env.add_pod("client", {"app": "client", **labels})
        self.car = env.start_sidecar(self.client, concurrency=2)  # Istio's default proxy concurrency
        for car in [*cars, self.car]:
            env.wait_ready(car)


@pytest.fixture(scope="module", params=["plain", "mtls"])
def mesh(request, tmp_path_factory):
    """The servers without sidecars (plain HTTP upstream), then with sidecars (auto mTLS between Envoys)."""
    env = E2E(tmp_path_factory.mktemp(f"traffic-sidecar-{request.param}"),
              subnet="10.244.7.0/24" if request.param == "plain" else "10.244.8.0/24")
    try:
        yield Mesh(env, server_sidecars=request.param == "mtls")
    finally:
        env.close()


def fqdn(name: str) -> str:
    return f"{name}.default.svc.cluster.local"


def dr(name: str, policy: dict) -> dict:
    return {"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
            "metadata": {"name": name, "namespace": "default"}, "spec": {"host": name, "trafficPolicy": policy}}


def vs(name: str, rule: dict) -> dict:
    return {"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"hosts": [name], "http": [{"route": [{"destination": {"host": name}}], **rule}]}}


def setup(mesh: Mesh, name: str, ip: str, pods: list[str], *later: dict) -> None:
    """A service taking traffic, then (as a user adds policy to a live service) the `later` objects."""
    env = mesh.env
    env.apply(service(name, ip, app=name), endpoints(name, [mesh.pods[p] for p in pods]))
    cluster = f"outbound|80||{fqdn(name)}"
    eventually(lambda: mesh.car.serves(cluster, {f"{mesh.pods[p].ip}:{PORT}" for p in pods}),
               what=f"{name} in the client's Envoy")
    assert served_by(get(mesh, ip)) in pods
    if later:
        env.apply(*later)


def arrived(mesh: Mesh, section: str, marker: str) -> None:
    """Until Envoy got config containing `marker` (active or warming), then up to 5 s for nothing to be warming.
    No assertion that it stopped warming: the traffic that follows is the test (a change stuck warming is the
    bug it must expose)."""
    eventually(lambda: marker in json.dumps(mesh.car.section(section)), what=f"{marker} in {section}")
    with contextlib.suppress(AssertionError):
        eventually(lambda: mesh.car.stats("cluster_manager.")["cluster_manager.warming_clusters"] == 0, 5)


def get(mesh: Mesh, ip: str, headers: dict | None = None, timeout: float = 10.0) -> dict:
    rid = f"t-{uuid.uuid4().hex[:20]}"
    res = call(mesh.client, f"http://{ip}/", rid, timeout) if not headers else \
        mesh.client.call(_get_with, f"http://{ip}/", {"x-request-id": rid, **headers}, timeout)
    return res


def _burst(url: str, n: int) -> list[dict]:
    barrier = threading.Barrier(n)

    def one(_):
        barrier.wait(10)
        return _get_with(url, {}, 30.0)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _get_with(url: str, headers: dict, timeout: float) -> dict:
    from mizzen.services.demo.echo import http_call

    try:
        return http_call(url, headers, timeout)
    except OSError as e:
        return {"error": str(e)}


def test_sidecar_vs_timeout(mesh):
    setup(mesh, "st-slow", "10.96.7.1", ["slow"], vs("st-slow", {"timeout": "0.3s"}))
    arrived(mesh, "RoutesConfigDump", '"0.300s"')
    t0 = time.monotonic()
    res = get(mesh, "10.96.7.1")
    took = time.monotonic() - t0
    assert res.get("status") == 504 and took < 0.9, (res, took)


def test_sidecar_consistent_hash(mesh):
    setup(mesh, "st-hash", "10.96.7.2", ["g1", "g2", "g3"],
          dr("st-hash", {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}))
    arrived(mesh, "RoutesConfigDump", "x-user")
    arrived(mesh, "ClustersConfigDump", "RING_HASH")
    used = set()
    for user in range(8):
        got = Counter(served_by(get(mesh, "10.96.7.2", {"x-user": f"u{user}"})) for _ in range(5))
        assert len(got) == 1, (user, got)
        used |= set(got)
    assert len(used) >= 2, used


def test_sidecar_outlier_detection(mesh):
    setup(mesh, "st-od", "10.96.7.3", ["g1", "g2", "bad"],
          dr("st-od", {"outlierDetection": {"consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "60s",
                                            "maxEjectionPercent": 100}}),
          vs("st-od", {"retries": {"attempts": 0}}))  # no retries: a request the bad pod gets fails
    arrived(mesh, "RoutesConfigDump", '"st-od.default.svc.cluster.local:80"')
    arrived(mesh, "ClustersConfigDump", "consecutive_5xx")
    first = Counter(get(mesh, "10.96.7.3").get("status") for _ in range(20))
    assert 1 <= first[503] <= 2, first  # two consecutive 5xx, then the bad pod is ejected
    bad = f"{mesh.pods['bad'].ip}:{PORT}"
    rids = set()
    for _ in range(30):
        rid = f"od-{uuid.uuid4().hex[:16]}"
        call(mesh.client, "http://10.96.7.3/", rid)
        rids.add(rid)
    log = [e for e in mesh.car.log_entries() if e.get("request_id") in rids]
    eventually(lambda: len([e for e in mesh.car.log_entries() if e.get("request_id") in rids]) == 30,
               what="30 access-log lines")
    log = [e for e in mesh.car.log_entries() if e.get("request_id") in rids]
    assert not [e for e in log if e.get("upstream_host") == bad], Counter(e.get("upstream_host") for e in log)
    assert {e.get("response_code") for e in log} == {200}


def test_sidecar_connection_pool_overflow(mesh):
    setup(mesh, "st-pool", "10.96.7.4", ["slow"],
          dr("st-pool", {"connectionPool": {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}}}))
    arrived(mesh, "ClustersConfigDump", '"max_pending_requests": 1')

    # 20 requests released at once from inside the pod (threads made there share its network namespace), each
    # holding the slow pod 1 s more. Right after the new cluster turns active a burst can still pass unlimited
    # (seen for a few seconds on sidecars, not on the gateway; open question in the issue notes), so bursts
    # repeat until one overflows (bounded: 30 s); before the xds_gateway fix none ever did.
    bursts: list[Counter] = []

    def overflowed() -> bool:
        res = mesh.client.call(_burst, "http://10.96.7.4/?delay=1", 20, timeout=60)
        bursts.append(Counter(r.get("status") for r in res))
        return bursts[-1][503] >= 10

    eventually(overflowed, timeout=30, interval=0.5, what="a burst of 20 with >= 10 overflows (503 UO)")
    eventually(lambda: sum(1 for e in mesh.car.log_entries()
                           if "UO" in str(e.get("response_flags")) and e.get("response_code") == 503) >= 10,
               what="UO in the access log")


def test_sidecar_egress_hosts_scope_what_the_client_reaches(mesh):
    """A Sidecar whose egress lists one service: the client's Envoy keeps that service's cluster and routes and
    drops the other's, whose ClusterIP then only matches the passthrough (and leads nowhere here)."""
    setup(mesh, "st-scope-a", "10.96.7.5", ["g1"])
    setup(mesh, "st-scope-b", "10.96.7.6", ["g2"])
    scope = {"apiVersion": "networking.istio.io/v1beta1", "kind": "Sidecar",
             "metadata": {"name": "client-scope", "namespace": "default"},
             "spec": {"workloadSelector": {"labels": {"app": "client"}},
                      "egress": [{"hosts": ["./st-scope-a.default.svc.cluster.local"]}]}}
    b_cluster = f"outbound|80||{fqdn('st-scope-b')}"
    mesh.env.apply(scope)
    try:
        eventually(lambda: b_cluster not in mesh.car.clusters() and not mesh.car.routes_to(b_cluster),
                   what="st-scope-b out of the client's Envoy")
        assert served_by(get(mesh, "10.96.7.5")) == "g1"
        rid = f"scope-{uuid.uuid4().hex[:16]}"
        res = call(mesh.client, "http://10.96.7.6/", rid, timeout=2.0)
        assert served_by(res) is None, res
        assert mesh.car.wait_entry(request_id=rid)["upstream_cluster"] == "PassthroughCluster"
    finally:
        mesh.env.delete(scope)
    eventually(lambda: mesh.car.serves(b_cluster, {f"{mesh.pods['g2'].ip}:{PORT}"}), what="st-scope-b back")
    assert served_by(get(mesh, "10.96.7.6")) == "g2"


def test_sidecar_oldest_virtual_service_takes_a_host(mesh):
    """istiod's rule on the mesh gateway: of two VirtualServices for one host the oldest (creation time, then
    name) builds its routes and the other's are ignored; delete the oldest and the other takes over. The
    younger one is named `a-…`, so name order alone would pick it."""
    setup(mesh, "st-own-a", "10.96.7.7", ["g1"])
    setup(mesh, "st-own-b", "10.96.7.8", ["g2"])
    setup(mesh, "st-own", "10.96.7.9", ["g3"])

    def to(name: str, hosts: list[str], target: str) -> dict:
        return {"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"hosts": hosts, "http": [{"route": [{"destination": {"host": target}}],
                                                   "headers": {"response": {"set": {"x-vs": name}}}}]}}

    older = to("z-own-older", ["st-own"], "st-own-a")
    mesh.env.apply(older)
    eventually(lambda: served_by(get(mesh, "10.96.7.9")) == "g1", what="st-own routed to st-own-a")
    time.sleep(1.1)  # creation times have whole seconds
    # the younger one also takes st-own-b (no conflict there): its header on st-own-b proves it has arrived
    newer = to("a-own-newer", ["st-own", "st-own-b"], "st-own-b")
    res = mesh.env.mizzen_apply(newer)
    assert ("spec.hosts[0]: [IST0109] The VirtualServices default/a-own-newer,default/z-own-older associated with "
            "mesh gateway define the same host st-own.default.svc.cluster.local") in res.stderr
    assert "The oldest, default/z-own-older, serves the host" in res.stderr
    eventually(lambda: get(mesh, "10.96.7.8").get("headers", {}).get("x-vs") == "a-own-newer",
               what="the younger VirtualService in the client's Envoy")
    for _ in range(5):
        r = get(mesh, "10.96.7.9")
        assert (served_by(r), r["headers"].get("x-vs")) == ("g1", "z-own-older"), r
    mesh.env.delete(older)
    eventually(lambda: served_by(r := get(mesh, "10.96.7.9")) == "g2" and r["headers"].get("x-vs") == "a-own-newer",
               what="the younger VirtualService taking st-own over")
    mesh.env.delete(newer)
