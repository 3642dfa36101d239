"""Issue 4, end to end: the seed mesh through the whole real stack into a real Envoy.

Real NATS and Redis, the registry, translator and xds_gateway as processes (`Stack`); `mizzen apply -f
tests/fixtures/seed-mesh`; a real Envoy started from `mizzen bootstrap` for the seed's pod
webserverv1-84596579c6-xxvhd (node `sidecar~10.200.0.135~webserverv1-84596579c6-xxvhd.default~default.svc.cluster.local`)
connected over ADS to the real xds_gateway. Envoy's own `/config_dump` then holds exactly the clusters,
listeners and routes the translator built, and `mizzen proxy-config … --admin` prints the seed's tables —
static bootstrap rows (agent, prometheus_stats, sds-grpc, xds-grpc, zipkin) included.

The snapshot binds 0.0.0.0:15001/15006, so Envoy runs in a network namespace made for the test, as the
seed's pod: address 10.200.0.135 on a private 10.200.0.0/24, ClusterIPs in 10.200.1.0/24. The seed's Envoy
reached istiod at `istiod.istio-system.svc:15012` (its DNS gave 10.200.1.62) and resolved
raw.githubusercontent.com to 151.101.228.133; here the bootstrap names the same xDS address, the pod's Envoy
gets those two DNS answers from a private /etc/hosts, and 10.200.1.62:15012 inside the pod is relayed to
the gateway on the host. Nothing leaves the pod: no resolver, no route out. Auto mTLS needs the `default`
and `ROOTCA` secrets before Envoy warms its clusters and listeners: tests/sds_fixture.py serves them on the
bootstrap's `./etc/istio/proxy/SDS` socket.
"""

from __future__ import annotations

import json
import urllib.request
from collections import Counter

import pytest
from google.protobuf.json_format import MessageToDict

from mizzen.services.mesh.configdump import parse_config_dump
from mizzen.services.sidecar.netns import unavailable_reason
from tests.conftest import SEED_MESH, is_root
from tests.test_e2e_support import E2E, eventually, mizzen
from tests.test_proxy_config_support import POD, STATIC_CLUSTERS, cells, seed_table

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(not is_root(), reason="needs root: network namespaces, processes as uid 1337"),
    pytest.mark.skipif(is_root() and unavailable_reason() is not None, reason=str(unavailable_reason())),
]

POD_IP = "10.200.0.135"
ISTIOD_IP = "10.200.1.62"  # istiod's ClusterIP in the fixture, where the seed's xds-grpc resolved
SEED_DNS = {"istiod.istio-system.svc": ISTIOD_IP, "raw.githubusercontent.com": "151.101.228.133"}
NODE_ID = f"sidecar~{POD_IP}~{POD}.default~default.svc.cluster.local"


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    env = E2E(tmp_path_factory.mktemp("e2e-seed"), subnet="10.200.0.0/24", service_cidr="10.200.1.0/24")
    try:
        out = mizzen("apply", "-f", str(SEED_MESH), "--server", env.server).stdout
        assert "pod/webserverv1-84596579c6-xxvhd created" in out, out
        pod = env.add_pod("ws1", labels={"app": "webserver", "version": "v1"}, ip=POD_IP, register=False)
        # istiod's address inside the pod, relayed to the gateway on the host
        pod.run(["ip", "addr", "add", f"{ISTIOD_IP}/32", "dev", "lo"])
        env.net.relay(listen_ns=pod.netns_name, listen=(ISTIOD_IP, 15012), connect_ns=None,
                      connect=("127.0.0.1", env.stack.xds_port), name="istiod")
        car = env.start_sidecar(pod, pod_name=POD, xds="istiod.istio-system.svc:15012", hosts=SEED_DNS,
                                iptables=False)
        env.wait_ready(car)
        yield env, car
    finally:
        env.close()


def translated(env: E2E) -> dict:
    """What the translator built for the pod: its snapshot as the registry serves it (/debug/config_dump)."""
    url = f"{env.server}/debug/config_dump?pod={POD}&namespace=default"
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["X-Mizzen-Proxy"] == NODE_ID
        return json.loads(r.read())


def by_name(messages: list, key: str = "name") -> dict[str, dict]:
    return {getattr(m, key): MessageToDict(m, preserving_proto_field_name=True) for m in messages}


