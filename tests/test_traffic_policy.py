"""Issue 10 item 1: VirtualService / DestinationRule behaviour proven by traffic through a real Envoy.

One harness for the module (tests/traffic_harness.py): the real control plane, a gateway Envoy it configures,
echo upstreams on 127.0.0.x. Each test uses its own hosts, so tests do not see each other's config.
The first four tests are the regressions of the bugs issue 10 opens with.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mizzen.services.cli.http import apply_objects
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


def live(mesh: TrafficMesh, entry: dict, vs: dict, ups: list) -> None:
    """Apply a service and its VirtualService, and wait until requests reach it."""
    mesh.apply(entry, vs)
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(vs["spec"]["hosts"][0]), ups)


# ------------------------------------------------------------------------------------------ the four bugs
# A user adds a DestinationRule to a service that already takes traffic: the cluster changes, its endpoints
# do not. Before the fix the new cluster stayed warming for ever (no EDS after the CDS change), so the old
# cluster, without the policy, kept serving: the three DestinationRule bugs of issue 10.
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
    live(mesh, service_entry("hash", host, ups), vs, ups)
    # the DestinationRule comes later, to a service already taking traffic (as a user adds one)
    mesh.apply(destination_rule("hash", host, {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}))
    mesh.wait_policy(outbound(host), lambda c: c.get("lb_policy") == "RING_HASH", what="RING_HASH cluster")
    mesh.wait_routes(host, lambda rs: "hash_policy" in str(rs), what="the route's hash policy")
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
    live(mesh, service_entry("outlier", host, [*good, bad]), vs, [*good, bad])
    mesh.apply(destination_rule("outlier", host, {"outlierDetection": {
        "consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "60s", "maxEjectionPercent": 100}}))
    mesh.wait_policy(outbound(host), lambda c: "outlier_detection" in c, what="outlier detection on the cluster")
    first = mesh.spread(host, 30)
    assert 1 <= first["503"] <= 2, first  # two consecutive 5xx, then it is out
    assert "failed_outlier_check" in str(mesh.host_statuses(outbound(host))[bad.address].get("health_status"))
    before = len(bad.seen)
    after = mesh.spread(host, 30)
    assert after == {"od-good-0": after["od-good-0"], "od-good-1": after["od-good-1"]}, after
    assert len(bad.seen) == before


def test_connection_pool_overflows_with_uo(mesh: TrafficMesh):
    host = "pool.traffic.test"
    slow = mesh.upstream("pool-slow")
    slow.answer(delay=1.0)
    vs = virtual_service("pool", host, [{"name": "pool", **route_to(host)}])
    live(mesh, service_entry("pool", host, [slow]), vs, [slow])
    mesh.apply(destination_rule("pool", host, {"connectionPool": {"tcp": {"maxConnections": 1},
                                                                  "http": {"http1MaxPendingRequests": 1}}}))
    mesh.wait_policy(outbound(host), lambda c: c["circuit_breakers"]["thresholds"][0].get("max_connections") == 1,
                     what="circuit breakers on the cluster")
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


# ------------------------------------------------------------------------------------------ the audit
def versioned(mesh: TrafficMesh, name: str, host: str, versions: list[str]) -> list:
    """Upstreams `<name>-<version>` behind `host`, labelled `version: <v>`, with a DR subset per version."""
    ups = [mesh.upstream(f"{name}-{v}", version=v) for v in versions]
    mesh.apply(service_entry(name, host, ups, labels=[{"version": v} for v in versions]),
               destination_rule(name, host, subsets=[{"name": v, "labels": {"version": v}} for v in versions]))
    return ups


def to(host: str, subset: str | None = None, weight: int | None = None, **extra) -> dict:
    d: dict = {"destination": {"host": host, **({"subset": subset} if subset else {})}, **extra}
    if weight is not None:
        d["weight"] = weight
    return d


def test_weighted_split_between_subsets(mesh: TrafficMesh):
    host = "split.traffic.test"
    v1, v2 = versioned(mesh, "split", host, ["v1", "v2"])
    vs = virtual_service("split", host, [{"name": "split", "route": [to(host, "v1", 75), to(host, "v2", 25)]}])
    mesh.apply(vs)
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(host, subset="v2"), [v2])
    mesh.wait_hosts(outbound(host, subset="v1"), [v1])
    n = 400
    got = mesh.spread(host, n)
    assert set(got) == {"split-v1", "split-v2"}, got
    assert 0.18 <= got["split-v2"] / n <= 0.32, got  # 25 % ± 3 standard deviations


def test_matches_pick_the_route(mesh: TrafficMesh):
    host = "match.traffic.test"
    versioned(mesh, "match", host, ["v1", "v2", "v3"])
    rules = [
        {"name": "m-header", "match": [{"headers": {"x-variant": {"exact": "b"}}}], "route": [to(host, "v2")]},
        {"name": "m-without", "match": [{"uri": {"exact": "/without"}, "withoutHeaders": {"x-skip": {}}}],
         "route": [to(host, "v3")]},
        {"name": "m-method", "match": [{"method": {"exact": "POST"}}], "route": [to(host, "v3")]},
        {"name": "m-regex", "match": [{"uri": {"regex": "/items/[0-9]+"}}], "route": [to(host, "v2")]},
        {"name": "m-exact", "match": [{"uri": {"exact": "/exact"}}], "route": [to(host, "v3")]},
        {"name": "m-prefix-ci", "match": [{"uri": {"prefix": "/admin"}, "ignoreUriCase": True}],
         "route": [to(host, "v3")]},
        {"name": "m-query", "match": [{"queryParams": {"debug": {"exact": "1"}}}], "route": [to(host, "v2")]},
        {"name": "m-default", "route": [to(host, "v1")]},
    ]
    vs = virtual_service("match", host, rules)
    mesh.apply(vs)
    mesh.wait_vs(vs)
    for v in ("v1", "v2", "v3"):
        mesh.wait_cluster(outbound(host, subset=v))
    cases = [
        ("GET", "/", {}, "match-v1"),
        ("GET", "/", {"x-variant": "b"}, "match-v2"),
        ("GET", "/", {"x-variant": "c"}, "match-v1"),
        ("GET", "/without", {}, "match-v3"),
        ("GET", "/without", {"x-skip": "1"}, "match-v1"),
        ("POST", "/", {"content-length": "0"}, "match-v3"),
        ("GET", "/items/42", {}, "match-v2"),
        ("GET", "/items/x", {}, "match-v1"),
        ("GET", "/exact", {}, "match-v3"),
        ("GET", "/exact/more", {}, "match-v1"),
        ("GET", "/ADMIN/panel", {}, "match-v3"),
        ("GET", "/?debug=1", {}, "match-v2"),
        ("GET", "/?debug=2", {}, "match-v1"),
    ]
    got = [(m, p, h, mesh.request(host, p, h, method=m).who) for m, p, h, _ in cases]
    assert got == cases


def test_rewrite_uri_and_authority(mesh: TrafficMesh):
    host = "rewrite.traffic.test"
    (up,) = versioned(mesh, "rewrite", host, ["v1"])
    vs = virtual_service("rewrite", host, [
        {"name": "rw", "match": [{"uri": {"prefix": "/old"}}], "rewrite": {"uri": "/new", "authority": "moved.test"},
         "route": [to(host)]},
        {"name": "rw-default", "route": [to(host)]}])
    mesh.apply(vs)
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(host), [up])
    r = mesh.request(host, "/old/page?q=1")
    assert r.status == 200 and r.body["path"] == "/new/page" and r.body["query"] == {"q": "1"}, r.body
    assert r.body["headers"]["host"] == "moved.test"
    r = mesh.request(host, "/other")
    assert r.body["path"] == "/other" and r.body["headers"]["host"] == host


def test_redirect_and_direct_response(mesh: TrafficMesh):
    host = "redirect.traffic.test"
    vs = virtual_service("redirect", host, [
        {"name": "r-302", "match": [{"uri": {"prefix": "/temp"}}],
         "redirect": {"uri": "/elsewhere", "authority": "other.test", "redirectCode": 302}},
        {"name": "r-301", "match": [{"uri": {"exact": "/perm"}}], "redirect": {"uri": "/moved"}},
        {"name": "r-direct", "directResponse": {"status": 418, "body": {"string": "short and stout"}}}])
    mesh.apply(vs)
    mesh.wait_vs(vs)
    r = mesh.request(host, "/temp")
    assert r.status == 302 and r.headers["location"] == "http://other.test/elsewhere", (r.status, r.headers)
    r = mesh.request(host, "/perm")
    assert r.status == 301 and r.headers["location"] == f"http://{host}/moved", (r.status, r.headers)
    r = mesh.request(host, "/anything")
    assert r.status == 418 and r.body == "short and stout"


def test_retries_count_upstream_attempts(mesh: TrafficMesh):
    host = "retry.traffic.test"
    failing = mesh.upstream("retry-fail")
    failing.answer(status=503)
    vs = virtual_service("retry", host, [
        {"name": "retry-3", "match": [{"uri": {"prefix": "/three"}}],
         "retries": {"attempts": 3, "retryOn": "5xx"}, "route": [to(host)]},
        {"name": "retry-0", "match": [{"uri": {"prefix": "/none"}}], "retries": {"attempts": 0}, "route": [to(host)]},
        {"name": "retry-pertry", "match": [{"uri": {"prefix": "/slow"}}],
         "retries": {"attempts": 2, "perTryTimeout": "0.3s", "retryOn": "5xx"}, "route": [to(host)]},
        {"name": "retry-default", "route": [to(host)]}])
    mesh.apply(service_entry("retry", host, [failing]), vs)
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(host), [failing])
    for path, marker, attempts in (("/three", "a", 4), ("/none", "b", 1), ("/default", "c", 3)):
        r = mesh.request(host, path, {"x-try": marker})
        assert r.status == 503, r.status
        assert failing.hits(x_try=marker) == attempts, (path, failing.hits(x_try=marker))
    # per-try timeout: each of 3 attempts gives up after 0.3 s (the upstream would take 2 s), then 504
    failing.answer(status=None, delay=2.0)
    r = mesh.request(host, "/slow", {"x-try": "d"})
    assert r.status == 504 and 0.8 <= r.seconds < 1.8, (r.status, r.seconds)
    eventually(lambda: failing.hits(x_try="d") == 3, timeout=5, what="3 attempts of the per-try-timeout route")


def test_fault_delay_and_abort(mesh: TrafficMesh):
    host = "fault.traffic.test"
    (up,) = versioned(mesh, "fault", host, ["v1"])
    vs = virtual_service("fault", host, [
        {"name": "f-delay", "match": [{"uri": {"prefix": "/delay"}}],
         "fault": {"delay": {"fixedDelay": "0.5s", "percentage": {"value": 100}}}, "route": [to(host)]},
        {"name": "f-abort", "match": [{"uri": {"prefix": "/abort"}}],
         "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 50}}}, "route": [to(host)]},
        {"name": "f-none", "route": [to(host)]}])
    mesh.apply(vs)
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(host), [up])
    r = mesh.request(host, "/delay")
    assert r.status == 200 and 0.45 <= r.seconds < 1.5, (r.status, r.seconds)
    assert mesh.request(host, "/plain").seconds < 0.4
    n = 200
    got = mesh.spread(host, n, path="/abort")
    assert set(got) == {"fault-v1", "418"}, got
    assert 0.39 <= got["418"] / n <= 0.61, got  # 50 % ± 3 standard deviations
    assert up.hits() >= got["fault-v1"]


def test_mirror_copies_requests(mesh: TrafficMesh):
    host, shadow = "mirror.traffic.test", "shadow.traffic.test"
    main, copy = mesh.upstream("mirror-main"), mesh.upstream("mirror-copy")
    vs = virtual_service("mirror", host, [{"name": "mirror", "route": [to(host)], "mirror": {"host": shadow},
                                           "mirrorPercentage": {"value": 100}}])
    mesh.apply(service_entry("mirror", host, [main]), service_entry("shadow", shadow, [copy]), vs)
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(host), [main])
    mesh.wait_hosts(outbound(shadow), [copy])
    for i in range(5):
        assert mesh.request(host, headers={"x-mirror": str(i)}).who == "mirror-main"
    eventually(lambda: all(copy.hits(x_mirror=str(i)) == 1 for i in range(5)), timeout=10,
               what="every request mirrored once")
    assert {s["headers"]["host"] for s in copy.seen} == {f"{host}-shadow"}  # Envoy's shadow host


def test_header_manipulation(mesh: TrafficMesh):
    host = "headers.traffic.test"
    (up,) = versioned(mesh, "headers", host, ["v1"])
    vs = virtual_service("headers", host, [{
        "name": "headers",
        "headers": {"request": {"set": {"x-set": "route"}, "add": {"x-added": "yes"}, "remove": ["x-drop"]},
                    "response": {"set": {"x-resp": "r"}, "remove": ["x-envoy-upstream-service-time"]}},
        "route": [to(host, headers={"request": {"set": {"x-dest": "d"}}, "response": {"add": {"x-dest-resp": "dr"}}})],
    }])
    mesh.apply(vs)
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(host), [up])
    r = mesh.request(host, headers={"x-set": "client", "x-drop": "secret", "x-keep": "k"})
    seen = r.body["headers"]
    assert seen["x-set"] == "route" and seen["x-added"] == "yes" and seen["x-dest"] == "d", seen
    assert "x-drop" not in seen and seen["x-keep"] == "k"
    assert r.headers["x-resp"] == "r" and r.headers["x-dest-resp"] == "dr", r.headers
    assert "x-envoy-upstream-service-time" not in r.headers


def test_cors(mesh: TrafficMesh):
    host = "cors.traffic.test"
    (up,) = versioned(mesh, "cors", host, ["v1"])
    vs = virtual_service("cors", host, [{"name": "cors", "route": [to(host)], "corsPolicy": {
        "allowOrigins": [{"exact": "https://ok.test"}], "allowMethods": ["GET", "POST"],
        "allowHeaders": ["x-custom"], "exposeHeaders": ["x-exposed"], "maxAge": "1h", "allowCredentials": True}}])
    mesh.apply(vs)
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(host), [up])
    pre = {"origin": "https://ok.test", "access-control-request-method": "POST"}
    r = mesh.request(host, headers=pre, method="OPTIONS")
    assert r.status == 200 and r.headers.get("access-control-allow-origin") == "https://ok.test", r.headers
    assert r.headers["access-control-allow-methods"] == "GET,POST"
    assert r.headers["access-control-allow-headers"] == "x-custom" and r.headers["access-control-max-age"] == "3600"
    assert r.headers["access-control-allow-credentials"] == "true"
    assert up.hits(origin="https://ok.test") == 0  # the preflight was answered by Envoy
    r = mesh.request(host, headers={**pre, "origin": "https://evil.test"}, method="OPTIONS")
    assert "access-control-allow-origin" not in r.headers, r.headers
    r = mesh.request(host, headers={"origin": "https://ok.test"})
    assert r.status == 200 and r.headers["access-control-allow-origin"] == "https://ok.test"
    assert r.headers["access-control-expose-headers"] == "x-exposed"


def test_simple_load_balancers(mesh: TrafficMesh):
    host = "lb.traffic.test"
    ups = [mesh.upstream(f"lb-{i}") for i in range(3)]
    vs = virtual_service("lb", host, [{"name": "lb", **route_to(host)}])
    mesh.apply(service_entry("lb", host, ups), vs,
               destination_rule("lb", host, {"loadBalancer": {"simple": "ROUND_ROBIN"}}))
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(host), ups)
    mesh.wait_cluster(outbound(host), lambda c: c.get("lb_policy", "ROUND_ROBIN") == "ROUND_ROBIN")
    got = mesh.spread(host, 30)
    assert got == {"lb-0": 10, "lb-1": 10, "lb-2": 10}, got  # strict rotation (one worker)
    for policy, envoy_policy in (("RANDOM", "RANDOM"), ("LEAST_REQUEST", "LEAST_REQUEST")):
        mesh.apply(destination_rule("lb", host, {"loadBalancer": {"simple": policy}}))
        mesh.wait_cluster(outbound(host), lambda c, p=envoy_policy: c.get("lb_policy") == p, what=policy)
        got = mesh.spread(host, 60)
        assert set(got) == {"lb-0", "lb-1", "lb-2"}, (policy, got)
    # LEAST_REQUEST avoids a busy endpoint: lb-0 holds every request 1.5 s, requests arrive every 30 ms. Once
    # lb-0 is busy, Envoy's two random choices pick it only when both fall on it (1/9): ~4 of 30 expected,
    # where ROUND_ROBIN would give it 10.
    ups[0].answer(delay=1.5)
    def staggered(i: int):
        time.sleep(i * 0.03)
        return mesh.request(host)

    with ThreadPoolExecutor(30) as pool:
        replies = list(pool.map(staggered, range(30)))
    slow = sum(1 for r in replies if r.who == "lb-0")
    assert slow <= 8 and all(r.status == 200 for r in replies), [r.who for r in replies]


def test_gateway_host_and_port_routing(mesh: TrafficMesh):
    from mizzen.services.mesh import procs

    host = "gw2.traffic.test"
    (up,) = versioned(mesh, "gw2", host, ["v1"])
    port2 = procs.free_port()
    gw2 = {"apiVersion": "networking.istio.io/v1beta1", "kind": "Gateway",
           "metadata": {"name": "traffic-gw2", "namespace": "default"},
           "spec": {"selector": {"istio": "ingressgateway"},
                    "servers": [{"port": {"number": port2, "name": "http2", "protocol": "HTTP"},
                                 "bind": "127.0.0.1", "hosts": [host]}]}}
    vs = virtual_service("gw2", host, [{"name": "gw2", "route": [to(host)]}])
    vs["spec"]["gateways"] = ["traffic-gw2"]
    mesh.apply(gw2, vs)
    from tests.traffic_harness import port_open

    eventually(lambda: port_open(port2), what="the second Gateway's port")
    mesh.wait_hosts(outbound(host), [up])
    other = TrafficMesh.request.__get__(mesh)  # same client, other port below

    def on(port: int, h: str):
        saved = mesh.port
        mesh.port = port
        try:
            return other(h)
        finally:
            mesh.port = saved

    assert eventually(lambda: on(port2, host).who == "gw2-v1", what="gw2 host on its port")
    assert on(port2, "match.traffic.test").status == 404  # a host the server does not expose
    assert on(mesh.port, host).status == 404  # the VirtualService is bound to traffic-gw2 only


def test_tls_origination_simple(mesh: TrafficMesh):
    host = "tls-origin.traffic.test"
    up = mesh.tls_upstream("tls-up", "secure.upstream.test")
    vs = virtual_service("tlsorigin", host, [{"name": "tls-origin", "route": [to(host)]}])
    mesh.apply(service_entry("tlsorigin", host, [up]), vs)
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(host), [up])
    r = mesh.request(host)
    assert r.status in (502, 503) and up.hits() == 0, r.status  # plain HTTP to a TLS server fails
    mesh.apply(destination_rule("tlsorigin", host, {"tls": {"mode": "SIMPLE", "sni": "secure.upstream.test"}}))
    mesh.wait_cluster(outbound(host), lambda c: "transport_socket" in c, what="TLS transport socket")
    r = eventually(lambda: (r := mesh.request(host)).status == 200 and r, what="a request over TLS")
    assert r.who == "tls-up" and "secure.upstream.test" in up.snis, (r.status, up.snis)


@pytest.mark.parametrize("field", ["consecutiveGatewayErrors", "consecutiveErrors"])
def test_gateway_errors_eject_only_on_502_503_504(mesh: TrafficMesh, field: str):
    """consecutiveGatewayErrors (with consecutive5xxErrors: 0, else Envoy's default of 5 consecutive 5xx also
    ejects, as in Istio) and the deprecated consecutiveErrors (which Istio maps to gateway errors alone) count
    502, 503 and 504 only: an endpoint answering 500 stays, one answering 502 is ejected."""
    host = f"gwerr-{field.lower()}.traffic.test"
    good, e500, e502 = (mesh.upstream(f"ge-{field[-6:]}-{x}") for x in ("good", "500", "502"))
    e500.answer(status=500)
    e502.answer(status=502)
    vs = virtual_service(f"gwerr-{field.lower()}", host, [{"name": "gwerr", "retries": {"attempts": 0},
                                                          **route_to(host)}])
    dr = destination_rule(f"gwerr-{field.lower()}", host, {"outlierDetection": {
        field: 2, **({"consecutive5xxErrors": 0} if field == "consecutiveGatewayErrors" else {}),
        "interval": "1s", "baseEjectionTime": "60s", "maxEjectionPercent": 100}})
    mesh.apply(service_entry(f"gwerr-{field.lower()}", host, [good, e500, e502]), vs, dr)
    mesh.wait_vs(vs)
    mesh.wait_hosts(outbound(host), [good, e500, e502])
    mesh.wait_cluster(outbound(host), lambda c: "outlier_detection" in c)
    mesh.spread(host, 30)
    health = {a: str(h.get("health_status")) for a, h in mesh.host_statuses(outbound(host)).items()}
    assert "failed_outlier_check" in health[e502.address], health
    assert "failed_outlier_check" not in health[e500.address], health
    got = mesh.spread(host, 30)
    assert set(got) == {good.name, "500"} and got["500"] >= 5, got


# ------------------------------------------------------------------------------------------ conflicts
def test_two_virtual_services_for_one_host_merge_oldest_first(mesh: TrafficMesh):
    """istiod's rule for a gateway: routes of every VirtualService of the host, the oldest's first, catch-alls
    last. The younger one is named `a-…` so that name order alone would pick it: creation time decides."""
    host = "conflict.traffic.test"
    old_up, new_up = mesh.upstream("conflict-old"), mesh.upstream("conflict-new")
    mesh.apply(service_entry("conflict-old", "old.conflict.traffic.test", [old_up]),
               service_entry("conflict-new", "new.conflict.traffic.test", [new_up]))
    older = virtual_service("z-conflict-older", host, [
        {"name": "old-all", "route": [{"destination": {"host": "old.conflict.traffic.test"}}]}])
    mesh.apply(older)
    mesh.wait_vs(older)
    time.sleep(1.1)  # creation times have whole seconds
    newer = virtual_service("a-conflict-newer", host, [
        {"name": "new-only", "match": [{"uri": {"prefix": "/new"}}],
         "route": [{"destination": {"host": "new.conflict.traffic.test"}}]},
        {"name": "new-all", "route": [{"destination": {"host": "new.conflict.traffic.test"}}]}])
    result = apply_objects(mesh.stack.registry_url, [newer])
    [warning] = result["warnings"]
    assert [(e["field"], e["code"]) for e in warning["errors"]] == [("spec.hosts[0]", "MZN0003")]
    assert "routes are merged, default/z-conflict-older's (the oldest) first" in warning["errors"][0]["message"]
    mesh.wait_vs(newer)
    assert [r["name"] for r in mesh.route_for(host)] == ["new-only", "old-all", "new-all"]
    mesh.wait_hosts(outbound("old.conflict.traffic.test"), [old_up])
    mesh.wait_hosts(outbound("new.conflict.traffic.test"), [new_up])
    assert mesh.spread(host, 4) == {"conflict-old": 4}  # the older catch-all serves
    assert mesh.spread(host, 4, path="/new/x") == {"conflict-new": 4}  # the younger one's specific route too
    # the older one goes: the younger takes the host over
    mesh.delete(older)
    mesh.wait_routes(host, lambda rs: [r["name"] for r in rs] == ["new-only", "new-all"], what="only newer's routes")
    assert mesh.spread(host, 4) == {"conflict-new": 4}
