"""logsink joins: the recorded A→B→C chain (lines real Envoy sidecars wrote, see logsink_data/meshrig.py)
becomes one trace per request with the right parents; retries, reused connections, traceparent, TCP, the wait
window and the memory bound."""

from __future__ import annotations

import hashlib
import random

import orjson

from mizzen.services.logsink.identity import Source
from mizzen.services.logsink.pipeline import Pipeline
from tests.logsink_data.helpers import Collected, by_end_time, chain_lines, chain_sources, ns, run_lines

CLIENT, SERVER = 3, 2
UNSET, ERROR = 0, 2


def index(spans):
    return {s.span_id: s for s in spans}


def find(spans, service, kind, path):
    hits = [s for s in spans if s.service == service and s.kind == kind
            and (s.attributes.get("url.path") == path or str(s.attributes.get("url.full", "")).endswith(path))]
    assert len(hits) == 1, (service, kind, path, hits)
    return hits[0]


def test_recorded_chain_exact():
    spans, p = run_lines(by_end_time(chain_lines(), chain_sources()), window=1.0)
    assert p.stats.bad_total == 0
    check_recorded_chain(spans)
    assert p.joiner.stats["connection"] == 7 and p.joiner.stats["same_pod"] == 3 and p.joiner.stats["root"] == 5


def check_recorded_chain(spans) -> None:
    """The exact spans of logsink_data/chain/*.jsonl read with the sidecars' proxy ids (also used by the test
    that goes through the service and a real OTLP gRPC receiver)."""
    assert len(spans) == 15
    by_id = index(spans)
    rid = {"/ok": "3415cd0f5c5b4e7a877dbb0ebc1c2b85", "/missing": "9a007c2e6c9940678f165713df176081",
           "/fail": "1913ca5bb0e043b1b66bfdf1f621d0db"}
    # (path, method, A client start, dur, B server start, dur, B client start, dur, C server start, dur, code)
    expected = [
        ("/ok", "GET", ".221", 5, ".222", 4, ".223", 1, ".224", 0, 200),
        ("/missing", "GET", ".278", 3, ".278", 2, ".279", 1, ".280", 0, 404),
        ("/fail", "POST", ".334", 8, ".335", 8, ".340", 0, ".341", 0, 503),
    ]
    for path, method, a_st, a_d, bs_st, bs_d, bc_st, bc_d, cs_st, cs_d, code in expected:
        a = find(spans, "a.default", CLIENT, path)
        bs = find(spans, "b.default", SERVER, path)
        bc = find(spans, "b.default", CLIENT, path)
        cs = find(spans, "c.default", SERVER, path)
        # one trace per request: the x-request-id
        assert {a.trace_id, bs.trace_id, bc.trace_id, cs.trace_id} == {rid[path]}
        # A's sidecar → B's sidecar → B's app → B's sidecar → C's sidecar
        assert a.parent_span_id == ""
        assert by_id[bs.parent_span_id] is a
        assert by_id[bc.parent_span_id] is bs
        assert by_id[cs.parent_span_id] is bc
        assert bs.attributes["mizzen.parent.source"] == "connection"
        assert bc.attributes["mizzen.parent.source"] == "same_pod"
        assert cs.attributes["mizzen.parent.source"] == "connection"
        assert "mizzen.parent.source" not in a.attributes
        for s, st, dur in ((a, a_st, a_d), (bs, bs_st, bs_d), (bc, bc_st, bc_d), (cs, cs_st, cs_d)):
            assert s.name == method
            assert s.start == ns("2026-11-25T13:27:29" + st + "Z")
            assert s.end == s.start + dur * 1_000_000
            assert s.attributes["http.response.status_code"] == code
        # status: 5xx is an error everywhere; 4xx only where the client sees it
        client_status = ERROR if code >= 400 else UNSET
        server_status = ERROR if code >= 500 else UNSET
        assert (a.status_code, bc.status_code) == (client_status, client_status)
        assert (bs.status_code, cs.status_code) == (server_status, server_status)
        assert a.attributes.get("error.type") == (str(code) if code >= 400 else None)
        assert cs.attributes.get("error.type") == (str(code) if code >= 500 else None)
        # the server span's flags say its parent is remote; the same-pod client span's do not
        assert bs.flags == 0x301 and cs.flags == 0x301 and bc.flags == 0x101 and a.flags == 0x101
        assert a.attributes["url.full"] == f"http://b.default.svc.cluster.local{path}"
        assert bc.attributes["url.full"] == f"http://c.default.svc.cluster.local{path}"
        assert cs.attributes["url.path"] == path and cs.attributes["client.address"] == "127.0.0.3"
        assert a.attributes["service.peer.name"] == "b.default" and bc.attributes["service.peer.name"] == "c.default"
        assert bs.resource["k8s.pod.name"] == "b-5f6d8c9b7c-q9w8z"

    # the call to `down`: connection refused, Istio's retries exhausted
    down = [s for s in spans if s.trace_id == "848e6f41aa8a473d8523d2d385dd93c8"]
    assert len(down) == 1
    d = down[0]
    assert (d.kind, d.parent_span_id, d.status_code) == (CLIENT, "", ERROR)
    assert d.attributes["error.type"] == "503"
    assert d.attributes["envoy.response_flags"] == "URX,UF"
    assert d.attributes["envoy.response_flags_long"] == "UpstreamRetryLimitExceeded,UpstreamConnectionFailure"
    assert d.attributes["envoy.upstream_transport_failure_reason"] == "delayed_connect_error:_Connection_refused"
    assert d.start == ns("2026-11-25T13:27:29.395Z") and d.end - d.start == 36_000_000

    # the TCP connection A → C:9000: client and server side of one connection
    tcp = [s for s in spans if s.attributes.get("network.transport") == "tcp"]
    assert len(tcp) == 2
    tc = next(s for s in tcp if s.kind == CLIENT)
    ts = next(s for s in tcp if s.kind == SERVER)
    assert tc.name == "TCP outbound|9000||c.default.svc.cluster.local" and tc.service == "a.default"
    assert ts.name == "TCP inbound|9000||" and ts.service == "c.default"
    assert ts.parent_span_id == tc.span_id and tc.parent_span_id == ""
    key = f"tcp|127.0.0.2:58842|127.0.0.4:15016|{ns('2026-11-25T13:27:29.484Z')}".encode()
    assert tc.trace_id == ts.trace_id == hashlib.blake2b(key, digest_size=16).hexdigest()
    assert tc.attributes["envoy.bytes_sent"] == 5 and ts.attributes["envoy.bytes_received"] == 5


