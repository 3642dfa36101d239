"""Incremental translation with real traffic: a client pod's sidecar (iptables interception, real Envoy) follows
a VirtualService weight change 100/0 → 0/100 that the translator built as a `routing` build, and the change
reaches its Envoy as route configuration only (Envoy's own CDS/LDS update counters do not move)."""

from __future__ import annotations

import sys
from collections import Counter

import pytest

from tests.conftest import NETNS_E2E
from tests.scale_support import metrics
from tests.test_e2e_support import APP_UID, E2E, ECHO, call, endpoints, eventually, served_by, service

pytestmark = NETNS_E2E

PORT = 8080
NAME, IP = "inc", "10.96.57.1"
FQDN = f"{NAME}.default.svc.cluster.local"
ROUTING = 'mizzen_translator_builds_total{kind="routing"}'


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = E2E(tmp_path_factory.mktemp("traffic-incremental"), subnet="10.244.57.0/24")
    try:
        yield e
    finally:
        e.close()


def split(v1: int, v2: int) -> dict:
    return {"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
            "metadata": {"name": NAME, "namespace": "default"},
            "spec": {"hosts": [NAME], "http": [{"route": [
                {"destination": {"host": NAME, "subset": "v1"}, "weight": v1},
                {"destination": {"host": NAME, "subset": "v2"}, "weight": v2}]}]}}


def spread(client, n: int) -> Counter:
    return Counter(served_by(call(client, f"http://{IP}/")) for _ in range(n))


def test_sidecar_follows_a_weight_flip_built_as_routing(env: E2E):
    pods = {}
    for v in ("v1", "v2"):
        pod = env.add_pod(f"{NAME}-{v}", {"app": NAME, "version": v})
        pod.start_app([sys.executable, ECHO, "serve", "--http", str(PORT), "--name", f"{NAME}-{v}"], uid=APP_UID,
                      wait_ports=[PORT])
        pods[v] = pod
    client = env.add_pod("client", {"app": "client"})
    car = env.start_sidecar(client)
    env.wait_ready(car)
    dr = {"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
          "metadata": {"name": NAME, "namespace": "default"},
          "spec": {"host": NAME, "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                             {"name": "v2", "labels": {"version": "v2"}}]}}
    env.apply(service(NAME, IP, app=NAME), endpoints(NAME, list(pods.values())), dr, split(100, 0))
    for v in ("v1", "v2"):
        cluster = f"outbound|80|{v}|{FQDN}"
        eventually(lambda c=cluster, v=v: car.cluster_hosts(c) == {f"{pods[v].ip}:{PORT}"},
                   what=f"{cluster}'s endpoint in the client's Envoy")
    eventually(lambda: spread(client, 5) == Counter({f"{NAME}-v1": 5}), what="100/0: every request on v1")

    tr = env.stack.http_ports["translator"]
    routing = metrics(tr).get(ROUTING, 0.0)
    before = car.stats("cluster_manager.cds.") | car.stats("listener_manager.lds.")
    env.apply(split(0, 100))
    eventually(lambda: spread(client, 5) == Counter({f"{NAME}-v2": 5}), what="0/100: every request on v2")
    assert spread(client, 20) == Counter({f"{NAME}-v2": 20})
    assert metrics(tr)[ROUTING] == routing + 1  # the flip was one incremental routing build
    after = car.stats("cluster_manager.cds.") | car.stats("listener_manager.lds.")
    for counter in ("cluster_manager.cds.update_success", "listener_manager.lds.update_success"):
        assert after[counter] == before[counter], (counter, before[counter], after[counter])
