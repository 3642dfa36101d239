"""logsink parsing: response flags, cluster names, timestamps, and whole access-log lines (the seed's sample,
lines real Envoy sidecars wrote in Istio's default JSON format, TCP entries)."""

from __future__ import annotations

import orjson
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2

from mizzen.services.logsink.cluster_name import parse_cluster, parse_sni, split_host
from mizzen.services.logsink.flags import (
    ALS_FIELDS,
    LONG_NAMES,
    FlagError,
    is_failure,
    long_name,
    parse_flags,
)
from mizzen.services.logsink.identity import Source, identity_from_proxy, workload_from_pod
from mizzen.services.logsink.parse import (
    KIND_CLIENT,
    KIND_SERVER,
    BadLine,
    normalize_request_id,
    parse_line,
    parse_traceparent,
    split_address,
)
from mizzen.services.logsink.timefmt import TimeError, parse_time_ns
from tests.logsink_data.helpers import CHAIN, SEED_SAMPLE, ns

# ---- response flags ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,short,long",
    [
        ("-", (), ()),
        ("UF,URX", ("UF", "URX"), ("UpstreamConnectionFailure", "UpstreamRetryLimitExceeded")),
        ("URX,UF", ("URX", "UF"), ("UpstreamRetryLimitExceeded", "UpstreamConnectionFailure")),
        ("NR", ("NR",), ("NoRouteFound",)),
        ("UO", ("UO",), ("UpstreamOverflow",)),
        ("DC", ("DC",), ("DownstreamConnectionTermination",)),
        ("UAEX", ("UAEX",), ("UnauthorizedExternalService",)),
        ("DR", ("DR",), ("DownstreamRemoteReset",)),
        ("OM", ("OM",), ("OverloadManagerTerminated",)),
        # %RESPONSE_FLAGS_LONG% output is accepted too and maps back to the short form
        ("UpstreamConnectionFailure,UpstreamRetryLimitExceeded", ("UF", "URX"),
         ("UpstreamConnectionFailure", "UpstreamRetryLimitExceeded")),
        # a flag a custom filter registered: kept as it is
        ("CF", ("CF",), ("CF",)),
    ],
)
def test_flags(text, short, long):
    got = parse_flags(text)
    assert got == short
    assert tuple(long_name(f) for f in got) == long


@pytest.mark.parametrize("text", ["uf", "UF;URX", "U F", "12", "UF,,URX", "UF,urx"])
def test_flags_rejects_garbage(text):
    with pytest.raises(FlagError):
        parse_flags(text)


def test_flag_table_matches_envoy_protos():
    """Every ResponseFlags field of Envoy's access-log proto (xds-protos) has a short flag with a long name."""
    proto_fields = {f.name for f in accesslog_pb2.ResponseFlags.DESCRIPTOR.fields if f.type == f.TYPE_BOOL}
    assert proto_fields == set(ALS_FIELDS)
    assert set(ALS_FIELDS.values()) <= set(LONG_NAMES)
    assert len(LONG_NAMES) == 29 and len(set(LONG_NAMES.values())) == 29


def test_failure_flags():
    assert is_failure(("UF",)) and is_failure(("DI", "UT"))
    assert not is_failure(("DI",)) and not is_failure(("RFCF",)) and not is_failure(())


# ---- cluster names ----------------------------------------------------------------------------------------


def test_cluster_outbound_with_subset():
    c = parse_cluster("outbound|80|v1|webserver.default.svc.cluster.local")
    assert (c.direction, c.port, c.subset, c.host, c.service, c.namespace) == (
        "outbound", 80, "v1", "webserver.default.svc.cluster.local", "webserver", "default")
    assert c.service_id == "webserver.default"


def test_cluster_outbound_without_subset_and_serviceentry_host():
    c = parse_cluster("outbound|9080||reviews.bookinfo.svc.cluster.local")
    assert (c.direction, c.port, c.subset, c.service, c.namespace) == ("outbound", 9080, "", "reviews", "bookinfo")
    se = parse_cluster("outbound|443||api.example.com")
    assert (se.direction, se.port, se.host, se.service, se.namespace) == ("outbound", 443, "api.example.com",
                                                                          "api.example.com", "")
    assert se.service_id == "api.example.com"


def test_cluster_inbound_forms():
    new = parse_cluster("inbound|8080||")  # Istio ≥ 1.8
    assert (new.direction, new.port, new.subset, new.host, new.service) == ("inbound", 8080, "", "", "")
    old = parse_cluster("inbound|9080|http|reviews.default.svc.cluster.local")  # Istio < 1.8
    assert (old.direction, old.port, old.subset, old.service, old.namespace) == ("inbound", 9080, "http",
                                                                                 "reviews", "default")