def sync_record(env: E2E) -> dict | None:
    """The pod's `mizzen proxy-status -o json` entry when every type is SYNCED (else None)."""
    entries = json.loads(mizzen("proxy-status", POD, "-o", "json", "--server", env.server).stdout)
    entry = next((e for e in entries if e["proxy"] == NODE_ID), None)
    return entry if entry and set(entry["status"].values()) == {"SYNCED"} else None


@pytest.fixture(scope="module")
def live(seed):
    """Envoy's /config_dump once it has ACKed the snapshot built with its node metadata (SYNCED before and
    after the dump, on that snapshot's version) and holds nothing in transition (Sidecar.settled: the old
    filter chains of an updated listener drain for a while, and their inline routes still show)."""
    env, car = seed

    def settled():
        # The translator first builds the pod's snapshot from the Pod object, and rebuilds it once the proxy
        # connected with its node metadata (the bootstrap's access-log path): wait for that build.
        snapshot = translated(env)
        if str(car.access_log) not in json.dumps(snapshot):
            return None
        version = car.section("ClustersConfigDump", snapshot)["version_info"]
        before = sync_record(env)
        if before is None or before["manifest_version"] != version:
            return None
        if not car.settled():
            return None
        dump = car.config_dump()
        if not car.settled():
            return None
        after = sync_record(env)
        if after is None or after["manifest_version"] != before["manifest_version"]:
            return None
        return dump, before["manifest_version"]

    return eventually(settled, 30, 0.2, what="Envoy SYNCED on the current snapshot with nothing warming or draining")


def test_envoy_holds_what_the_translator_built(seed, live):
    env, car = seed
    dump, version = live
    snapshot = translated(env)
    assert car.section("ClustersConfigDump", snapshot)["version_info"] == version  # the snapshot Envoy ACKed
    assert str(car.access_log) in json.dumps(dump)  # built with the metadata Envoy connected with
    want = parse_config_dump(snapshot)
    got = parse_config_dump(dump)
    # one dynamic cluster per row of the seed's table that is not a bootstrap cluster
    assert len(want.dynamic_clusters) == len(seed_table("clusters").splitlines()) - 1 - len(STATIC_CLUSTERS)
    assert want.dynamic_listeners and want.dynamic_routes
    assert by_name(got.dynamic_clusters) == by_name(want.dynamic_clusters)
    assert by_name(got.dynamic_listeners) == by_name(want.dynamic_listeners)
    assert by_name(got.dynamic_routes) == by_name(want.dynamic_routes)
    # the bootstrap's own resources are Envoy's static ones
    assert sorted(c.name for c in got.static_clusters) == sorted(STATIC_CLUSTERS)
    assert {lst.address.socket_address.port_value for lst in got.static_listeners} == {15090, 15021}
    # it came over ADS from the real gateway: the node, and the gateway's record of the stream
    assert got.bootstrap.node.id == NODE_ID
    status = env.proxy_status()
    assert status[f"{POD}.default"][:4] == ["SYNCED"] * 4, status
    assert car.sds.acked("default", node=NODE_ID) and car.sds.acked("ROOTCA", node=NODE_ID)
    assert not car.sds.nacks()


def test_cluster_table_is_the_seeds(seed, live):
    _env, car = seed
    assert car.pc("cluster") == seed_table("clusters")


def test_endpoint_table_is_the_seeds(seed, live):
    """Static rows too: prometheus_stats, agent, the SDS pipe, xds-grpc at the address its name resolved to
    (zipkin's name does not resolve, as in the seed), and the ServiceEntry host Envoy resolved."""
    _env, car = seed
    assert car.pc("endpoint") == seed_table("endpoints")


def test_listener_table_port_80_is_the_seeds(seed, live):
    _env, car = seed
    assert car.pc("listener", "--port", "80") == seed_table("listeners-port80")


def test_route_table_has_the_seeds_rows(seed, live):
    """Every seed row, the bootstrap listeners' inline routes (`/healthz/ready*`, `/stats/prometheus*`) too.
    The order of route configurations is Envoy's hash-map order, in the seed as here: compared as rows."""
    _env, car = seed
    printed = car.pc("route")
    seed_rows = cells(seed_table("routes"))
    rows = cells(printed)
    assert rows[0] == seed_rows[0]
    assert Counter(map(tuple, rows[1:])) == Counter(map(tuple, seed_rows[1:]))
    # within a route configuration the order is the seed's
    assert [r for r in rows if r[0] == "80"] == [r for r in seed_rows if r[0] == "80"]
    assert ["", "*", "/healthz/ready*", ""] in rows and ["", "*", "/stats/prometheus*", ""] in rows
