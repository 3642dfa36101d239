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


# ---- the fast path -----------------------------------------------------------------------------------------
# A general decoder (otlp_decode.py, or MessageToDict) builds a dict per message and field: most of `convert`'s
# time. The requests here are the logsink's own (otlp_wire.py), a handful of message types; this reads their wire
# bytes directly and writes the same JSON, byte for byte (tests compare it with protobuf's MessageToDict on every
# kind of value), caching the JSON of repeated attribute bytes. Anything it does not expect goes down the
# general path (`resource_spans_json`).

class _Unexpected(Exception):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    result = b & 0x7F
    shift = 7
    pos += 1
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


_unpack_d = __import__("struct").Struct("<d").unpack
_FRAG: dict[bytes, bytes] = {}  # encoded KeyValue (tag and length included) → its JSON
_STR: dict[bytes, bytes] = {}  # UTF-8 bytes → JSON string
_CACHE_MAX = 200_000


def _json_str(raw: bytes) -> bytes:
    hit = _STR.get(raw)
    if hit is None:
        hit = orjson.dumps(raw.decode())
        if len(_STR) >= _CACHE_MAX:
            _STR.clear()
        _STR[raw] = hit
    return hit


def _anyvalue_obj(buf: bytes, pos: int, end: int) -> dict:
    """AnyValue → its MessageToDict form (the oneof member is printed even when empty or zero)."""
    if pos == end:
        return {}
    tag = buf[pos]
    pos += 1
    if tag == 0x0A:
        n, pos = _varint(buf, pos)
        if pos + n != end:
            raise _Unexpected
        return {"stringValue": buf[pos:end].decode()}
    if tag == 0x18:
        v, pos = _varint(buf, pos)
        if pos != end:
            raise _Unexpected
        if v >= 1 << 63:
            v -= 1 << 64
        return {"intValue": str(v)}
    if tag == 0x10:
        v, pos = _varint(buf, pos)
        if pos != end:
            raise _Unexpected
        return {"boolValue": bool(v)}
    if tag == 0x21:
        if pos + 8 != end:
            raise _Unexpected
        (x,) = _unpack_d(buf[pos:end])
        if x != x:
            return {"doubleValue": "NaN"}
        if x in (float("inf"), float("-inf")):
            return {"doubleValue": "Infinity" if x > 0 else "-Infinity"}
        return {"doubleValue": x}
    if tag in (0x2A, 0x32, 0x3A):
        n, pos = _varint(buf, pos)
        if pos + n != end:
            raise _Unexpected
        if tag == 0x3A:
            import base64

            return {"bytesValue": base64.b64encode(buf[pos:end]).decode()}
        values = []
        for t, a, b in _fields(buf, pos, end):
            if t != 0x0A:
                raise _Unexpected
            values.append(_anyvalue_obj(buf, a, b) if tag == 0x2A else _kv_obj(buf, a, b))
        name = "arrayValue" if tag == 0x2A else "kvlistValue"
        return {name: {"values": values} if values else {}}
    raise _Unexpected


def _kv_obj(buf: bytes, pos: int, end: int) -> dict:
    """KeyValue → its MessageToDict form (an empty key is left out, as proto3 prints no default value)."""
    out: dict = {}
    while pos < end:
        tag = buf[pos]
        n, p2 = _varint(buf, pos + 1)
        if tag == 0x0A:
            key = buf[p2:p2 + n].decode()
            if key:
                out["key"] = key
        elif tag == 0x12:
            out["value"] = _anyvalue_obj(buf, p2, p2 + n)
        else:
            raise _Unexpected
        pos = p2 + n
    return out


def _kv_fragment(blob: bytes) -> bytes:
    """JSON of one encoded `attributes` entry (tag + length + KeyValue)."""
    n, pos = _varint(blob, 1)
    end = pos + n
    if end != len(blob):
        raise _Unexpected
    return orjson.dumps(_kv_obj(blob, pos, end))


