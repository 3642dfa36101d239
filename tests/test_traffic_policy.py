"""Issue 10 item 1: VirtualService / DestinationRule behaviour proven by traffic through a real Envoy.

One harness for the module (tests/traffic_harness.py): the real control plane, a gateway Envoy it configures,
echo upstreams on 127.0.0.x. Each test uses its own hosts, so tests do not see each other's config.
The first four tests are the regressions of the bugs issue 10 opens with.
"""

from __future__ import annotations

import pytest

from tests.test_e2e_support import eventually
from tests.traffic_harness import (
    TrafficMesh,
    destination_rule,
    outbound,
    service_entry,
    virtual_service,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = TrafficMesh(tmp_path_factory.mktemp("traffic"))
    try:
        yield m
    finally:
        m.close()


def route_to(host: str, **extra) -> dict:
    return {"route": [{"destination": {"host": host}}], **extra}


# ------------------------------------------------------------------------------------------ the four bugs
def test_vs_timeout_gives_504_after_the_timeout(mesh: TrafficMesh):
    """`timeout: 0.5s` toward an upstream that answers after 2 s: 504 after about 0.5 s."""
    host = "timeout.traffic.test"
    slow = mesh.upstream("slow")
    slow.answer(delay=2.0)
    vs = virtual_service("timeout", host, [{"name": "timeout-0-5", "timeout": "0.5s", **route_to(host)}])
    mesh.apply(service_entry("timeout", host, [slow]), vs)
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(host), [slow])
    r = mesh.request(host)
    assert r.status == 504, (r.status, r.body)
    assert 0.4 <= r.seconds < 1.5, r.seconds
    # without a timeout the same upstream answers (the 504 was the VirtualService's doing)
    vs2 = virtual_service("timeout", host, [{"name": "no-timeout", **route_to(host)}])
    mesh.apply(vs2)
    mesh.wait_vs(vs2)
    r = mesh.request(host)
    assert r.status == 200 and r.seconds >= 1.9, (r.status, r.seconds)


def test_consistent_hash_header_sticks_to_one_endpoint(mesh: TrafficMesh):
    host = "hash.traffic.test"
    ups = [mesh.upstream(f"hash-{i}") for i in range(3)]
    vs = virtual_service("hash", host, [{"name": "hash", **route_to(host)}])
    dr = destination_rule("hash", host, {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}})
    mesh.apply(service_entry("hash", host, ups), vs, dr)
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(host), ups)
    mesh.wait_cluster(outbound(host), lambda c: c.get("lb_policy") == "RING_HASH", what="RING_HASH cluster")
    used = set()
    for user in range(12):
        got = mesh.spread(host, 6, {"x-user": f"user-{user}"})
        assert len(got) == 1, (user, got)  # every request of one user on one endpoint
        used.update(got)
    assert len(used) >= 2, used  # and the users spread over the endpoints (a hash, not one fixed host)


def test_outlier_detection_ejects_a_failing_endpoint(mesh: TrafficMesh):
    host = "outlier.traffic.test"
    good = [mesh.upstream(f"od-good-{i}") for i in range(2)]
    bad = mesh.upstream("od-bad")
    bad.answer(status=503)
    vs = virtual_service("outlier", host, [{"name": "outlier", "retries": {"attempts": 0}, **route_to(host)}])
    dr = destination_rule("outlier", host, {"outlierDetection": {
        "consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "60s", "maxEjectionPercent": 100}})
    mesh.apply(service_entry("outlier", host, [*good, bad]), vs, dr)
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(host), [*good, bad])
    mesh.wait_cluster(outbound(host), lambda c: "outlier_detection" in c, what="outlier detection on the cluster")
    first = mesh.spread(host, 30)
    assert 1 <= first["503"] <= 2, first  # two consecutive 5xx, then it is out
    eventually(lambda: "failed_outlier_check" in str(mesh.host_statuses(outbound(host))[bad.address]
                                                     .get("health_status")), what="bad endpoint ejected")
    before = len(bad.seen)
    after = mesh.spread(host, 30)
    assert after == {"od-good-0": after["od-good-0"], "od-good-1": after["od-good-1"]}, after
    assert len(bad.seen) == before


def test_connection_pool_overflows_with_uo(mesh: TrafficMesh):
    host = "pool.traffic.test"
    slow = mesh.upstream("pool-slow")
    slow.answer(delay=1.0)
    vs = virtual_service("pool", host, [{"name": "pool", **route_to(host)}])
    dr = destination_rule("pool", host, {"connectionPool": {"tcp": {"maxConnections": 1},
                                                            "http": {"http1MaxPendingRequests": 1}}})
    mesh.apply(service_entry("pool", host, [slow]), vs, dr)
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(host), [slow])
    mesh.wait_cluster(outbound(host), lambda c: "circuit_breakers" in c, what="circuit breakers on the cluster")
    replies = mesh.concurrent(host, 20, {"x-test": "pool"})
    codes = sorted(r.status for r in replies)
    assert codes.count(200) >= 1 and codes.count(503) >= 10, codes
    overflowed = [r for r in replies if r.status == 503]
    assert all(r.seconds < 0.9 for r in overflowed), [r.seconds for r in overflowed]  # refused at once
    eventually(lambda: sum(1 for e in mesh.log_entries()
                           if e.get("authority") == host and e.get("response_code") == 503
                           and "UO" in str(e.get("response_flags"))) >= 10,
               what="access-log lines with response flag UO")
    assert len(slow.seen) <= 20 - codes.count(503) + 1
