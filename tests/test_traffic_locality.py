"""Issue 10 item 4: locality load balancing, proven by where a real Envoy sends requests.

The gateway Envoy of tests/traffic_harness.py runs in locality `r1/z1/s1` (its bootstrap labels
`topology.kubernetes.io/region|zone`, `topology.istio.io/subzone`, which `mizzen bootstrap` also writes as
node.locality) with a label `tier: gold`. Endpoints get their locality from a ServiceEntry endpoint's /
WorkloadEntry's `locality`, or from their Pod's labels. With outlier detection on the DestinationRule
(Istio's precondition for failover), the local endpoints get all the traffic until they fail and are ejected;
then it moves to the next locality (same zone, then region, then the `failover` target region).
"""

from __future__ import annotations

import pytest

from tests.test_e2e_support import eventually
from tests.traffic_harness import (
    NS,
    TrafficMesh,
    Upstream,
    destination_rule,
    outbound,
    service_entry,
    virtual_service,
)

pytestmark = pytest.mark.slow

HERE = {"topology.kubernetes.io/region": "r1", "topology.kubernetes.io/zone": "z1",
        "topology.istio.io/subzone": "s1", "tier": "gold"}
OD = {"consecutive5xxErrors": 1, "interval": "1s", "baseEjectionTime": "120s", "maxEjectionPercent": 100}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = TrafficMesh(tmp_path_factory.mktemp("traffic-locality"), gateway_labels=HERE)
    try:
        yield m
    finally:
        m.close()


def setup(mesh: TrafficMesh, name: str, ups: list[Upstream], localities: list[str], policy: dict,
          labels: list[dict] | None = None) -> str:
    host = f"{name}.locality.test"
    vs = virtual_service(name, host, [{"name": name, "retries": {"attempts": 0},
                                       "route": [{"destination": {"host": host}}]}])
    mesh.apply(service_entry(name, host, ups, localities=localities, labels=labels), vs,
               destination_rule(name, host, policy))
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(host), ups)
    return host


def priorities(mesh: TrafficMesh, host: str) -> dict[str, int]:
    return {addr: int(h.get("priority") or 0) for addr, h in mesh.host_statuses(outbound(host)).items()}


def only(mesh: TrafficMesh, host: str, who: str, n: int = 20) -> None:
    """After the failing endpoints are ejected, `n` requests in a row all reach `who`."""
    def settled() -> bool:
        return mesh.spread(host, 5) == {who: 5}
    eventually(settled, what=f"traffic to {host} settled on {who}")
    got = mesh.spread(host, n)
    assert got == {who: n}, got


def test_failover_local_first_then_zone_then_region(mesh):
    a, b, c = (mesh.upstream(f"fo-{x}") for x in "abc")
    host = setup(mesh, "failover", [a, b, c], ["r1/z1/s1", "r1/z2/s9", "r2/z3/s1"], {"outlierDetection": OD})
    eventually(lambda: priorities(mesh, host) == {a.address: 0, b.address: 1, c.address: 2},
               what="priorities relative to the gateway's locality")
    assert mesh.spread(host, 30) == {"fo-a": 30}  # all of it stays local
    a.answer(status=503)
    only(mesh, host, "fo-b")  # a ejected: the same region, another zone
    b.answer(status=503)
    only(mesh, host, "fo-c")  # b ejected too: another region
    assert "failed_outlier_check" in str(mesh.host_statuses(outbound(host))[a.address]["health_status"])


def test_without_outlier_detection_localities_are_equal(mesh):
    """Istio applies failover priorities only with outlier detection: without it every locality is priority 0
    and traffic is spread over all endpoints."""
    a, c = mesh.upstream("eq-a"), mesh.upstream("eq-c")
    host = setup(mesh, "equal", [a, c], ["r1/z1/s1", "r2/z3/s1"],
                 {"connectionPool": {"tcp": {"maxConnections": 100}}})
    assert priorities(mesh, host) == {a.address: 0, c.address: 0}
    got = mesh.spread(host, 40)
    assert set(got) == {"eq-a", "eq-c"}, got


def test_failover_rule_picks_the_target_region(mesh):
    a, c, d = (mesh.upstream(f"fr-{x}") for x in "acd")
    host = setup(mesh, "failrule", [a, c, d], ["r1/z1/s1", "r2/z1/s1", "r3/z1/s1"],
                 {"outlierDetection": OD, "loadBalancer": {"localityLbSetting": {
                     "enabled": True, "failover": [{"from": "r1", "to": "r3"}]}}})
    eventually(lambda: priorities(mesh, host) == {a.address: 0, d.address: 1, c.address: 2},
               what="r3 before r2")
    assert mesh.spread(host, 20) == {"fr-a": 20}
    a.answer(status=503)
    only(mesh, host, "fr-d")