def _span_json(buf: bytes, pos: int, end: int) -> bytes:
    tid = sid = pid = b""
    tstate = name = None
    kind = 0
    start = stop = None
    attrs: list[bytes] = []
    status = None
    flags = None
    frag = _FRAG
    while pos < end:
        tag = buf[pos]
        pos += 1
        if tag == 0x4A:
            n, p2 = _varint(buf, pos)
            e = p2 + n
            blob = buf[pos - 1:e]
            f = frag.get(blob)
            if f is None:
                f = _kv_fragment(blob)
                if len(frag) >= _CACHE_MAX:
                    frag.clear()
                frag[blob] = f
            attrs.append(f)
            pos = e
        elif tag == 0x0A or tag == 0x12 or tag == 0x22 or tag == 0x1A or tag == 0x2A or tag == 0x7A:
            n, pos = _varint(buf, pos)
            v = buf[pos:pos + n]
            pos += n
            if tag == 0x0A:
                tid = v
            elif tag == 0x12:
                sid = v
            elif tag == 0x22:
                pid = v
            elif tag == 0x1A:
                tstate = v
            elif tag == 0x2A:
                name = v
            else:
                status = v
        elif tag == 0x30:
            kind, pos = _varint(buf, pos)
        elif tag == 0x39:
            start = int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
        elif tag == 0x41:
            stop = int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
        elif tag == 0x85 and buf[pos] == 0x01:
            flags = int.from_bytes(buf[pos + 1:pos + 5], "little")
            pos += 5
        else:
            raise _Unexpected
    out = [b"{"]
    sep = b""
    if tid:
        out += (b'"traceId":"', tid.hex().encode(), b'"')
        sep = b","
    if sid:
        out += (sep, b'"spanId":"', sid.hex().encode(), b'"')
        sep = b","
    if tstate:
        out += (sep, b'"traceState":', _json_str(tstate))
        sep = b","
    if pid:
        out += (sep, b'"parentSpanId":"', pid.hex().encode(), b'"')
        sep = b","
    if name:
        out += (sep, b'"name":', _json_str(name))
        sep = b","
    if kind:
        out += (sep, b'"kind":', str(kind).encode())
        sep = b","
    if start:
        out += (sep, b'"startTimeUnixNano":"', str(start).encode(), b'"')
        sep = b","
    if stop:
        out += (sep, b'"endTimeUnixNano":"', str(stop).encode(), b'"')
        sep = b","
    if attrs:
        out += (sep, b'"attributes":[', b",".join(attrs), b"]")
        sep = b","
    if status is not None:
        out += (sep, b'"status":', _status_json(status))
        sep = b","
    if flags:
        out += (sep, b'"flags":', str(flags).encode())
    out.append(b"}")
    return b"".join(out)


def _status_json(buf: bytes) -> bytes:
    msg = None
    code = 0
    pos = 0
    while pos < len(buf):
        tag = buf[pos]
        pos += 1
        if tag == 0x12:
            n, pos = _varint(buf, pos)
            msg = buf[pos:pos + n]
            pos += n
        elif tag == 0x18:
            code, pos = _varint(buf, pos)
        else:
            raise _Unexpected
    parts = []
    if msg:
        parts.append(b'"message":' + _json_str(msg))
    if code:
        parts.append(b'"code":' + str(code).encode())
    return b"{" + b",".join(parts) + b"}"


_SMALL: dict[tuple[str, bytes], bytes] = {}  # resources and scopes: few, printed by the reference path


def _small_json(kind: str, raw: bytes) -> bytes:
    hit = _SMALL.get((kind, raw))
    if hit is None:
        d: dict = {}
        for tag, a, b in _fields(raw, 0, len(raw)):
            if kind == "resource" and tag == 0x0A:
                d.setdefault("attributes", []).append(_kv_obj(raw, a, b))
            elif kind == "scope" and tag in (0x0A, 0x12):
                v = raw[a:b].decode()
                if v:
                    d["name" if tag == 0x0A else "version"] = v
            else:
                raise _Unexpected
        hit = orjson.dumps(d)
        if len(_SMALL) > 10_000:
            _SMALL.clear()
        _SMALL[(kind, raw)] = hit
    return hit


