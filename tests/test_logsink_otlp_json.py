"""`convert`'s fast OTLP/JSON writer (otlp_json.resource_spans_json_bytes) prints exactly what the reference path
(`MessageToDict` of the real opentelemetry-proto message, then orjson) prints, for every kind of span and value
the logsink makes: recorded sidecar chains, the seed's sample, the bench's lines, errors with status messages,
W3C context, and unknown fields of every JSON type."""

from __future__ import annotations

import orjson

from mizzen.services.logsink import otlp_json
from mizzen.services.logsink.identity import Source
from mizzen.services.mesh import otlp_wire as w
from tests.logsink_data.bad_lines import good_line
from tests.logsink_data.helpers import SEED_SAMPLE, Collected, by_end_time, chain_lines, chain_sources


def reference(body: bytes) -> list[bytes]:
    """The real opentelemetry-proto message printed by protobuf's MessageToDict (ids in hex, as OTLP/JSON wants)."""
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts_pb2

    d = MessageToDict(ts_pb2.ExportTraceServiceRequest.FromString(body), use_integers_for_enums=True,
                      preserving_proto_field_name=False)
    out = d.get("resourceSpans", [])
    for rs in out:
        for ss in rs.get("scopeSpans", ()):
            for span in ss.get("spans", ()):
                otlp_json._hex_ids(span)
    assert [orjson.dumps(rs) for rs in out] == [orjson.dumps(rs) for rs in otlp_json.resource_spans_json(body)]
    return [orjson.dumps(rs) for rs in out]


def requests_for(items, json_mode: bool = False) -> list:
    from mizzen.services.logsink.pipeline import Pipeline

    out = Collected() if not json_mode else JsonCollected()
    p = Pipeline(out, window=0.5, batch_size=7)
    p.json_mode = json_mode
    for i, (raw, src) in enumerate(items):
        assert p.feed_line(raw, src, now=i * 0.001), raw
        p.tick(i * 0.001)
    p.flush()
    return out.requests


class JsonCollected:
    def __init__(self) -> None:
        self.requests: list[list[bytes]] = []

    def __call__(self, entries: list[bytes], count: int, tokens) -> None:
        self.requests.append(entries)


def check(items) -> int:
    """Both fast paths — from a request's wire bytes, and (convert's) from each span's encoded pieces — print
    what the reference path prints."""
    reqs = requests_for(items)
    assert reqs
    for body in reqs:
        assert otlp_json.resource_spans_json_bytes(body) == reference(body)
    assert requests_for(items, json_mode=True) == [reference(body) for body in reqs]
    return len(reqs)


def test_recorded_chain_and_seed_sample():
    check(by_end_time(chain_lines(), chain_sources()))
    check(by_end_time(chain_lines(), {p: Source("file") for p in "abc"}))
    check([(raw, Source("file")) for raw in SEED_SAMPLE.read_bytes().splitlines() if raw.strip()])


def test_bench_lines_and_good_lines():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_logsink", Path(__file__).parents[1] / "bench" / "logsink.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    items = [(x, Source("bench")) for i in range(50) for x in (*bench.http_pair(i), *bench.tcp_pair(i))]
    check(items)
    check([(good_line(i), Source("x")) for i in range(40)])


def test_every_value_kind_errors_and_context():
    base = orjson.loads(good_line(1))
    odd = [
        {"float": 1.5, "tiny": 5e-324, "huge": 1e300, "neg_zero": -0.0, "whole": 2.0},
        {"flag": True, "off": False, "nothing": None, "dash": "-", "empty": ""},
        {"list": [1, "two", 3.5, None, [True]], "map": {"a": 1, "b": {"c": "d"}}, "empty_list": [], "empty_map": {}},
        {"neg": -5, "big": 2**63 - 1, "unicode": "žluťoučký 🐎 \u0000 \"quoted\" \\ back", "zero": 0},
        {"response_code": 503, "response_flags": "UF,URX", "response_code_details": "upstream \"reset\" ü"},
        {"response_code": 0, "response_flags": "-", "upstream_transport_failure_reason": "TLS_error:_x"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "a=1,b=2"},
        {"method": "PURGE", "grpc_status": "14"}, {"grpc_status": "UNKNOWN_THING"},
    ]
    items = []
    for i, extra in enumerate(odd):
        d = dict(base, request_id=f"00000000-0000-4000-8000-{i:012d}", **extra)
        items.append((orjson.dumps(d), Source("file", "sidecar~10.1.0.1~web-1.default~default.svc.cluster.local")))
    check(items)


def test_unexpected_bytes_take_the_reference_path():
    # a request with a field the fast path does not know (a span event) is still printed right
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts_pb2

    req = ts_pb2.ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "x"
    span = rs.scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = b"\x01" * 16, b"\x02" * 8, "s"
    span.events.add(name="e", time_unix_nano=5)
    kv = span.attributes.add(key="")
    kv.value.bytes_value = b"\x00\xff"
    body = req.SerializeToString()
    assert otlp_json.resource_spans_json_bytes(body) == reference(body)
    body2 = w.resource_spans(w.resource([("service.name", "y")]), w.scope("n", "v"),
                             [w.span_message(b"\x03" * 16, b"\x04" * 8, None, 0x301, "", b"", b"")])
    assert otlp_json.resource_spans_json_bytes(body2) == reference(body2)
