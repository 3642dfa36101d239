"""The logsink reads OTLP bytes without opentelemetry.proto (services/logsink/otlp_decode.py): its JSON equals
what the real opentelemetry-proto classes and protobuf's MessageToDict give, for every field it knows, and the
logsink's own output; partial_success reads an ExportTraceServiceResponse."""

from __future__ import annotations

import io

import orjson
import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from mizzen.services.logsink import otlp_decode
from mizzen.services.logsink.convert import convert
from tests.logsink_data.helpers import SEED_SAMPLE


def kv(key: str, **value) -> common_pb2.KeyValue:
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(**value))


def every_field() -> ts_pb2.ExportTraceServiceRequest:
    attrs = [kv("s", string_value="x"), kv("empty", string_value=""), kv("b", bool_value=False),
             kv("i", int_value=-7), kv("big", int_value=2**62), kv("d", double_value=0.0),
             kv("f", double_value=1.5), kv("inf", double_value=float("inf")), kv("raw", bytes_value=b"\x00\xff"),
             kv("arr", array_value=common_pb2.ArrayValue(values=[common_pb2.AnyValue(int_value=1),
                                                                 common_pb2.AnyValue(string_value="0")])),
             kv("kvl", kvlist_value=common_pb2.KeyValueList(values=[kv("in", bool_value=True)])),
             common_pb2.KeyValue(key="unset")]
    span = trace_pb2.Span(trace_id=bytes(range(16)), span_id=bytes(range(8)), parent_span_id=b"\x01" * 8,
                          trace_state="k=v", name="0", kind=trace_pb2.Span.SPAN_KIND_CLIENT,
                          start_time_unix_nano=1, end_time_unix_nano=2**63 + 5, attributes=attrs,
                          dropped_attributes_count=3, dropped_events_count=4, dropped_links_count=5, flags=0x301,
                          status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_ERROR, message="boom"))
    span.events.add(time_unix_nano=9, name="ev", attributes=[kv("e", int_value=1)], dropped_attributes_count=1)
    span.links.add(trace_id=b"\x02" * 16, span_id=b"\x03" * 8, trace_state="a=b", flags=1,
                   attributes=[kv("l", string_value="y")], dropped_attributes_count=2)
    bare = trace_pb2.Span(name="bare", status=trace_pb2.Status())  # an empty message that is present
    req = ts_pb2.ExportTraceServiceRequest()
    rs = req.resource_spans.add(schema_url="https://s")
    rs.resource.attributes.append(kv("service.name", string_value="svc"))
    rs.resource.dropped_attributes_count = 1
    ss = rs.scope_spans.add(schema_url="u")
    ss.scope.name, ss.scope.version = "mizzen", "1"
    ss.scope.attributes.append(kv("sc", bool_value=True))
    ss.spans.extend([span, bare])
    req.resource_spans.add()  # an empty ResourceSpans
    return req


def reference(data: bytes) -> dict:
    return MessageToDict(ts_pb2.ExportTraceServiceRequest.FromString(data), use_integers_for_enums=True)


def test_every_field_decodes_as_message_to_dict():
    data = every_field().SerializeToString()
    assert otlp_decode.export_request_json(data) == reference(data)


def test_the_logsinks_own_requests_decode_as_message_to_dict():
    # the requests the service path exports for the seed's sample (convert writes its JSON from the spans'
    # pieces instead: tests/test_logsink_otlp_json.py compares that with MessageToDict)
    from mizzen.services.logsink.identity import Source
    from mizzen.services.logsink.pipeline import Pipeline

    requests: list[bytes] = []
    p = Pipeline(lambda body, n, tokens: requests.append(body), window=1.0)
    for raw in SEED_SAMPLE.read_bytes().splitlines():
        if raw.strip():
            p.feed_line(raw, Source("file"), now=0.0)
    p.flush()
    out = io.BytesIO()
    convert([str(SEED_SAMPLE)], out, window=1.0)
    assert requests
    for b in requests:
        assert otlp_decode.export_request_json(b) == reference(b)
    doc = orjson.loads(out.getvalue())
    assert doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] == "967f8e1adbc04ccead53ce6a27d5e54c"


def test_unknown_fields_are_skipped_and_garbage_is_refused():
    data = every_field().SerializeToString() + b"\xf8\x07\x01"  # field 127, varint: not in the schema
    assert otlp_decode.export_request_json(data) == reference(data)
    with pytest.raises(otlp_decode.DecodeError):
        otlp_decode.export_request_json(b"\x0a\x05ab")  # a length running past the end


def test_partial_success():
    resp = ts_pb2.ExportTraceServiceResponse()
    assert otlp_decode.partial_success(resp.SerializeToString()) == (0, "")
    resp.partial_success.rejected_spans = 12
    resp.partial_success.error_message = "too old"
    assert otlp_decode.partial_success(resp.SerializeToString()) == (12, "too old")