def test_failover_priority_labels(mesh):
    """failoverPriority [tier]: the endpoint with the gateway's `tier` wins over the local one."""
    local_silver, far_gold = mesh.upstream("fp-silver"), mesh.upstream("fp-gold")
    host = setup(mesh, "failprio", [local_silver, far_gold], ["r1/z1/s1", "r2/z1/s1"],
                 {"outlierDetection": OD, "loadBalancer": {"localityLbSetting": {
                     "enabled": True, "failoverPriority": ["tier"]}}},
                 labels=[{"tier": "silver"}, {"tier": "gold"}])
    eventually(lambda: priorities(mesh, host) == {far_gold.address: 0, local_silver.address: 1},
               what="gold first")
    assert mesh.spread(host, 20) == {"fp-gold": 20}
    far_gold.answer(status=503)
    only(mesh, host, "fp-silver")


def test_distribute_weights(mesh):
    a, c = mesh.upstream("ds-a"), mesh.upstream("ds-c")
    host = setup(mesh, "distribute", [a, c], ["r1/z1/s1", "r2/z1/s1"],
                 {"loadBalancer": {"localityLbSetting": {"enabled": True, "distribute": [
                     {"from": "r1/z1/*", "to": {"r1/z1/*": 20, "r2/*": 80}}]}}})
    mesh.wait_cluster(outbound(host), lambda c: "locality_weighted_lb_config" in str(c), what="locality weights")
    got = mesh.spread(host, 200)
    assert set(got) == {"ds-a", "ds-c"}, got
    assert 0.7 <= got["ds-c"] / 200 <= 0.9, got  # 80 % ± 10 points


def test_disabled_setting_turns_failover_off(mesh):
    a, c = mesh.upstream("off-a"), mesh.upstream("off-c")
    host = setup(mesh, "disabled", [a, c], ["r1/z1/s1", "r2/z3/s1"],
                 {"outlierDetection": OD, "loadBalancer": {"localityLbSetting": {"enabled": False}}})
    assert priorities(mesh, host) == {a.address: 0, c.address: 0}


def test_pod_labels_give_endpoint_locality(mesh):
    """A Kubernetes Service: each endpoint's locality comes from its Pod's topology labels (`istio-locality`
    too); removing the local pod's endpoint moves the traffic to the next locality."""
    zone2 = mesh.upstream("pod-zone2")  # one port for all three: an Endpoints subset has one port list
    local = mesh.upstream("pod-local", port=zone2.port)
    other = mesh.upstream("pod-other", port=zone2.port)
    pods = {"pod-local": (local, {"topology.kubernetes.io/region": "r1", "topology.kubernetes.io/zone": "z1",
                                  "topology.istio.io/subzone": "s1"}),
            "pod-zone2": (zone2, {"topology.kubernetes.io/region": "r1", "topology.kubernetes.io/zone": "z2"}),
            "pod-other": (other, {"istio-locality": "r2.z7.s1"})}
    objs = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": n, "namespace": NS,
                                                           "labels": {"app": "locweb", **lab}},
             "spec": {"containers": [{"name": "app", "ports": [{"containerPort": u.port}]}]},
             "status": {"podIP": u.ip}} for n, (u, lab) in pods.items()]
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "locweb", "namespace": NS},
           "spec": {"clusterIP": "10.96.60.1", "selector": {"app": "locweb"},
                    "ports": [{"name": "http", "port": 80, "targetPort": zone2.port}]}}

    def eps(names: list[str]) -> dict:
        return {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "locweb", "namespace": NS},
                "subsets": [{"addresses": [{"ip": pods[n][0].ip, "targetRef": {"kind": "Pod", "name": n}}
                                           for n in names],
                             "ports": [{"name": "http", "port": zone2.port}]}]}

    host = f"locweb.{NS}.svc.cluster.local"
    vs = virtual_service("locweb", host, [{"name": "locweb", "retries": {"attempts": 0},
                                           "route": [{"destination": {"host": host}}]}])
    mesh.apply(*objs, svc, eps(list(pods)), vs, destination_rule("locweb", host, {"outlierDetection": OD}))
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(host), [local, zone2, other])
    eventually(lambda: priorities(mesh, host) == {local.address: 0, zone2.address: 1, other.address: 2},
               what="pod localities as priorities")
    statuses = mesh.host_statuses(outbound(host))
    assert statuses[other.address]["locality"] == {"region": "r2", "zone": "z7", "sub_zone": "s1"}
    assert mesh.spread(host, 20) == {"pod-local": 20}
    mesh.apply(eps(["pod-zone2", "pod-other"]))  # the local pod goes away
    mesh.wait_hosts(outbound(host), [zone2, other])
    only(mesh, host, "pod-zone2")
