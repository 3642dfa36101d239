"""OTLP/JSON: the JSON mapping of `ExportTraceServiceRequest` that OTLP/HTTP receivers accept
(`Content-Type: application/json`) and Jaeger's UI can load: lowerCamelCase keys, trace and span ids as hex
(not base64, as the OTLP spec requires), enums as integers, 64-bit integers as strings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

import orjson

from .otlp_decode import export_request_json

_ID_KEYS = ("traceId", "spanId", "parentSpanId")


def _hex_ids(span: dict) -> None:
    import base64

    for k in _ID_KEYS:
        v = span.get(k)
        if v:
            span[k] = base64.b64decode(v).hex()
    for link in span.get("links", ()):
        _hex_ids(link)


def resource_spans_json(request_bytes: bytes) -> list[dict]:
    """The `resourceSpans` entries of an encoded ExportTraceServiceRequest, as OTLP/JSON dicts."""
    out = export_request_json(request_bytes).get("resourceSpans", [])
    for rs in out:
        for ss in rs.get("scopeSpans", ()):
            for span in ss.get("spans", ()):
                _hex_ids(span)
    return out


class JsonWriter:
    """Streams one `{"resourceSpans": [...]}` document: usable as the body of `POST /v1/traces` with
    `Content-Type: application/json`."""

    def __init__(self, fh: IO[bytes]):
        self.fh = fh
        self.first = True
        self.fh.write(b'{"resourceSpans":[')

    def add(self, request_bytes: bytes) -> None:
        for rs in resource_spans_json(request_bytes):
            if not self.first:
                self.fh.write(b",\n")
            self.first = False
            self.fh.write(orjson.dumps(rs))

    def close(self) -> None:
        self.fh.write(b"]}\n")
        self.fh.flush()


def iter_spans(doc: dict) -> Iterator[tuple[dict, dict]]:
    """(resource, span) pairs of an OTLP/JSON document."""
    for rs in doc.get("resourceSpans", ()):
        for ss in rs.get("scopeSpans", ()):
            for span in ss.get("spans", ()):
                yield rs.get("resource", {}), span
