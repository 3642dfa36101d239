"""The control plane's own spans (opentelemetry-sdk) exported as OTLP written with `otlp_wire`.

The SDK's OTLP exporters build `opentelemetry.proto` messages, and which copy of those modules an environment
has depends on the order pip installed `opentelemetry-proto` and `xds-protos` (DESIGN.md's packaging trap:
with xds-protos' stale copy the exporters fail to import). This exporter writes the same
ExportTraceServiceRequest bytes itself and sends them over gRPC (a generic unary call) or HTTP, so tracing
works whatever pip did.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Sequence

from . import otlp_wire as w

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
# Span fields otlp_wire has no constant for (trace.proto): events 11, links 13; Event and Link fields.
SPAN_EVENT, SPAN_LINK = b"\x5a", b"\x6a"
EVENT_TIME, EVENT_NAME, EVENT_ATTR = b"\x09", b"\x12", b"\x1a"
LINK_TRACE_ID, LINK_SPAN_ID, LINK_TRACE_STATE, LINK_ATTR = b"\x0a\x10", b"\x12\x08", b"\x1a", b"\x22"


def _attrs(tag: bytes, attributes) -> bytes:
    return b"".join(w.ld(tag, w.keyvalue_body(k, v)) for k, v in (attributes or {}).items())


def _state(ts) -> str:
    return ts.to_header() if ts else ""


def encode_span(span) -> bytes:
    """One SDK ReadableSpan as an OTLP Span (the `spans` field of ScopeSpans)."""
    ctx = span.context
    parent = span.parent.span_id.to_bytes(8, "big") if span.parent is not None else None
    flags = int(ctx.trace_flags) & 0xFF
    if span.parent is not None:
        flags |= w.FLAG_HAS_IS_REMOTE | (w.FLAG_IS_REMOTE if span.parent.is_remote else 0)
    body = [w.ld(w.SPAN_NAME, span.name.encode()), w.SPAN_KIND + w.varint(span.kind.value + 1),  # SDK 0 = OTLP 1
            w.span_times(span.start_time or 0, span.end_time or span.start_time or 0),
            _attrs(w.T_KV, span.attributes)]
    for ev in span.events:
        body.append(w.ld(SPAN_EVENT, EVENT_TIME + w._pack_q(ev.timestamp) + w.ld(EVENT_NAME, ev.name.encode())
                         + _attrs(EVENT_ATTR, ev.attributes)))
    for link in span.links:
        lc = link.context
        state = _state(lc.trace_state)
        body.append(w.ld(SPAN_LINK, LINK_TRACE_ID + lc.trace_id.to_bytes(16, "big") + LINK_SPAN_ID
                         + lc.span_id.to_bytes(8, "big") + (w.ld(LINK_TRACE_STATE, state.encode()) if state else b"")
                         + _attrs(LINK_ATTR, link.attributes)))
    body.append(w.status(int(span.status.status_code.value), span.status.description or ""))
    return w.wrap_span(w.span_header(ctx.trace_id.to_bytes(16, "big"), ctx.span_id.to_bytes(8, "big"), parent, flags,
                                     _state(ctx.trace_state)) + b"".join(body))


def encode_request(spans: Sequence) -> bytes:
    """An ExportTraceServiceRequest: spans grouped by resource and instrumentation scope."""
    groups: dict[tuple[int, tuple[str, str]], tuple[object, list[bytes]]] = {}
    for s in spans:
        scope = s.instrumentation_scope
        key = (id(s.resource), (scope.name, scope.version or "") if scope else ("", ""))
        groups.setdefault(key, (s.resource, []))[1].append(encode_span(s))
    return b"".join(w.resource_spans(w.resource(dict(res.attributes).items()), w.scope(*key[1]), body)
                    for key, (res, body) in groups.items())


class WireSpanExporter:
    """An opentelemetry-sdk SpanExporter (duck-typed: `export`, `shutdown`, `force_flush`) over gRPC or HTTP."""

    def __init__(self, endpoint: str, protocol: str = "grpc", timeout: float = 10.0):
        self.protocol, self.timeout = protocol, timeout
        self._lock = threading.Lock()
        self._channel = None
        if protocol == "grpc":
            self.target = endpoint.removeprefix("http://").removeprefix("https://").rstrip("/")
            self.tls = endpoint.startswith("https://")
        else:
            base = endpoint if "://" in endpoint else "http://" + endpoint
            self.url = base.rstrip("/") + ("" if base.rstrip("/").endswith("/v1/traces") else "/v1/traces")

    def _call(self):
        import grpc

        with self._lock:
            if self._channel is None:
                self._channel = (grpc.secure_channel(self.target, grpc.ssl_channel_credentials()) if self.tls
                                 else grpc.insecure_channel(self.target))
                self._unary = self._channel.unary_unary(EXPORT_METHOD, request_serializer=lambda b: b,
                                                        response_deserializer=lambda b: b)
            return self._unary

    def export(self, spans: Sequence):
        from opentelemetry.sdk.trace.export import SpanExportResult

        body = encode_request(spans)
        try:
            if self.protocol == "grpc":
                self._call()(body, timeout=self.timeout)
            else:
                req = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/x-protobuf"})
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    r.read()
        except Exception:  # noqa: BLE001 - a failed export drops this batch, as the SDK's exporters do
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True

    def shutdown(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