@pytest.mark.parametrize(
    "name,direction",
    [("PassthroughCluster", "outbound"), ("BlackHoleCluster", "outbound"), ("InboundPassthroughCluster", "inbound"),
     ("InboundPassthroughClusterIpv4", "inbound"), ("xds-grpc", ""), ("outbound|x||a.b.svc.cluster.local", "outbound"),
     ("something|else", "")],
)
def test_cluster_specials_and_unknown(name, direction):
    c = parse_cluster(name)
    assert c.direction == direction and c.raw == name
    if name == "outbound|x||a.b.svc.cluster.local":
        assert c.port is None


def test_sni_and_host_split():
    c = parse_sni("outbound_.9080_.v1_.reviews.default.svc.cluster.local")
    assert (c.direction, c.port, c.subset, c.service, c.namespace) == ("outbound", 9080, "v1", "reviews", "default")
    assert parse_sni("example.com") is None
    assert split_host("a.b.svc.cluster.local") == ("a", "b")
    assert split_host("a.b.svc.corp.example") == ("a", "b")
    assert split_host("api.example.com") == ("api.example.com", "")


# ---- timestamps, addresses, ids -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("2021-02-18T07:08:50.031Z", 1613632130_031_000_000),
        ("2021-02-18T07:08:50Z", 1613632130_000_000_000),
        ("2021-02-18T07:08:50.031123456Z", 1613632130_031_123_456),
        ("2021-02-18T15:08:50.031+08:00", 1613632130_031_000_000),
        ("2021-02-18T02:08:50.5-05:00", 1613632130_500_000_000),
        ("2021-02-18 07:08:50.031", 1613632130_031_000_000),
        ("1613632130.031", 1613632130_031_000_000),
        ("2020-02-29T00:00:00.000Z", 1582934400_000_000_000),
    ],
)
def test_time(text, expected):
    assert parse_time_ns(text) == expected


@pytest.mark.parametrize("text", ["yesterday", "2021-13-01T00:00:00Z", "2021-02-30T00:00:00.000Z",
                                  "2021-02-18T07:08:5x.031Z", "2021-02-18T25:00:00.000Z", ""])
def test_time_rejects(text):
    with pytest.raises(TimeError):
        parse_time_ns(text)


def test_addresses():
    assert split_address("10.0.0.1:80") == ("10.0.0.1", 80)
    assert split_address("[::1]:9080") == ("::1", 9080)
    assert split_address("/var/run/sock") == ("/var/run/sock", None)
    assert split_address("envoy://internal") == ("envoy://internal", None)
    assert split_address(None) == (None, None)


def test_request_id_normalization():
    # Envoy rewrites the version nibble to carry its trace decision: 4, 9, a, b all mean the same request.
    ids = [normalize_request_id(f"a56200f2-da0c-{n}396-9c60-6e5a9e3b1b6d") for n in "49ab"]
    assert len(set(ids)) == 1
    assert ids[0].hex() == "a56200f2da0c43969c606e5a9e3b1b6d"
    other = normalize_request_id("my-own-request-id")
    assert len(other) == 16 and other == normalize_request_id("my-own-request-id")
    assert other != normalize_request_id("my-own-request-id2")