def _fields(buf: bytes, pos: int, end: int):
    """(tag byte, start, end) of each length-delimited field."""
    while pos < end:
        tag = buf[pos]
        if tag & 0x07 != 2:
            raise _Unexpected
        n, p2 = _varint(buf, pos + 1)
        yield tag, p2, p2 + n
        pos = p2 + n


def resource_spans_json_bytes(request_bytes: bytes) -> list[bytes]:
    """`orjson.dumps(x)` for each x of `resource_spans_json(request_bytes)`, fast."""
    buf = request_bytes
    out = []
    try:
        for tag, a, b in _fields(buf, 0, len(buf)):
            if tag != 0x0A:
                raise _Unexpected
            parts = []
            for t2, c, d in _fields(buf, a, b):
                if t2 == 0x0A:
                    parts.append(b'"resource":' + _small_json("resource", buf[c:d]))
                elif t2 == 0x12:
                    scope = None
                    spans = []
                    for t3, e, f in _fields(buf, c, d):
                        if t3 == 0x0A:
                            scope = _small_json("scope", buf[e:f])
                        elif t3 == 0x12:
                            spans.append(_span_json(buf, e, f))
                        else:
                            raise _Unexpected
                    inner = []
                    if scope is not None:
                        inner.append(b'"scope":' + scope)
                    if spans:
                        inner.append(b'"spans":[' + b",".join(spans) + b"]")
                    parts.append(b'"scopeSpans":[{' + b",".join(inner) + b"}]")
                else:
                    raise _Unexpected
            out.append(b"{" + b",".join(parts) + b"}")
    except (_Unexpected, IndexError, UnicodeDecodeError):
        return [orjson.dumps(rs) for rs in resource_spans_json(request_bytes)]
    return out


# ---- JSON from the encoded pieces (convert) ---------------------------------------------------------------
_PART: dict[bytes, bytes] = {}  # an attribute blob (one or more encoded KeyValues) → its JSON entries
_NAMEKIND: dict[tuple[bytes, bytes], bytes] = {}


def _attrs_json(blob: bytes) -> bytes:
    hit = _PART.get(blob)
    if hit is None:
        frags = []
        pos, end = 0, len(blob)
        while pos < end:
            if blob[pos] != 0x4A:
                raise _Unexpected
            n, p2 = _varint(blob, pos + 1)
            one = blob[pos:p2 + n]
            f = _FRAG.get(one)
            if f is None:
                f = _kv_fragment(one)
            frags.append(f)
            pos = p2 + n
        hit = b",".join(frags)
        if len(_PART) >= _CACHE_MAX:
            _PART.clear()
        if hit:
            _PART[blob] = hit
    return hit


def span_from_parts(trace_id: bytes, span_id: bytes, parent_id: bytes | None, flags: int, trace_state: str,
                    parts: list[bytes], tail: bytes) -> bytes:
    """A span's OTLP/JSON from its ids and `spans.encode_body(..., as_parts=True)`: the same bytes as decoding
    the protobuf span and printing it with MessageToDict (tested)."""
    try:
        return _span_from_parts(trace_id, span_id, parent_id, flags, trace_state, parts, tail)
    except (_Unexpected, IndexError, UnicodeDecodeError):
        from ..mesh import otlp_wire as w  # not our own encoding after all: the reference path prints it

        msg = w.span_message(trace_id, span_id, parent_id, flags, trace_state, b"".join(parts), tail)
        doc = resource_spans_json(w.resource_spans(b"", b"", [msg]))
        return orjson.dumps(doc[0]["scopeSpans"][0]["spans"][0])


