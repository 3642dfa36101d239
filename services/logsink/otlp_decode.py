"""OTLP trace protobufs read straight from wire bytes, the counterpart of otlp_wire.py.

The logsink must not import `opentelemetry.proto` at run time: `xds-protos` ships a stale copy of those modules
under the same import path (grpc/grpc#42926, DESIGN.md "Known packaging trap"), so which copy an interpreter
has depends on the order pip installed the two. The logsink writes OTLP bytes itself (otlp_wire.py); this
module reads the few messages it needs back — an ExportTraceServiceRequest into OTLP/JSON for `--format json`,
an ExportTraceServiceResponse's partial_success — from the field numbers of opentelemetry-proto's
`trace/v1/trace.proto`, `common/v1/common.proto`, `resource/v1/resource.proto` and
`collector/trace/v1/trace_service.proto`. The JSON is what `MessageToDict(use_integers_for_enums=True)` gives
(proto3 JSON mapping: lowerCamelCase keys, 64-bit integers as strings, bytes as base64, defaults left out);
tests/test_otlp_decode.py checks that against the real opentelemetry-proto classes.
"""

from __future__ import annotations

import base64
import math
import struct

# kinds
MSG, STR, BYTES, U32, I64, F64, FIX32, FIX64, BOOL, ENUM = range(10)

_unpack_d = struct.Struct("<d").unpack_from
_unpack_q = struct.Struct("<Q").unpack_from
_unpack_i = struct.Struct("<I").unpack_from

# message name → field number → (JSON name, kind, repeated, sub-message name, in a oneof)
Schema = dict[int, tuple[str, int, bool, str, bool]]
SCHEMAS: dict[str, Schema] = {
    "ExportTraceServiceRequest": {1: ("resourceSpans", MSG, True, "ResourceSpans", False)},
    "ResourceSpans": {1: ("resource", MSG, False, "Resource", False),
                      2: ("scopeSpans", MSG, True, "ScopeSpans", False),
                      3: ("schemaUrl", STR, False, "", False)},
    "Resource": {1: ("attributes", MSG, True, "KeyValue", False),
                 2: ("droppedAttributesCount", U32, False, "", False)},
    "ScopeSpans": {1: ("scope", MSG, False, "InstrumentationScope", False),
                   2: ("spans", MSG, True, "Span", False),
                   3: ("schemaUrl", STR, False, "", False)},
    "InstrumentationScope": {1: ("name", STR, False, "", False), 2: ("version", STR, False, "", False),
                             3: ("attributes", MSG, True, "KeyValue", False),
                             4: ("droppedAttributesCount", U32, False, "", False)},
    "Span": {1: ("traceId", BYTES, False, "", False), 2: ("spanId", BYTES, False, "", False),
             3: ("traceState", STR, False, "", False), 4: ("parentSpanId", BYTES, False, "", False),
             5: ("name", STR, False, "", False), 6: ("kind", ENUM, False, "", False),
             7: ("startTimeUnixNano", FIX64, False, "", False), 8: ("endTimeUnixNano", FIX64, False, "", False),
             9: ("attributes", MSG, True, "KeyValue", False),
             10: ("droppedAttributesCount", U32, False, "", False),
             11: ("events", MSG, True, "Event", False), 12: ("droppedEventsCount", U32, False, "", False),
             13: ("links", MSG, True, "Link", False), 14: ("droppedLinksCount", U32, False, "", False),
             15: ("status", MSG, False, "Status", False), 16: ("flags", FIX32, False, "", False)},
    "Event": {1: ("timeUnixNano", FIX64, False, "", False), 2: ("name", STR, False, "", False),
              3: ("attributes", MSG, True, "KeyValue", False),
              4: ("droppedAttributesCount", U32, False, "", False)},
    "Link": {1: ("traceId", BYTES, False, "", False), 2: ("spanId", BYTES, False, "", False),
             3: ("traceState", STR, False, "", False), 4: ("attributes", MSG, True, "KeyValue", False),
             5: ("droppedAttributesCount", U32, False, "", False), 6: ("flags", FIX32, False, "", False)},
    "Status": {2: ("message", STR, False, "", False), 3: ("code", ENUM, False, "", False)},
    "KeyValue": {1: ("key", STR, False, "", False), 2: ("value", MSG, False, "AnyValue", False)},
    "AnyValue": {1: ("stringValue", STR, False, "", True), 2: ("boolValue", BOOL, False, "", True),
                 3: ("intValue", I64, False, "", True), 4: ("doubleValue", F64, False, "", True),
                 5: ("arrayValue", MSG, False, "ArrayValue", True),
                 6: ("kvlistValue", MSG, False, "KeyValueList", True), 7: ("bytesValue", BYTES, False, "", True)},
    "ArrayValue": {1: ("values", MSG, True, "AnyValue", False)},
    "KeyValueList": {1: ("values", MSG, True, "KeyValue", False)},
    "ExportTraceServiceResponse": {1: ("partialSuccess", MSG, False, "ExportTracePartialSuccess", False)},
    "ExportTracePartialSuccess": {1: ("rejectedSpans", I64, False, "", False),
                                  2: ("errorMessage", STR, False, "", False)},
}