def _shape(spans):
    ids = index(spans)
    return sorted((s.span_id, s.trace_id, s.parent_span_id, s.service, ids[s.parent_span_id].span_id
                   if s.parent_span_id else "") for s in spans)


def test_chain_is_the_same_in_any_arrival_order():
    base = by_end_time(chain_lines(), chain_sources())
    want = _shape(run_lines(base, window=1.0)[0])
    rng = random.Random(6)
    for order in [list(reversed(base))] + [rng.sample(base, len(base)) for _ in range(5)]:
        assert _shape(run_lines(order, window=1.0)[0]) == want


def test_chain_without_identities_learns_services_from_the_lines():
    """No proxy ids: the server side is named by the service its caller addressed (the pod IP the client line's
    upstream_host names), B's client side by its pod IP, and A stays an unknown caller identified by its IP."""
    spans, _ = run_lines(by_end_time(chain_lines(), chain_sources(with_proxy=False)), window=1.0)
    services = {(s.service, s.kind) for s in spans}
    assert services == {("unknown_service:127.0.0.2", CLIENT), ("b.default", SERVER), ("b.default", CLIENT),
                        ("c.default", SERVER)}
    ids = index(spans)
    bc = find(spans, "b.default", CLIENT, "/ok")
    assert ids[bc.parent_span_id].service == "b.default" and ids[bc.parent_span_id].kind == SERVER


def line(**kw) -> bytes:
    base = {"method": "GET", "path": "/", "protocol": "HTTP/1.1", "response_code": 200, "response_flags": "-",
            "bytes_received": 0, "bytes_sent": 1, "authority": "svc"}
    base.update(kw)
    return orjson.dumps(base)