def _span_from_parts(trace_id, span_id, parent_id, flags, trace_state, parts, tail) -> bytes:
    nk = _NAMEKIND.get((parts[0], parts[1]))
    if nk is None:
        name_blob, kind_blob = parts[0], parts[1]
        if name_blob[0] != 0x2A or kind_blob[0] != 0x30:
            raise _Unexpected
        n, p = _varint(name_blob, 1)
        nk = b'"name":' + _json_str(name_blob[p:p + n]) + b',"kind":' + str(_varint(kind_blob, 1)[0]).encode()
        if len(_NAMEKIND) > 10_000:
            _NAMEKIND.clear()
        _NAMEKIND[(parts[0], parts[1])] = nk
    times = parts[2]
    if len(times) != 18 or times[0] != 0x39 or times[9] != 0x41:
        raise _Unexpected
    start = int.from_bytes(times[1:9], "little")
    stop = int.from_bytes(times[10:18], "little")
    out = [b'{"traceId":"', trace_id.hex().encode(), b'","spanId":"', span_id.hex().encode(), b'"']
    if trace_state:
        out += (b',"traceState":', orjson.dumps(trace_state))
    if parent_id:
        out += (b',"parentSpanId":"', parent_id.hex().encode(), b'"')
    out += (b",", nk)
    if start:
        out += (b',"startTimeUnixNano":"', str(start).encode(), b'"')
    if stop:
        out += (b',"endTimeUnixNano":"', str(stop).encode(), b'"')
    status = None
    last = parts[-1]
    if len(parts) > 3 and last and last[0] == 0x7A:  # encode_body adds the status last, when there is one
        n, p = _varint(last, 1)
        status = _status_json(last[p:p + n])
        blobs = parts[3:-1]
    else:
        blobs = parts[3:]
    part_get = _PART.get
    attrs = [part_get(b) or _attrs_json(b) for b in blobs]
    if tail:
        attrs.append(_attrs_json(tail))
    if attrs:
        joined = b",".join(filter(None, attrs))  # an empty blob (nothing to say) prints nothing
        if joined:
            out += (b',"attributes":[', joined, b"]")
    if status is not None:
        out += (b',"status":', status)
    if flags:
        out += (b',"flags":', str(flags).encode())
    out.append(b"}")
    return b"".join(out)


def resource_spans_from_json(resource_body: bytes, scope_body: bytes, spans: list[bytes]) -> bytes:
    """One `resourceSpans` entry from the resource and scope message bodies and the spans' JSON."""
    return (b'{"resource":' + _small_json("resource", resource_body) + b',"scopeSpans":[{"scope":'
            + _small_json("scope", scope_body) + b',"spans":[' + b",".join(spans) + b"]}]}")


class JsonWriter:
    """Streams one `{"resourceSpans": [...]}` document: usable as the body of `POST /v1/traces` with
    `Content-Type: application/json`."""

    def __init__(self, fh: IO[bytes]):
        self.fh = fh
        self.first = True
        self.fh.write(b'{"resourceSpans":[')

    def add(self, request_bytes: bytes | list[bytes]) -> None:
        """An encoded ExportTraceServiceRequest, or (from a pipeline in JSON mode) its entries' JSON."""
        entries = request_bytes if isinstance(request_bytes, list) else resource_spans_json_bytes(request_bytes)
        for rs in entries:
            if not self.first:
                self.fh.write(b",\n")
            self.first = False
            self.fh.write(rs)

    def close(self) -> None:
        self.fh.write(b"]}\n")
        self.fh.flush()


def iter_spans(doc: dict) -> Iterator[tuple[dict, dict]]:
    """(resource, span) pairs of an OTLP/JSON document."""
    for rs in doc.get("resourceSpans", ()):
        for ss in rs.get("scopeSpans", ()):
            for span in ss.get("spans", ()):
                yield rs.get("resource", {}), span
