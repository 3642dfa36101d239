"""One Envoy access-log entry → a `Record`: typed, validated fields, absent values (`-`, null, "") removed,
unknown fields kept. Accepts Istio's typed JSON (numbers unquoted) and the older all-strings rendering
(`"duration": "1"`), as the seed's sample shows.

A line is bad (raises `BadLine` with a reason naming the field) when it is not a JSON object, is cut off, a
known field has the wrong type or an impossible value, or `start_time` is missing: such a line cannot become
a correct span, so it goes to the dead letters instead.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..mesh.otlp_wire import Key
from .cluster_name import ClusterName, parse_cluster, parse_sni
from .flags import FlagError, parse_flags
from .timefmt import TimeError, parse_time_ns

KIND_SERVER = 2  # OTLP Span.SpanKind values
KIND_CLIENT = 3

# Known string fields (Istio's default JSON format plus the useful optional operators).
STRING_FIELDS = (
    "method",
    "path",
    "protocol",
    "response_code_details",
    "connection_termination_details",
    "upstream_transport_failure_reason",
    "x_forwarded_for",
    "user_agent",
    "request_id",
    "authority",
    "upstream_host",
    "upstream_cluster",
    "upstream_local_address",
    "downstream_local_address",
    "downstream_remote_address",
    "downstream_direct_remote_address",
    "requested_server_name",
    "route_name",
    "traceparent",
    "tracestate",
    "downstream_peer_uri_san",
    "upstream_peer_uri_san",
    "downstream_local_uri_san",
    "upstream_local_uri_san",
    "downstream_transport_failure_reason",
)
# Known integer fields: milliseconds for the durations, bytes or counts for the rest.
INT_FIELDS = (
    "response_code",
    "bytes_received",
    "bytes_sent",
    "duration",
    "request_duration",
    "response_duration",
    "response_tx_duration",
    "upstream_service_time",
    "upstream_request_attempt_count",
    "connection_id",
)
# Fields that only feed the record's own slots and never become attributes by name.
OTHER_KNOWN = ("start_time", "response_flags", "grpc_status")
KNOWN = frozenset(STRING_FIELDS + INT_FIELDS + OTHER_KNOWN)

# Fields copied unchanged as `envoy.<field>` attributes (the rest map onto OpenTelemetry semconv, see spans.py).
ENVOY_PASSTHROUGH = frozenset(
    {
        "request_id",
        "response_code_details",
        "connection_termination_details",
        "upstream_transport_failure_reason",
        "downstream_transport_failure_reason",
        "upstream_host",
        "upstream_local_address",
        "downstream_local_address",
        "downstream_remote_address",
        "downstream_direct_remote_address",
        "requested_server_name",
        "route_name",
        "x_forwarded_for",
        "traceparent",
        "downstream_peer_uri_san",
        "upstream_peer_uri_san",
        "downstream_local_uri_san",
        "upstream_local_uri_san",
        "upstream_service_time",
        "request_duration",
        "response_duration",
        "response_tx_duration",
        "upstream_request_attempt_count",
        "connection_id",
    }
)
# Values that differ on almost every line are not worth caching.
_UNCACHED = frozenset({"request_id", "upstream_local_address", "downstream_remote_address", "traceparent",
                       "x_forwarded_for", "connection_id", "downstream_direct_remote_address"})
_S, _I, _X = 1, 2, 3
_CACHE_MAX = 20000


def _spec(key: str, t: int) -> tuple[int, Key | None, dict | None]:
    if key not in ENVOY_PASSTHROUGH:
        return t, None, None
    return t, Key("envoy." + key), (None if key in _UNCACHED else {})


_SPEC: dict[str, tuple[int, Key | None, dict | None]] = {
    **{k: _spec(k, _S) for k in STRING_FIELDS},
    **{k: _spec(k, _I) for k in INT_FIELDS},
    **{k: (_X, None, None) for k in OTHER_KNOWN},
}

_INT_LIMIT = {"response_code": 999}
_MAX_INT = (1 << 63) - 1

_ABSENT = frozenset({"-", ""})


class BadLine(ValueError):
    """A line that cannot become a span. `reason` says why, naming the field at fault; `kind` is a small fixed
    vocabulary for metrics (empty, not_json, cut_off, not_utf8, not_object, wrong_type, bad_value,
    missing_field, too_long) and `field` the field, if one is to blame."""

    def __init__(self, reason: str, kind: str = "bad_value", field: str = "", size: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.field = field
        self.size = size  # the line's full length when only its head is kept (over-long lines)


class Record:
    """A parsed entry plus the join's bookkeeping. `f` holds the known fields (typed, absent ones removed),
    `extra` the unknown ones exactly as logged."""

    __slots__ = (
        "raw",
        "f",
        "extra",
        "start_ns",
        "end_ns",
        "http",
        "kind",
        "cluster",
        "flags",
        "rid",
        "tp",
        "src",
        "token",
        # set by the joiner
        "span_id",
        "trace_id",
        "parent",
        "ext_parent",
        "joined_by",
        "state",
        "deadline",
        "gkey",
        "seq",
        # join fields kept after `f` is dropped: the 4-tuple, the SNI's identity, the encoded span body
        "ul",
        "uh",
        "dr",
        "dl",
        "ul_ip",
        "uh_ip",
        "dr_ip",
        "dl_ip",
        "sni_ident",
        "sni_host",
        "own",
        "san_ident",
        "tstate",
        "body",
        "mvals",
        "env",
    )

    def __init__(self) -> None:
        self.src = None
        self.token = None
        self.parent = None
        self.ext_parent = None
        self.joined_by = ""
        self.state = 0
        self.trace_id = b""
        self.span_id = b""

    def get(self, key: str) -> Any:
        return self.f.get(key)

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    def __repr__(self) -> str:
        kind = "SERVER" if self.kind == KIND_SERVER else "CLIENT"
        return f"<Record {kind} {self.f.get('upstream_cluster')} {self.f.get('request_id')} @{self.start_ns}>"


def _int_value(key: str, v: Any) -> int:
    if v.__class__ is int:
        n = v
    elif v.__class__ is str and v.isdigit() and v.isascii() and len(v) <= 19:
        n = int(v)
    else:
        if v.__class__ is str and v[:1] == "-" and v[1:].isdigit():
            raise BadLine(f"{key}: negative value {v!r}", "bad_value", key)
        kind = "bad_value" if v.__class__ is str else "wrong_type"
        raise BadLine(f"{key}: expected a non-negative integer, got {_show(v)}", kind, key)
    if n < 0:
        raise BadLine(f"{key}: negative value {n}", "bad_value", key)
    if n > _INT_LIMIT.get(key, _MAX_INT):
        raise BadLine(f"{key}: value {n} out of range", "bad_value", key)
    return n


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    if isinstance(v, (dict, list)):
        return "an object" if isinstance(v, dict) else "an array"
    if isinstance(v, float):
        return f"number {v!r}"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "...'"


def normalize_request_id(rid: str) -> bytes:
    """x-request-id → 16-byte trace key. Envoy's UUID request ids carry the trace decision in the version nibble
    (`4` default, `9`/`a`/`b` sampled/forced) and Envoy may rewrite it between hops, so it is reset to `4`
    before use (which also makes the key never all-zero). Other ids hash to 16 bytes."""
    if len(rid) == 36 and rid[8] == "-" and rid[13] == "-" and rid[18] == "-" and rid[23] == "-":
        try:
            b = bytes.fromhex(rid.replace("-", ""))
        except ValueError:
            b = b""
        if len(b) == 16:
            v = b[6]
            if v & 0xF0 != 0x40:
                b = b[:6] + _NIBBLE4[v & 0x0F] + b[7:]
            return b
    import hashlib

    return hashlib.blake2b(rid.encode(), digest_size=16).digest()


_NIBBLE4 = [bytes((0x40 | n,)) for n in range(16)]


def parse_traceparent(value: str) -> tuple[bytes, bytes, int] | None:
    """W3C `traceparent` → (trace_id, parent span id, flags); None when malformed or all-zero."""
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        tid, sid, fl = bytes.fromhex(parts[1]), bytes.fromhex(parts[2]), int(parts[3], 16)
    except ValueError:
        return None
    if parts[0] == "ff" or tid == bytes(16) or sid == bytes(8):
        return None
    return tid, sid, fl


def split_address(addr: str | None) -> tuple[str | None, int | None]:
    """`10.0.0.1:80` → ("10.0.0.1", 80); `[::1]:80` → ("::1", 80); a unix path or bare host → (addr, None)."""
    if not addr:
        return None, None
    if addr[0] == "[":
        end = addr.find("]")
        if end > 0:
            host = addr[1:end]
            rest = addr[end + 1 :]
            if rest[:1] == ":" and rest[1:].isdigit():
                return host, int(rest[1:])
            return host, None
        return addr, None
    host, sep, port = addr.rpartition(":")
    if sep and port.isdigit() and ":" not in host and len(port) <= 5:
        return host, int(port)
    return addr, None


def address_ip(addr: str | None) -> str | None:
    """The host part of an address (fast path for `ip:port`)."""
    if not addr:
        return None
    host, sep, _port = addr.rpartition(":")
    if not sep or ":" in host or host[:1] == "[":
        return split_address(addr)[0]
    return host


def parse_line(raw: bytes, src: Any = None) -> Record:
    """Parse one JSON access-log line. `raw` is the line without its newline."""
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise BadLine(*_json_reason(raw, e)) from None
    if d.__class__ is not dict:
        raise BadLine(f"not a JSON object but {_json_kind(d)}", "not_object")
    if "start_time" not in d and "log" in d and d.get("log").__class__ is str:
        return _unwrap_docker(d, src)
    return record_from_dict(d, raw, src)


def _unwrap_docker(d: dict, src: Any) -> Record:
    """Docker's json-file driver wraps each stdout line: {"log": "<line>\\n", "stream": …, "time": …}."""
    inner = d["log"].rstrip("\n").encode()
    return parse_line(inner, src)


