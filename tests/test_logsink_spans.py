"""logsink span building: the exact OTLP span for the seed's sample line, OpenTelemetry HTTP semconv attributes
for both sides, span status rules, resources. Every span here went through the wire encoder and was decoded
again with opentelemetry-proto's own classes."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from mizzen.services.logsink.identity import Source
from tests.logsink_data.helpers import SEED_SAMPLE, ns, run_lines

CLIENT, SERVER = 3, 2
UNSET, ERROR = 0, 2


def one_span(d: dict, src: Source | None = None):
    spans, p = run_lines([(orjson.dumps(d), src or Source("test"))], window=0.01)
    assert p.stats.bad_total == 0, p.stats.bad
    assert len(spans) == 1
    return spans[0]


def test_seed_sample_span_exactly():
    raw = SEED_SAMPLE.read_bytes().strip()
    spans, p = run_lines([(raw, Source("file"))], window=0.01)
    assert len(spans) == 1
    check_seed_span(spans[0], raw)


def check_seed_span(s, raw: bytes) -> None:
    """The exact span of the seed's sample line (also checked through the service and a real receiver)."""
    assert s.name == "GET"
    assert s.kind == CLIENT
    assert s.start == ns("2021-02-18T07:08:50.031Z")
    assert s.end == ns("2021-02-18T07:08:50.032Z")  # duration "1" ms
    # ids: trace id = the x-request-id UUID; span id = 8 bytes of BLAKE2b over the line
    assert s.trace_id == "967f8e1adbc04ccead53ce6a27d5e54c"
    assert s.span_id == hashlib.blake2b(raw, digest_size=8).hexdigest()
    assert s.parent_span_id == ""  # nothing else in the log: a root
    assert s.status_code == UNSET and s.status_message == ""
    assert s.flags == 0x101  # sampled; "parent is remote" known (no parent)
    # the caller is only known by its pod IP (the client side of the app's connection)
    assert s.resource == {"service.name": "unknown_service:10.200.0.131"}
    assert s.attributes == {
        "http.request.method": "GET",
        "network.protocol.name": "http",
        "network.protocol.version": "1.1",
        "http.response.status_code": 200,
        "user_agent.original": "Go-http-client/1.1",
        "server.address": "webserverv1.default.svc",
        "server.port": 80,  # the authority has no port: the service port from the cluster name
        "url.full": "http://webserverv1.default.svc/",
        "network.peer.address": "10.200.0.189",
        "network.peer.port": 3030,
        "http.request.body.size": 0,
        "http.response.body.size": 75,
        "service.peer.name": "webserverv1.default",
        "envoy.upstream_cluster": "outbound|80||webserverv1.default.svc.cluster.local",
        "envoy.upstream_cluster.direction": "outbound",
        "envoy.upstream_cluster.port": 80,
        "envoy.upstream_cluster.service": "webserverv1",
        "envoy.upstream_cluster.namespace": "default",
        "envoy.request_id": "967f8e1a-dbc0-4cce-ad53-ce6a27d5e54c",
        "envoy.upstream_host": "10.200.0.189:3030",
        "envoy.upstream_local_address": "10.200.0.131:42288",
        "envoy.downstream_local_address": "10.200.1.246:80",
        "envoy.downstream_remote_address": "10.200.0.131:44728",
        "envoy.route_name": "default",
        "envoy.upstream_service_time": 0,
        "envoy.istio_policy_status": "-",  # unknown field: kept as logged
    }


BASE = {
    "start_time": "2024-05-01T12:00:00.250Z",
    "method": "GET",
    "path": "/reviews/1?x=1&y=2",
    "protocol": "HTTP/1.1",
    "response_code": 200,
    "response_flags": "-",
    "response_code_details": "via_upstream",
    "bytes_received": 0,
    "bytes_sent": 10,
    "duration": 12,
    "user_agent": "curl/8.0",
    "request_id": "11111111-2222-4333-8444-555555555555",
    "authority": "reviews:9080",
}
OUTBOUND = {
    "upstream_cluster": "outbound|9080|v2|reviews.default.svc.cluster.local",
    "upstream_host": "10.0.0.20:9080",
    "upstream_local_address": "10.0.0.10:51000",
    "downstream_local_address": "10.96.0.5:9080",
    "downstream_remote_address": "10.0.0.10:40000",
}
INBOUND = {
    "upstream_cluster": "inbound|9080||",
    "upstream_host": "10.0.0.20:9080",
    "upstream_local_address": "127.0.0.6:43000",
    "downstream_local_address": "10.0.0.20:9080",
    "downstream_remote_address": "10.0.0.10:51000",
    "requested_server_name": "outbound_.9080_.v2_.reviews.default.svc.cluster.local",
}


