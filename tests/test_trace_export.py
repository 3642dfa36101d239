"""The control plane's own spans, written by trace_export (no opentelemetry.proto at run time) and read back
with the official OTLP classes: every field the SDK span has arrives as the SDK's own exporter would send it."""

from __future__ import annotations

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from mizzen.services.mesh.trace_export import encode_request


class Capture(SpanExporter):
    def __init__(self):
        self.spans = []

    def export(self, spans):
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def test_sdk_spans_round_trip_through_the_official_classes():
    cap = Capture()
    provider = TracerProvider(resource=Resource.create({"service.name": "mizzen-registry"}))
    provider.add_span_processor(SimpleSpanProcessor(cap))
    tracer = provider.get_tracer("mizzen", "1")
    with tracer.start_as_current_span("registry apply", kind=SpanKind.SERVER,
                                      attributes={"mizzen.revision": 7, "mizzen.kinds": ["VirtualService"],
                                                  "ok": True, "ratio": 0.5}) as root:
        root.add_event("committed", {"keys": 2})
        with tracer.start_as_current_span("xds nack RouteConfiguration", kind=SpanKind.CLIENT,
                                          links=[Link(root.get_span_context(), {"why": "batch"})]) as child:
            child.set_status(Status(StatusCode.ERROR, "regex too large"))
    provider.shutdown()
    assert len(cap.spans) == 2
    req = trace_service_pb2.ExportTraceServiceRequest.FromString(encode_request(cap.spans))
    (rs,) = req.resource_spans
    assert {a.key: a.value.string_value for a in rs.resource.attributes}["service.name"] == "mizzen-registry"
    (ss,) = rs.scope_spans
    assert (ss.scope.name, ss.scope.version) == ("mizzen", "1")
    by_name = {s.name: s for s in ss.spans}
    sdk = {s.name: s for s in cap.spans}
    for name, got in by_name.items():
        want = sdk[name]
        assert got.trace_id == want.context.trace_id.to_bytes(16, "big")
        assert got.span_id == want.context.span_id.to_bytes(8, "big")
        assert (got.start_time_unix_nano, got.end_time_unix_nano) == (want.start_time, want.end_time)
    root_pb, child_pb = by_name["registry apply"], by_name["xds nack RouteConfiguration"]
    assert root_pb.parent_span_id == b"" and child_pb.parent_span_id == root_pb.span_id
    assert root_pb.kind == 2 and child_pb.kind == 3  # SERVER, CLIENT in OTLP's numbering
    attrs = {a.key: a.value for a in root_pb.attributes}
    assert attrs["mizzen.revision"].int_value == 7 and attrs["ok"].bool_value is True
    assert attrs["ratio"].double_value == 0.5
    assert [v.string_value for v in attrs["mizzen.kinds"].array_value.values] == ["VirtualService"]
    (ev,) = root_pb.events
    assert ev.name == "committed" and ev.attributes[0].value.int_value == 2 and ev.time_unix_nano > 0
    (link,) = child_pb.links
    assert link.span_id == root_pb.span_id and link.attributes[0].value.string_value == "batch"
    assert child_pb.status.code == 2 and child_pb.status.message == "regex too large"
    assert root_pb.status.code == 0
    assert child_pb.flags & 0x100 and not child_pb.flags & 0x200  # parent known, and local