def _json_kind(v: Any) -> str:
    if isinstance(v, list):
        return "an array"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, bool):
        return "a boolean"
    if v is None:
        return "null"
    return "a number"


def _json_reason(raw: bytes, e: orjson.JSONDecodeError) -> tuple[str, str]:
    text = raw.strip()
    if not text:
        return "empty line", "empty"
    msg = str(e)
    if "utf-8" in msg.lower() or "utf8" in msg.lower() or "surrogate" in msg.lower():
        return "not valid UTF-8", "not_utf8"
    if text[:1] == b"{" and (e.pos >= len(text) - 1 or "unexpected end" in msg.lower() or "EOF" in msg):
        return "cut off: JSON object not closed", "cut_off"
    return f"not JSON: {msg}", "not_json"


def record_from_dict(
    d: dict, raw: bytes, src: Any = None, start_ns: int | None = None, end_ns: int | None = None,
    check_shape: bool = True,
) -> Record:
    """Validate and normalize a decoded entry in place (absent values become None). Inputs that carry exact
    times (the gRPC access log) pass `start_ns`/`end_ns`, and then `start_time`/`duration` are not needed.

    The same single pass over the fields encodes the ones that become `envoy.<field>` attributes unchanged
    (`Record.env`), since that pass is the logsink's hottest loop."""
    keys = tuple(d)
    plan = _PLANS.get(keys)
    if plan is None and len(_PLANS) < _MAX_PLANS and len(keys) <= 64:
        plan = _PLANS[keys] = _compile_plan(keys)
    if plan is not None:
        env, extra = plan(d, *d.values())
        return _finish(d, raw, src, env, extra, start_ns, end_ns, check_shape)
    env: list[bytes] = []
    extra = None
    spec_of = _SPEC.get
    for k, v in d.items():
        if v is None:
            continue  # null: absent for a known field, and an unknown one carries nothing either
        spec = spec_of(k)
        if spec is None:
            if extra is None:
                extra = {}
            extra[k] = v  # unknown: kept as logged (even "-": nothing says it means absent there)
            continue
        t, key, cache = spec
        if t == _S:
            if v.__class__ is not str:
                raise BadLine(f"{k}: expected a string, got {_show(v)}", "wrong_type", k)
            if v == "-" or v == "":
                d[k] = None
                continue
        elif t == _I:
            if v.__class__ is not int:
                if v.__class__ is str and (v == "-" or v == ""):
                    d[k] = None
                    continue
                v = _int_value(k, v)
                d[k] = v
            elif v < 0 or (k == "response_code" and v > 999):
                _int_value(k, v)
        else:
            continue  # start_time, response_flags, grpc_status: handled below
        if key is not None:
            if cache is None:
                env.append(key.s(v) if t == _S else key.i(v))
            else:
                blob = cache.get(v)
                if blob is None:
                    blob = key.s(v) if t == _S else key.i(v)
                    if len(cache) >= _CACHE_MAX:
                        cache.clear()
                    cache[v] = blob
                env.append(blob)
    return _finish(d, raw, src, env, extra, start_ns, end_ns, check_shape)