def test_server_span_attributes():
    s = one_span({**BASE, **INBOUND, "x_forwarded_for": "203.0.113.7, 10.0.0.1", "protocol": "HTTP/2"})
    assert s.kind == SERVER and s.name == "GET"
    a = s.attributes
    assert a["url.path"] == "/reviews/1" and a["url.query"] == "x=1&y=2" and a["url.scheme"] == "http"
    assert "url.full" not in a
    assert a["server.address"] == "reviews" and a["server.port"] == 9080
    assert a["client.address"] == "203.0.113.7"  # first X-Forwarded-For entry
    assert a["network.peer.address"] == "10.0.0.10" and a["network.peer.port"] == 51000
    assert a["network.protocol.version"] == "2"
    assert a["envoy.requested_server_name"] == "outbound_.9080_.v2_.reviews.default.svc.cluster.local"
    assert a["envoy.x_forwarded_for"] == "203.0.113.7, 10.0.0.1"
    assert "service.peer.name" not in a
    # the callee is named by the mTLS SNI its caller used
    assert s.resource == {"service.name": "reviews.default", "service.namespace": "default",
                          "k8s.namespace.name": "default"}
    assert s.start == ns("2024-05-01T12:00:00.250Z") and s.end == ns("2024-05-01T12:00:00.262Z")


def test_client_span_attributes_and_subset():
    s = one_span({**BASE, **OUTBOUND})
    a = s.attributes
    assert s.kind == CLIENT
    assert a["url.full"] == "http://reviews:9080/reviews/1?x=1&y=2"
    assert "url.path" not in a and "client.address" not in a
    assert a["server.address"] == "reviews" and a["server.port"] == 9080
    assert a["network.peer.address"] == "10.0.0.20" and a["network.peer.port"] == 9080
    assert a["envoy.upstream_cluster.subset"] == "v2" and a["service.peer.name"] == "reviews.default"


def test_resource_from_proxy_identity():
    src = Source("nats", "sidecar~10.0.0.10~productpage-v1-6b746f74dc-9stvs.default~default.svc.cluster.local")
    s = one_span({**BASE, **OUTBOUND}, src)
    assert s.resource == {
        "service.name": "productpage-v1.default",
        "service.namespace": "default",
        "k8s.namespace.name": "default",
        "k8s.pod.name": "productpage-v1-6b746f74dc-9stvs",
        "service.instance.id": "productpage-v1-6b746f74dc-9stvs.default",
    }


@pytest.mark.parametrize(
    "side,code,flags,details,status,etype,message",
    [
        (OUTBOUND, 200, "-", "via_upstream", UNSET, None, ""),
        (INBOUND, 200, "-", "via_upstream", UNSET, None, ""),
        (OUTBOUND, 302, "-", "via_upstream", UNSET, None, ""),
        (OUTBOUND, 404, "-", "via_upstream", ERROR, "404", ""),  # 4xx: an error for the client…
        (INBOUND, 404, "-", "via_upstream", UNSET, None, ""),  # …but not for the server
        (INBOUND, 429, "RL", "local_rate_limited", UNSET, None, ""),
        (OUTBOUND, 503, "UO", "overflow", ERROR, "503", ""),  # 5xx: an error on both sides
        (INBOUND, 500, "-", "via_upstream", ERROR, "500", ""),
        (OUTBOUND, 200, "DI", "via_upstream", UNSET, None, ""),  # an injected delay is not a failure
        # no response at all: error, typed by the first failure flag, described by the code details
        (OUTBOUND, 0, "UF,URX", "upstream_reset_before_response_started{connection_failure}", ERROR,
         "UpstreamConnectionFailure", "upstream_reset_before_response_started{connection_failure}"),
        (INBOUND, 0, "DC", "downstream_remote_disconnect", ERROR, "DownstreamConnectionTermination",
         "downstream_remote_disconnect"),
        (OUTBOUND, 0, "-", "-", ERROR, "_OTHER", ""),
    ],
)
def test_http_status_rules(side, code, flags, details, status, etype, message):
    s = one_span({**BASE, **side, "response_code": code, "response_flags": flags, "response_code_details": details})
    assert s.status_code == status
    assert s.attributes.get("error.type") == etype
    assert s.status_message == message
    if code:
        assert s.attributes["http.response.status_code"] == code
    else:
        assert "http.response.status_code" not in s.attributes
    if flags != "-":
        assert s.attributes["envoy.response_flags"] == flags


