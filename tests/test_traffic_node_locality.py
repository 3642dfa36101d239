"""Issue 10 item 4: locality from Kubernetes Nodes, proven by where a real Envoy sends requests.

The pods carry no locality of their own, only `spec.nodeName`; the Nodes carry the topology labels. The client
is the gateway Envoy of tests/traffic_harness.py, whose Pod runs on a Node too, and whose bootstrap announces a
different node.locality (`--locality`), which istiod uses only when its registry knows no locality for the
proxy. With outlier detection on the DestinationRule (Istio's precondition for failover), all traffic goes to
the endpoints of the client's locality, follows the Nodes when they are relabelled, and moves on when the local
endpoint fails.
"""

from __future__ import annotations

import pytest

from mizzen.services.mesh import locality as loc
from tests.scale_support import metrics
from tests.test_e2e_support import eventually
from tests.traffic_harness import GATEWAY, NS, TrafficMesh, destination_rule, outbound, virtual_service

pytestmark = pytest.mark.slow

OD = {"consecutive5xxErrors": 1, "interval": "1s", "baseEjectionTime": "120s", "maxEjectionPercent": 100}
ANNOUNCED = "r2/z3"  # the gateway's node.locality (its bootstrap), which the registry's locality overrides
HOST = f"nodeweb.{NS}.svc.cluster.local"


def node(name: str, region: str, zone: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {loc.REGION_LABEL: region, loc.ZONE_LABEL: zone,
                                                  "kubernetes.io/hostname": name}},
            "spec": {"podCIDR": "10.244.0.0/24"}}


def pod(name: str, ip: str, node_name: str, labels: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"nodeName": node_name}, "status": {"podIP": ip}}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = TrafficMesh(tmp_path_factory.mktemp("traffic-node-locality"), bootstrap_flags=["--locality", ANNOUNCED])
    try:
        yield m
    finally:
        m.close()


def test_traffic_follows_the_nodes(mesh):
    a = mesh.upstream("node-a-web")  # one port for all: an Endpoints subset has one port list
    b = mesh.upstream("node-b-web", port=a.port)
    c = mesh.upstream("node-c-web", port=a.port)
    placed = {"node-a-web": (a, "node-a"), "node-b-web": (b, "node-b"), "node-c-web": (c, "node-c")}
    gateway_pod = pod(GATEWAY, "127.0.0.1", "node-gw", {"istio": "ingressgateway"})
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "nodeweb", "namespace": NS},
           "spec": {"clusterIP": "10.96.61.1", "selector": {"app": "nodeweb"},
                    "ports": [{"name": "http", "port": 80, "targetPort": a.port}]}}
    eps = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "nodeweb", "namespace": NS},
           "subsets": [{"addresses": [{"ip": u.ip, "targetRef": {"kind": "Pod", "name": n}}
                                      for n, (u, _) in placed.items()],
                        "ports": [{"name": "http", "port": a.port}]}]}
    vs = virtual_service("nodeweb", HOST, [{"name": "nodeweb", "retries": {"attempts": 0},
                                            "route": [{"destination": {"host": HOST}}]}])
    mesh.apply(node("node-gw", "r1", "z1"), node("node-a", "r1", "z1"), node("node-b", "r1", "z2"),
               node("node-c", "r2", "z3"), gateway_pod,
               *(pod(n, u.ip, where, {"app": "nodeweb"}) for n, (u, where) in placed.items()),
               svc, eps, vs, destination_rule("nodeweb", HOST, {"outlierDetection": OD}))
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(HOST), [a, b, c])

    def settles_on(who: str, priorities: dict[str, int], what: str, n: int = 20) -> None:
        """Envoy holds these priorities (address → priority), then `n` requests in a row all reach `who`."""
        eventually(lambda: {addr: int(h.get("priority") or 0)
                            for addr, h in mesh.host_statuses(outbound(HOST)).items()} == priorities, what=what)
        eventually(lambda: mesh.spread(HOST, 5) == {who: 5}, what=f"traffic settled on {who} ({what})")
        got = mesh.spread(HOST, n)
        assert got == {who: n}, got

    # 1. the gateway's Pod is on node-gw (r1/z1): node-a's endpoint is local, whatever node.locality says
    settles_on("node-a-web", {a.address: 0, b.address: 1, c.address: 2}, "the gateway in r1/z1, its Node's")
    assert mesh.host_statuses(outbound(HOST))[c.address]["locality"] == {"region": "r2", "zone": "z3"}

    def builds() -> tuple[float, float]:
        m = metrics(mesh.stack.http_ports["translator"])
        return (m.get('mizzen_translator_builds_total{kind="endpoints"}', 0.0),
                m.get('mizzen_translator_builds_total{kind="full"}', 0.0))

    before = builds()
    # 2. node-gw relabelled to r1/z2: the proxy's own locality follows its Node
    mesh.apply(node("node-gw", "r1", "z2"))
    settles_on("node-b-web", {b.address: 0, a.address: 1, c.address: 2}, "the gateway moved to r1/z2")

    # 3. node-b relabelled to r2/z9: its pod's endpoint is re-localised (a is the gateway's region now)
    mesh.apply(node("node-b", "r2", "z9"))
    settles_on("node-a-web", {a.address: 0, b.address: 1, c.address: 1}, "node-b moved to r2/z9")
    assert mesh.host_statuses(outbound(HOST))[b.address]["locality"] == {"region": "r2", "zone": "z9"}
    endpoint_builds, full_builds = builds()
    assert endpoint_builds >= before[0] + 2 and full_builds == before[1]  # Node relabels: endpoints-only builds

    # 4. the gateway's Pod deleted: the registry knows no locality for it, so Envoy's node.locality (r2/z3) counts
    mesh.delete(gateway_pod)
    settles_on("node-c-web", {c.address: 0, b.address: 1, a.address: 2}, "the gateway's announced r2/z3")

    # 5. the local endpoint fails: ejected by outlier detection, traffic moves to the same region (node-b, r2)
    c.answer(status=503)
    eventually(lambda: mesh.spread(HOST, 5) == {"node-b-web": 5}, what="traffic failed over to node-b")
    assert mesh.spread(HOST, 20) == {"node-b-web": 20}
    assert "failed_outlier_check" in str(mesh.host_statuses(outbound(HOST))[c.address]["health_status"])