def test_traceparent():
    tp = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert tp == (bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"), bytes.fromhex("00f067aa0ba902b7"), 1)
    assert parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01") is None
    assert parse_traceparent("garbage") is None


# ---- whole lines ------------------------------------------------------------------------------------------


def test_seed_sample_line():
    """The seed's outbound example: every value a string, `-` for absent ones."""
    raw = SEED_SAMPLE.read_bytes().strip()
    rec = parse_line(raw, Source("test"))
    f = rec.f
    assert rec.http and rec.kind == KIND_CLIENT
    assert rec.start_ns == ns("2021-02-18T07:08:50.031Z")
    assert rec.end_ns == rec.start_ns + 1_000_000
    assert f["response_code"] == 200 and f["bytes_received"] == 0 and f["bytes_sent"] == 75
    assert f["duration"] == 1 and f["upstream_service_time"] == 0
    assert rec.flags == ()
    # "-" is Envoy's absent value for known fields
    for absent in ("upstream_transport_failure_reason", "x_forwarded_for", "requested_server_name"):
        assert f.get(absent) is None
    assert f["method"] == "GET" and f["path"] == "/" and f["protocol"] == "HTTP/1.1"
    assert f["authority"] == "webserverv1.default.svc" and f["user_agent"] == "Go-http-client/1.1"
    assert f["request_id"] == "967f8e1a-dbc0-4cce-ad53-ce6a27d5e54c"
    c = rec.cluster
    assert (c.direction, c.port, c.subset, c.service, c.namespace) == ("outbound", 80, "", "webserverv1", "default")
    # an unknown field is kept exactly as logged
    assert rec.extra == {"istio_policy_status": "-"}


def test_recorded_envoy_lines_typed_json():
    """Lines real Envoy 1.40 sidecars wrote with Istio's default format: typed values, null for unset."""
    a = [parse_line(raw) for raw in (CHAIN / "a.jsonl").read_bytes().splitlines()]
    ok, missing, fail, down, tcp = a
    assert ok.f["response_code"] == 200 and ok.f["upstream_service_time"] == 4 and ok.kind == KIND_CLIENT
    assert missing.f["response_code"] == 404
    assert fail.f["method"] == "POST" and fail.f["bytes_received"] == 10
    assert down.flags == ("URX", "UF") and down.f["response_code"] == 503
    assert down.f["upstream_transport_failure_reason"] == "delayed_connect_error:_Connection_refused"
    assert down.f.get("upstream_local_address") is None
    assert not tcp.http and tcp.kind == KIND_CLIENT and tcp.f["response_code"] == 0
    assert tcp.f["bytes_sent"] == 5 and tcp.cluster.port == 9000
    b = [parse_line(raw) for raw in (CHAIN / "b.jsonl").read_bytes().splitlines()]
    assert [r.kind for r in b] == [KIND_CLIENT, KIND_SERVER] * 3
    assert b[1].cluster.direction == "inbound" and b[1].cluster.port == 8080
    c_tcp = parse_line((CHAIN / "c.jsonl").read_bytes().splitlines()[3])
    assert not c_tcp.http and c_tcp.kind == KIND_SERVER
    for rec in a + b:
        assert rec.extra is None


def test_inbound_detected_from_sni_when_cluster_missing():
    raw = orjson.dumps({"start_time": "2024-01-01T00:00:00.000Z", "method": "GET", "response_code": 404,
                        "response_flags": "NR", "upstream_cluster": None,
                        "requested_server_name": "outbound_.80_._.web.default.svc.cluster.local"})
    assert parse_line(raw).kind == KIND_SERVER


def test_unknown_fields_of_any_type_are_kept():
    raw = orjson.dumps({"start_time": "2024-01-01T00:00:00.000Z", "method": "GET", "x_tenant": "blue",
                        "x_attempts": 3, "x_ratio": 0.5, "x_flag": True, "x_list": ["a", 1],
                        "x_obj": {"k": "v"}, "x_null": None, "x_dash": "-"})
    rec = parse_line(raw)
    assert rec.extra == {"x_tenant": "blue", "x_attempts": 3, "x_ratio": 0.5, "x_flag": True, "x_list": ["a", 1],
                         "x_obj": {"k": "v"}, "x_dash": "-"}


def test_docker_json_file_wrapper():
    inner = SEED_SAMPLE.read_text().strip()
    raw = orjson.dumps({"log": inner + "\n", "stream": "stdout", "time": "2021-02-18T07:08:50.1Z"})
    rec = parse_line(raw)
    assert rec.f["request_id"] == "967f8e1a-dbc0-4cce-ad53-ce6a27d5e54c"


def test_bad_line_names_field():
    with pytest.raises(BadLine) as e:
        parse_line(b'{"start_time":"2024-01-01T00:00:00.000Z","duration":"abc"}')
    assert e.value.field == "duration" and "duration" in e.value.reason and e.value.kind == "bad_value"


# ---- identities -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "proxy,service,ns,pod",
    [
        ("sidecar~10.1.2.3~reviews-v1-545db77b95-2ps7q.bookinfo~bookinfo.svc.cluster.local", "reviews-v1.bookinfo",
         "bookinfo", "reviews-v1-545db77b95-2ps7q"),
        ("router~10.1.2.4~istio-ingressgateway-7b8c9d6f5-bcdfg.istio-system~istio-system.svc.cluster.local",
         "istio-ingressgateway.istio-system", "istio-system", "istio-ingressgateway-7b8c9d6f5-bcdfg"),
        ("web.prod", "web.prod", "prod", ""),
        ("web", "web", "", ""),
        ("/var/log/pods/default_ratings-v1-6cf6bc7c85-xk2lm_0b9f8e6c-3c1d-4a2e-9f4b-1c2d3e4f5a6b/istio-proxy/0.log",
         "ratings-v1.default", "default", "ratings-v1-6cf6bc7c85-xk2lm"),
    ],
)
def test_identity_from_proxy(proxy, service, ns, pod):
    ident = identity_from_proxy(proxy)
    assert (ident.service, ident.namespace, ident.pod) == (service, ns, pod)


def test_workload_from_pod():
    assert workload_from_pod("reviews-v1-545db77b95-2ps7q") == "reviews-v1"
    assert workload_from_pod("web-0") == "web"
    assert workload_from_pod("fluentd-x7k2p") == "fluentd"
    assert workload_from_pod("plainpod") == "plainpod"