TCP_OUT = {
    "start_time": "2024-05-01T12:00:00.000Z", "method": None, "path": None, "protocol": None, "response_code": 0,
    "response_flags": "-", "bytes_received": 120, "bytes_sent": 3400, "duration": 5000, "request_id": None,
    "upstream_cluster": "outbound|3306||mysql.db.svc.cluster.local", "upstream_host": "10.0.3.3:3306",
    "upstream_local_address": "10.0.0.10:52000", "downstream_local_address": "10.96.3.3:3306",
    "downstream_remote_address": "10.0.0.10:41000", "connection_termination_details": None,
}


@pytest.mark.parametrize(
    "flags,failure_reason,status,etype",
    [("-", None, UNSET, None), ("UF,URX", None, ERROR, "UpstreamConnectionFailure"), ("UO", None, ERROR,
     "UpstreamOverflow"), ("-", "TLS_error:_CERTIFICATE_VERIFY_FAILED", ERROR, "_OTHER")],
)
def test_tcp_spans(flags, failure_reason, status, etype):
    s = one_span({**TCP_OUT, "response_flags": flags, "upstream_transport_failure_reason": failure_reason})
    assert s.kind == CLIENT and s.name == "TCP outbound|3306||mysql.db.svc.cluster.local"
    a = s.attributes
    assert a["network.transport"] == "tcp"
    assert a["server.address"] == "mysql.db.svc.cluster.local" and a["server.port"] == 3306
    assert a["network.peer.address"] == "10.0.3.3" and a["network.peer.port"] == 3306
    assert a["envoy.bytes_received"] == 120 and a["envoy.bytes_sent"] == 3400
    assert "http.request.method" not in a and "http.response.status_code" not in a
    assert s.end - s.start == 5_000_000_000
    assert s.status_code == status and a.get("error.type") == etype
    if failure_reason:
        assert s.status_message == failure_reason


def test_other_method_and_optional_fields():
    s = one_span({**BASE, **OUTBOUND, "method": "PURGE", "grpc_status": 14, "request_duration": 3,
                  "response_duration": 9, "upstream_request_attempt_count": 2,
                  "downstream_peer_uri_san": "spiffe://cluster.local/ns/default/sa/productpage",
                  "upstream_peer_uri_san": "spiffe://cluster.local/ns/default/sa/reviews",
                  "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "k=v"})
    a = s.attributes
    assert s.name == "HTTP"
    assert a["http.request.method"] == "_OTHER" and a["http.request.method_original"] == "PURGE"
    assert a["rpc.grpc.status_code"] == 14
    assert a["envoy.request_duration"] == 3 and a["envoy.response_duration"] == 9
    assert a["envoy.upstream_request_attempt_count"] == 2
    assert a["envoy.upstream_peer_uri_san"] == "spiffe://cluster.local/ns/default/sa/reviews"
    # a request that carried W3C trace context lands in that trace, under the span that sent it
    assert s.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert s.parent_span_id == "00f067aa0ba902b7"
    assert s.trace_state == "k=v"
    assert s.flags == 0x301  # the parent is remote (the application's span)
    assert a["mizzen.parent.source"] == "traceparent"


def test_unknown_fields_become_attributes():
    s = one_span({**BASE, **OUTBOUND, "x_tenant": "blue", "x_n": 3, "x_list": ["a", "b"], "x_obj": {"k": 1}})
    a = s.attributes
    assert a["envoy.x_tenant"] == "blue" and a["envoy.x_n"] == 3
    assert a["envoy.x_list"] == ["a", "b"] and a["envoy.x_obj"] == {"k": 1}