def test_retry_on_another_connection_joins_by_request_id():
    rid = "0f0e0d0c-0b0a-4908-8706-050403020100"
    client = line(start_time="2024-01-01T00:00:00.000Z", duration=50, request_id=rid, response_code=200,
                  response_flags="URX", upstream_cluster="outbound|80||web.default.svc.cluster.local",
                  upstream_local_address="10.0.0.1:5002", upstream_host="10.0.0.3:8080",
                  downstream_remote_address="10.0.0.1:4000", downstream_local_address="10.96.0.9:80")
    failed_attempt = line(start_time="2024-01-01T00:00:00.001Z", duration=5, request_id=rid, response_code=503,
                          upstream_cluster="inbound|8080||", downstream_remote_address="10.0.0.1:5001",
                          downstream_local_address="10.0.0.2:8080", upstream_host="10.0.0.2:8080")
    good_attempt = line(start_time="2024-01-01T00:00:00.030Z", duration=10, request_id=rid, response_code=200,
                        upstream_cluster="inbound|8080||", downstream_remote_address="10.0.0.1:5002",
                        downstream_local_address="10.0.0.3:8080", upstream_host="10.0.0.3:8080")
    src = Source("t")
    spans, _ = run_lines([(failed_attempt, src), (good_attempt, src), (client, src)], window=0.5)
    ids = index(spans)
    c = next(s for s in spans if s.kind == CLIENT)
    servers = [s for s in spans if s.kind == SERVER]
    assert len(servers) == 2 and all(ids[s.parent_span_id] is c for s in servers)
    how = {s.attributes["http.response.status_code"]: s.attributes["mizzen.parent.source"] for s in servers}
    assert how == {503: "request_id", 200: "connection"}


def test_two_calls_with_one_request_id_on_one_connection():
    """B's app calls C twice while serving one request, over one keep-alive connection: time decides."""
    rid = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
    common = dict(request_id=rid, upstream_cluster="outbound|80||c.default.svc.cluster.local",
                  upstream_local_address="10.0.0.2:6000", upstream_host="10.0.0.3:8080",
                  downstream_remote_address="10.0.0.2:7000", downstream_local_address="10.96.0.3:80")
    inbound = dict(request_id=rid, upstream_cluster="inbound|8080||", downstream_remote_address="10.0.0.2:6000",
                   downstream_local_address="10.0.0.3:8080", upstream_host="10.0.0.3:8080")
    c1 = line(start_time="2024-01-01T00:00:00.100Z", duration=10, path="/one", **common)
    s1 = line(start_time="2024-01-01T00:00:00.102Z", duration=6, path="/one", **inbound)
    c2 = line(start_time="2024-01-01T00:00:00.120Z", duration=10, path="/two", **common)
    s2 = line(start_time="2024-01-01T00:00:00.122Z", duration=6, path="/two", **inbound)
    src = Source("t")
    for order in ([s1, c1, s2, c2], [s2, s1, c2, c1], [c2, c1, s1, s2]):
        spans, _ = run_lines([(x, src) for x in order], window=0.5)
        ids = index(spans)
        for path in ("/one", "/two"):
            server = next(s for s in spans if s.kind == SERVER and s.attributes["url.path"] == path)
            assert ids[server.parent_span_id].attributes["url.full"].endswith(path)


def test_traceparent_from_the_application():
    """With W3C context in the log (%REQ(TRACEPARENT)%), spans join the application's trace: a client line
    whose app made its own span hangs under that span; one whose app only forwarded the header hangs under
    the sidecar's server span."""
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    inbound = dict(request_id="12345678-1234-4234-8234-123456789abc", upstream_cluster="inbound|8080||",
                   downstream_remote_address="10.0.0.1:5000", downstream_local_address="10.0.0.2:8080")
    outbound = dict(request_id="12345678-1234-4234-8234-123456789abc",
                    upstream_cluster="outbound|80||c.default.svc.cluster.local",
                    upstream_local_address="10.0.0.2:6000", upstream_host="10.0.0.3:8080",
                    downstream_remote_address="10.0.0.2:7000")
    server = line(start_time="2024-01-01T00:00:00.000Z", duration=20, traceparent=f"00-{tid}-1111111111111111-01",
                  **inbound)
    own_span = line(start_time="2024-01-01T00:00:00.005Z", duration=5, traceparent=f"00-{tid}-2222222222222222-01",
                    path="/own", **outbound)
    forwarded = line(start_time="2024-01-01T00:00:00.011Z", duration=5,
                     traceparent=f"00-{tid}-1111111111111111-01", path="/fwd", **outbound)
    src = Source("t")
    spans, _ = run_lines([(own_span, src), (forwarded, src), (server, src)], window=0.5)
    assert {s.trace_id for s in spans} == {tid}
    srv = next(s for s in spans if s.kind == SERVER)
    own = next(s for s in spans if s.attributes.get("url.full", "").endswith("/own"))
    fwd = next(s for s in spans if s.attributes.get("url.full", "").endswith("/fwd"))
    assert srv.parent_span_id == "1111111111111111"  # the calling application's span
    assert own.parent_span_id == "2222222222222222"
    assert fwd.parent_span_id == srv.span_id