def _finish(d: dict, raw: bytes, src: Any, env: list[bytes], extra: dict | None, start_ns: int | None,
            end_ns: int | None, check_shape: bool) -> Record:
    rec = Record()
    rec.raw = raw
    rec.src = src
    rec.env = env
    rec.extra = extra

    if start_ns is None:
        st = d.get("start_time")
        if st is None or st == "-" or st == "":
            raise BadLine("start_time: missing", "missing_field", "start_time")
        if st.__class__ is str:
            try:
                start_ns = parse_time_ns(st)
            except TimeError as e:
                raise BadLine(f"start_time: {e}: {_show(st)}", "bad_value", "start_time") from None
        else:
            # Envoy prints %START_TIME% as a string in every format; a JSON number here is not an access log's
            # timestamp (it would become a span in 1970).
            raise BadLine(f"start_time: expected an RFC 3339 string, got {_show(st)}", "wrong_type", "start_time")
        end_ns = start_ns + (d.get("duration") or 0) * 1_000_000
    elif end_ns is None:
        end_ns = start_ns + (d.get("duration") or 0) * 1_000_000
    rec.start_ns = start_ns
    rec.end_ns = end_ns

    fl = d.get("response_flags")
    if fl is None or fl == "-":
        rec.flags = ()  # what parse_flags gives for "-", without the call
    elif fl.__class__ is str:
        try:
            rec.flags = parse_flags(fl)
        except FlagError as e:
            raise BadLine(f"response_flags: {e}", "bad_value", "response_flags") from None
    elif fl.__class__ is tuple:
        rec.flags = fl
    else:
        raise BadLine(f"response_flags: expected a string, got {_show(fl)}", "wrong_type", "response_flags")

    gs = d.get("grpc_status")
    if gs is not None:
        if gs.__class__ is not str and gs.__class__ is not int:
            raise BadLine(f"grpc_status: expected a string or integer, got {_show(gs)}", "wrong_type", "grpc_status")
        if gs == "-" or gs == "":
            d["grpc_status"] = None

    rec.f = d
    method = d.get("method")
    rid = d.get("request_id")
    if method:
        http = True
    else:
        proto = d.get("protocol")
        http = bool((proto and proto[:4] == "HTTP") or rid or d.get("response_code"))
    rec.http = http
    if check_shape and not (http and "method" in d):  # else _check_shape would return at its first test
        _check_shape(d, http)

    uc = d.get("upstream_cluster")
    cl: ClusterName | None = parse_cluster(uc) if uc else None
    rec.cluster = cl
    rec.kind = _kind(cl, d)

    rec.rid = normalize_request_id(rid) if rid else None
    tp = d.get("traceparent")
    rec.tp = parse_traceparent(tp) if tp else None
    return rec