_DEFAULT = {STR: "", BYTES: "", U32: 0, I64: "0", ENUM: 0, BOOL: False, F64: 0.0, FIX64: "0", FIX32: 0}
_WIRE = {MSG: 2, STR: 2, BYTES: 2, U32: 0, I64: 0, ENUM: 0, BOOL: 0, F64: 1, FIX64: 1, FIX32: 5}


class DecodeError(ValueError):
    pass


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise DecodeError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def _skip(buf: bytes, i: int, wire: int) -> int:
    if wire == 0:
        return _varint(buf, i)[1]
    if wire == 1:
        return i + 8
    if wire == 2:
        n, i = _varint(buf, i)
        return i + n
    if wire == 5:
        return i + 4
    raise DecodeError(f"unsupported wire type {wire}")


def _json_double(v: float):
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return v


def decode(buf: bytes, message: str) -> dict:
    """One message as its proto3 JSON mapping (a dict), unknown fields skipped."""
    schema = SCHEMAS[message]
    values: dict[int, object] = {}
    i, end = 0, len(buf)
    while i < end:
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        spec = schema.get(num)
        if spec is None or _WIRE[spec[1]] != wire:
            i = _skip(buf, i, wire)
            continue
        _name, kind, repeated, sub, oneof = spec
        if wire == 2:
            n, i = _varint(buf, i)
            if i + n > end:
                raise DecodeError(f"{message}: field {num} runs past the end")
            raw = buf[i:i + n]
            i += n
            if kind == MSG:
                v: object = decode(raw, sub)
            elif kind == STR:
                v = raw.decode("utf-8")
            else:
                v = base64.b64encode(raw).decode()
        elif wire == 0:
            n, i = _varint(buf, i)
            if kind == I64:
                v = str(n - (1 << 64) if n >= 1 << 63 else n)
            elif kind == BOOL:
                v = bool(n)
            elif kind == ENUM:
                v = n - (1 << 64) if n >= 1 << 63 else n
            else:
                v = n & 0xFFFFFFFF
        elif wire == 1:
            v = _json_double(_unpack_d(buf, i)[0]) if kind == F64 else str(_unpack_q(buf, i)[0])
            i += 8
        else:
            v = _unpack_i(buf, i)[0]
            i += 4
        if repeated:
            values.setdefault(num, []).append(v)  # type: ignore[union-attr]
        elif kind == MSG and num in values:
            values[num].update(v)  # type: ignore[union-attr] - a repeated occurrence merges (proto semantics)
        else:
            if oneof:  # the last member of a oneof on the wire wins
                for other, ospec in schema.items():
                    if ospec[4]:
                        values.pop(other, None)
            values[num] = v
    out = {}
    for num in sorted(values):
        name, kind, repeated, _sub, oneof = schema[num]
        v = values[num]
        if not oneof and not repeated and kind != MSG and v == _DEFAULT[kind] and type(v) is type(_DEFAULT[kind]):
            continue  # proto3 JSON leaves out scalars at their default
        out[name] = v
    return out


def export_request_json(request_bytes: bytes) -> dict:
    return decode(request_bytes, "ExportTraceServiceRequest")


def partial_success(response_bytes: bytes) -> tuple[int, str]:
    """(rejected spans, error message) of an ExportTraceServiceResponse."""
    ps = decode(response_bytes, "ExportTraceServiceResponse").get("partialSuccess", {})
    return int(ps.get("rejectedSpans", "0")), ps.get("errorMessage", "")