def test_unmatched_line_waits_for_the_window_then_is_a_root():
    out = Collected()
    p = Pipeline(out, window=2.0)
    server = line(start_time="2024-01-01T00:00:00.000Z", duration=5, request_id="r-1",
                  upstream_cluster="inbound|80||", downstream_remote_address="10.0.0.1:1",
                  downstream_local_address="10.0.0.2:80")
    p.feed_line(server, Source("t"), now=100.0)
    p.tick(101.9)
    p.flush_batch()
    assert out.spans() == []
    assert p.joiner.pending == 1
    p.tick(102.0)
    p.flush_batch()
    spans = out.spans()
    assert len(spans) == 1 and spans[0].parent_span_id == "" and p.joiner.pending == 0
    assert p.joiner.live == 0 and not p.joiner.groups


def test_memory_is_bounded():
    out = Collected()
    p = Pipeline(out, window=3600.0, max_records=100)
    peak = 0
    for i in range(1000):
        raw = line(start_time="2024-01-01T00:00:00.000Z", duration=1, request_id=f"req-{i}",
                   upstream_cluster="outbound|80||x.default.svc.cluster.local", upstream_local_address=f"10.0.0.1:{i}")
        p.feed_line(raw, Source("t"), now=float(i) * 0.001)
        peak = max(peak, p.joiner.live)
    assert peak <= 100
    p.flush()
    assert len(out.spans()) == 1000
    assert p.joiner.stats["early"] == 900


def test_one_request_id_on_many_lines_is_bounded():
    """Some clients send a constant x-request-id; one group must not grow without bound."""
    out = Collected()
    p = Pipeline(out, window=3600.0)
    for i in range(2000):
        raw = line(start_time="2024-01-01T00:00:00.000Z", duration=1, request_id="constant",
                   upstream_cluster="outbound|80||x.default.svc.cluster.local", upstream_local_address=f"10.0.0.1:{i}")
        p.feed_line(raw, Source("t"), now=0.0)
    assert max(len(g) for g in p.joiner.groups.values()) <= p.joiner.max_group
    p.flush()
    assert len(out.spans()) == 2000


def test_identical_timing_on_one_host_makes_no_cycle():
    """On one host with sub-millisecond calls, a client and its server have the same start and end; the joiner
    must not make them each other's parent."""
    rid = "99999999-9999-4999-8999-999999999999"
    client = line(start_time="2024-01-01T00:00:00.000Z", duration=0, request_id=rid,
                  upstream_cluster="outbound|80||b.default.svc.cluster.local",
                  upstream_local_address="10.0.0.1:5000", upstream_host="10.0.0.1:8080",
                  downstream_remote_address="10.0.0.1:4000")
    server = line(start_time="2024-01-01T00:00:00.000Z", duration=0, request_id=rid, upstream_cluster="inbound|8080||",
                  downstream_remote_address="10.0.0.1:5000", downstream_local_address="10.0.0.1:8080")
    for order in ([client, server], [server, client]):
        spans, _ = run_lines([(x, Source("t")) for x in order], window=0.5)
        c = next(s for s in spans if s.kind == CLIENT)
        s = next(s for s in spans if s.kind == SERVER)
        assert s.parent_span_id == c.span_id and c.parent_span_id == ""
