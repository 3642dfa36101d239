"""Locality load balancing in the pure builders: ClusterLoadAssignment priorities and weights relative to the
proxy's locality, as istiod's loadbalancer.go computes them (the traffic proof is tests/test_traffic_locality.py)."""

from __future__ import annotations

from tests.translator_helpers import ENDPOINT, push_of, snapshot_of

HOST = "loc.example.test"
CLUSTER = f"outbound|80||{HOST}"
LOCALITIES = ["r1/z1/s1", "r1/z1/s2", "r1/z2", "r2/z1", "r3/z1", ""]


def mesh(lb: dict | None = None, outlier: bool = True, pod_labels: dict | None = None) -> str:
    eps = "\n".join(f"    - {{address: 10.0.0.{i + 1}, locality: '{loc}', labels: {{tier: t{i % 2}}}}}"
                    for i, loc in enumerate(LOCALITIES))
    policy = {}
    if outlier:
        policy["outlierDetection"] = {"consecutive5xxErrors": 1}
    if lb is not None:
        policy["loadBalancer"] = {"localityLbSetting": lb}
    labels = pod_labels if pod_labels is not None else {
        "app": "client", "topology.kubernetes.io/region": "r1", "topology.kubernetes.io/zone": "z1",
        "topology.istio.io/subzone": "s1", "tier": "t1"}
    import json
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: default, labels: {json.dumps(labels)}}}
status: {{podIP: 10.1.0.9}}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: loc, namespace: default}}
spec:
  hosts: [{HOST}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
{eps}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: loc, namespace: default}}
spec:
  host: {HOST}
  trafficPolicy: {json.dumps(policy)}
"""


NODE = "sidecar~10.1.0.9~client.default~default.svc.cluster.local"


def priorities(yaml_text: str) -> dict[str, int]:
    cla = snapshot_of(push_of(yaml_text), NODE)[ENDPOINT][CLUSTER]
    return {lb.endpoint.address.socket_address.address: lle.priority for lle in cla.endpoints
            for lb in lle.lb_endpoints}


def test_default_failover_priorities():
    assert priorities(mesh()) == {"10.0.0.1": 0, "10.0.0.2": 1, "10.0.0.3": 2, "10.0.0.4": 3, "10.0.0.5": 3,
                                  "10.0.0.6": 3}


def test_no_outlier_detection_no_priorities():
    assert set(priorities(mesh(outlier=False)).values()) == {0}


def test_disabled():
    assert set(priorities(mesh({"enabled": False})).values()) == {0}


def test_proxy_without_locality_shares_the_plain_assignment():
    assert set(priorities(mesh(pod_labels={"app": "client"})).values()) == {0}


def test_failover_rule():
    got = priorities(mesh({"failover": [{"from": "r1", "to": "r3"}]}))
    assert got["10.0.0.5"] == 3 and got["10.0.0.4"] == 4 and got["10.0.0.6"] == 4, got  # r3 before r2


def test_failover_priority_labels():
    got = priorities(mesh({"failoverPriority": ["topology.kubernetes.io/region", "tier"]}))
    # region r1 and tier t1 (10.0.0.2) first; region r1 other tier next; other regions last
    assert got == {"10.0.0.2": 0, "10.0.0.4": 2, "10.0.0.6": 2, "10.0.0.1": 1, "10.0.0.3": 1, "10.0.0.5": 2}, got


def test_distribute_weights():
    push = push_of(mesh({"distribute": [{"from": "r1/z1/*", "to": {"r1/z1/*": 30, "r2/*": 70}}]}, outlier=False))
    cla = snapshot_of(push, NODE)[ENDPOINT][CLUSTER]
    weights = {(lle.locality.region, lle.locality.zone, lle.locality.sub_zone): (lle.load_balancing_weight.value,
                                                                                 len(lle.lb_endpoints))
               for lle in cla.endpoints}
    assert weights[("r1", "z1", "s1")] == (15, 1) and weights[("r1", "z1", "s2")] == (15, 1)
    assert weights[("r2", "z1", "")] == (70, 1)
    assert weights[("r1", "z2", "")][1] == 0 and weights[("r3", "z1", "")][1] == 0  # not named: no traffic