# ---- per-shape plans ----------------------------------------------------------------------------------------
# A sidecar writes every line with the same keys in the same order. For each key order seen, the field loop of
# `record_from_dict` is generated once as straight-line Python (each field's checks inlined, the values
# unpacked in one call): same checks, same order, same errors, same output — without the per-field spec lookup
# and dispatch, the loop's largest cost.
_PLANS: dict[tuple, Any] = {}
_MAX_PLANS = 512


def _bad_str(k: str, v: Any) -> None:
    raise BadLine(f"{k}: expected a string, got {_show(v)}", "wrong_type", k)


def _compile_plan(keys: tuple):
    lines = ["def plan(d, " + ", ".join(f"v{i}" for i in range(len(keys))) + "):",
             "    env = []", "    extra = None"]
    ns: dict[str, Any] = {"_bad_str": _bad_str, "_int_value": _int_value, "_CACHE_MAX": _CACHE_MAX}
    for i, k in enumerate(keys):
        v = f"v{i}"
        ns[f"k{i}"] = k
        spec = _SPEC.get(k) if isinstance(k, str) else None
        if spec is None:
            lines += [f"    if {v} is not None:", "        if extra is None:", "            extra = {}",
                      f"        extra[k{i}] = {v}"]
            continue
        t, key, cache = spec
        if t == _X:
            continue
        if t == _S:
            lines += [f"    if {v} is not None:",
                      f"        if {v}.__class__ is not str:", f"            _bad_str(k{i}, {v})",
                      f"        if {v} == '-' or {v} == '':", f"            d[k{i}] = None"]
            enc = "s"
        else:
            limit = f" or {v} > 999" if k == "response_code" else ""
            # all-strings logs print every integer as a string: `_int_value`'s digits path inline (fewer than 19
            # digits is below its int64 limit; response_code's own limit is checked after)
            lines += [f"    if {v} is not None:",
                      f"        if {v}.__class__ is not int:",
                      f"            if {v}.__class__ is str and ({v} == '-' or {v} == ''):",
                      f"                d[k{i}] = None", f"                {v} = None",
                      f"            elif {v}.__class__ is str and len({v}) < 19 and {v}.isdigit() and {v}.isascii():",
                      f"                {v} = int({v})"]
            if limit:
                lines += [f"                if {v} > 999:", f"                    _int_value(k{i}, {v})"]
            lines += [f"                d[k{i}] = {v}",
                      "            else:",
                      f"                {v} = _int_value(k{i}, {v})", f"                d[k{i}] = {v}",
                      f"        elif {v} < 0{limit}:", f"            _int_value(k{i}, {v})"]
            enc = "i"
        if key is None:
            continue  # not an `envoy.<field>` attribute: nothing to encode here
        ns[f"key{i}"] = key
        if cache is None and enc == "s":
            # a value that differs on every line (request id, ports): Key.s's fast path inline, no call
            ns[f"heads{i}"] = key.heads
            body = [f"            b = {v}.encode()", f"            h = heads{i}.get(len(b))",
                    f"            env.append(h + b if h is not None else key{i}.s({v}))"]
        else:
            body = ([f"            env.append(key{i}.{enc}({v}))"] if cache is None else
                    [f"            b = cache{i}.get({v})", "            if b is None:",
                     f"                b = key{i}.{enc}({v})",
                     f"                if len(cache{i}) >= _CACHE_MAX:", f"                    cache{i}.clear()",
                     f"                cache{i}[{v}] = b", "            env.append(b)"])
        if cache is not None:
            ns[f"cache{i}"] = cache
        if t == _S:
            lines += ["        else:"] + body
        else:
            lines += [f"        if {v} is not None:"] + body
    lines.append("    return env, extra")
    exec(compile("\n".join(lines), f"<logsink plan {len(_PLANS)}>", "exec"), ns)  # noqa: S102 - our own code
    return ns["plan"]


# What a line must carry to be an access log (the keys, whatever their value: Envoy's formats print every
# operator they name, "-" or null when unset). An HTTP entry names its request; a TCP entry its connection.
REQUEST_KEYS = ("method", "response_code", "protocol")
CONNECTION_KEYS = ("upstream_cluster", "upstream_host", "downstream_remote_address", "downstream_local_address",
                   "upstream_local_address", "requested_server_name")


def _check_shape(d: dict, http: bool) -> None:
    if http:
        for k in REQUEST_KEYS:
            if k in d:
                return
        raise BadLine("not an access log: an HTTP entry needs method, response_code or protocol",
                      "missing_field", "method")
    for k in CONNECTION_KEYS:
        if k in d:
            return
    if http is False and any(k in d for k in REQUEST_KEYS):
        return  # an HTTP entry whose request fields are all unset ("-"): a request that never got one
    raise BadLine("not an access log: no request fields (method, response_code, protocol) nor connection fields "
                  "(upstream_cluster, upstream_host, downstream_remote_address, downstream_local_address)",
                  "missing_field", "upstream_cluster")


def _kind(cl: ClusterName | None, d: dict) -> int:
    if cl is not None and cl.direction:
        return KIND_CLIENT if cl.direction == "outbound" else KIND_SERVER
    sni = d.get("requested_server_name")
    if sni:
        c = parse_sni(sni)
        if c is not None and c.direction == "outbound":
            return KIND_SERVER  # the caller's sidecar named our service in the mTLS SNI: this is an inbound log
    return KIND_CLIENT
